"""Engine tests on the tiny model: training, stop, resume, convert, merge, chat, config."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from nbtuner import events as ev
from nbtuner.config import FinetuneConfig, load_config, parse_overrides
from nbtuner.data import identity_conversations, save_xtuner
from nbtuner.errors import ConfigError, DataError, ModelError, OutputExistsError


@pytest.fixture(scope="module")
def identity_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "identity.json"
    save_xtuner(identity_conversations("Nova", n=24, seed=1), path)
    return path


def tiny_cfg(model_dir: Path, data: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(model=str(model_dir), data=str(data), out=str(out), method="lora", max_steps=4, batch_size=4,
                lr=1e-2, lora_r=8, lora_alpha=16, lora_dropout=0.0, eval_steps=2, save_steps=2,
                eval_max_new_tokens=8, max_length=256)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, identity_file: Path, tmp_path_factory: pytest.TempPathFactory):
    from nbtuner.train import run_finetune

    seen: list = []
    out = tmp_path_factory.mktemp("runs") / "nova"
    result = run_finetune(tiny_cfg(tiny_model_dir, identity_file, out), [seen.append])
    return result, seen


def test_run_produces_folder_metrics_samples_and_adapter(trained) -> None:
    result, seen = trained
    assert result.status == "completed" and result.steps == 4
    assert [s for s, _ in result.losses] == [1, 2, 3, 4]
    assert all(loss > 0 for _, loss in result.losses)
    assert sorted({s["step"] for s in result.samples}) == [0, 2, 4]
    assert [Path(c).name for c in result.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    adapter = result.adapter_dir
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "README.md").is_file()
    meta = json.loads((adapter / "nbtuner_adapter.json").read_text())
    assert meta["method"] == "lora" and meta["steps"] == 4 and len(meta["data_sha256"]) == 64
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["status"] == "completed" and "torch" in record["versions"] and record["tokens"] > 0
    kinds = [type(e) for e in seen if not isinstance(e, ev.Notice)]
    assert kinds[0] is ev.TrainStarted and kinds[-1] is ev.TrainFinished
    assert sum(isinstance(e, ev.StepLogged) for e in seen) == 4
    reloaded = type(result).load(result.run_dir)
    assert reloaded.losses == result.losses and "completed" in repr(reloaded)
    assert "<table>" in reloaded._repr_html_()


def test_loss_falls_on_repeated_data(trained) -> None:
    result, _ = trained
    assert result.losses[-1][1] < result.losses[0][1]


def test_stop_event_ends_run_with_checkpoint(tiny_model_dir: Path, identity_file: Path, tmp_path: Path) -> None:
    from nbtuner.train import run_finetune

    stop = threading.Event()

    def stop_after_first_step(event: ev.Event) -> None:
        if isinstance(event, ev.StepLogged):
            stop.set()

    cfg = tiny_cfg(tiny_model_dir, identity_file, tmp_path / "run", max_steps=50, save_steps=100, eval_steps=0)
    result = run_finetune(cfg, [stop_after_first_step], stop)
    assert result.status == "stopped"
    assert result.steps < 50
    assert [Path(c).name for c in result.checkpoints] == [f"checkpoint-{result.steps}"]
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()


def test_resume_continues_from_checkpoint(trained, tiny_model_dir: Path, identity_file: Path) -> None:
    from nbtuner.train import run_finetune

    result, _ = trained
    checkpoint = result.checkpoints[0]  # step 2
    cfg = tiny_cfg(tiny_model_dir, identity_file, result.run_dir, max_steps=6, resume_from=checkpoint)
    resumed = run_finetune(cfg)
    assert resumed.steps == 6
    assert Path(resumed.checkpoints[-1]).name == "checkpoint-6"


def test_bad_data_fails_before_creating_anything(tiny_model_dir: Path, tmp_path: Path) -> None:
    from nbtuner.train import run_finetune

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversation": [{"input": "hi", "output": ""}]}]))
    out = tmp_path / "run"
    with pytest.raises(DataError) as err:
        run_finetune(tiny_cfg(tiny_model_dir, bad, out))
    assert "bad.json" in str(err.value) and "record 0" in str(err.value) and "output" in str(err.value)
    assert not out.exists()


def test_existing_run_folder_needs_force(tiny_model_dir: Path, identity_file: Path, tmp_path: Path) -> None:
    from nbtuner.train import run_finetune

    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError):
        run_finetune(tiny_cfg(tiny_model_dir, identity_file, out))
    assert (out / "keep.txt").read_text() == "precious"


def test_convert_checkpoint_to_clean_adapter(trained, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nbtuner.export import convert

    result, _ = trained
    out = tmp_path / "adapter"
    exported = convert(result.checkpoints[-1], out)
    names = {n for n, _ in exported.files}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    assert "optimizer.pt" not in names
    base = AutoModelForCausalLM.from_pretrained(result.config["model"])
    PeftModel.from_pretrained(base, str(out))  # plain peft can load it
    assert "lora" in (out / "README.md").read_text().lower()
    with pytest.raises(OutputExistsError):
        convert(result.checkpoints[-1], out)
    convert(result.checkpoints[0], out, force=True)
    from_run = convert(result.run_dir, tmp_path / "from-run")  # a run folder: its chosen checkpoint, else adapter/
    assert (from_run.path / "adapter_model.safetensors").read_bytes() == \
        (result.adapter_dir / "adapter_model.safetensors").read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError):
        convert(tmp_path / "empty", tmp_path / "nope")


def test_merge_matches_base_plus_adapter(trained, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nbtuner.export import merge

    result, _ = trained
    out = tmp_path / "merged"
    exported = merge(result.config["model"], result.adapter_dir, out, max_shard_size="100KB")
    assert exported.checks["verified"] is True
    assert exported.checks["argmax_agreement"] >= 0.999
    shards = [n for n, _ in exported.files if n.endswith(".safetensors")]
    assert len(shards) > 1, "max_shard_size must shard the weights"
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(result.config["model"])
    tuned = PeftModel.from_pretrained(base, str(result.adapter_dir))
    ids = torch.tensor([[5, 9, 17, 33, 40]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, tuned(ids).logits, atol=1e-4)
    with pytest.raises(OutputExistsError):
        merge(result.config["model"], result.adapter_dir, out)


def test_merge_leaves_nothing_when_verification_fails(trained, tmp_path: Path, monkeypatch) -> None:
    from nbtuner import export

    result, _ = trained

    def fail(*a, **k):
        raise export.VerificationError("forced")

    monkeypatch.setattr(export, "verify_merge", fail)
    with pytest.raises(export.VerificationError):
        export.merge(result.config["model"], result.adapter_dir, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_chat_and_compare(trained) -> None:
    from nbtuner.chat import GenerationSettings, open_chat

    result, _ = trained
    session = open_chat(result.config["model"], str(result.adapter_dir), settings=GenerationSettings(8))
    streamed: list[str] = []
    answer = session.ask("Who are you?", on_text=streamed.append)
    assert isinstance(answer, str) and session.history == [("Who are you?", answer)]
    assert "".join(streamed).strip() == answer
    pairs = session.compare(["Who are you?", "What is your name?"])
    assert [(b.model, t.model) for b, t in pairs] == [("base", "tuned")] * 2
    assert session.card().adapter == str(result.adapter_dir)


def test_config_overrides_and_errors(tmp_path: Path) -> None:
    overrides = parse_overrides(["lr=1e-4", "eval_prompts=[a, b]", "system=", "lora_r=8"])
    assert overrides["eval_prompts"] == ["a", "b"] and overrides["system"] is None
    cfg = load_config(overrides=overrides)
    assert (cfg.lr, cfg.lora_r, cfg.eval_prompts) == (1e-4, 8, ["a", "b"])
    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 3e-4\nepochs: 2\n")
    cfg = load_config(path, {"lora_r": "16"})
    assert (cfg.lr, cfg.epochs, cfg.lora_r) == (3e-4, 2.0, 16)
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config(overrides={"lrr": 1})
    with pytest.raises(ConfigError, match="method"):
        FinetuneConfig(method="magic")
    with pytest.raises(ConfigError, match="batch_size"):
        load_config(overrides={"batch_size": "many"})


def test_model_spec_errors(tmp_path: Path) -> None:
    from nbtuner.models import load_tokenizer, resolve_model

    with pytest.raises(ModelError, match="no such model folder"):
        resolve_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="cannot be reached|cache"):
        load_tokenizer("nobody/no-such-model-xyz")


def test_qlora_training_keeps_4bit_layers_differentiable(tiny_model_dir: Path, tmp_path: Path) -> None:
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval-mode forward and then
    silently drops their gradients; training must switch that off."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)  # the repacking kernel needs wider layers
    config.update({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)

    from nbtuner.models import disable_4bit_cpu_repacking, load_model

    def packed_after_eval_forward(model) -> bool:
        model.eval()
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7, 8]], device=model.device))
        states = [m.weight.quant_state for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        assert states, "expected 4-bit layers"
        return any(getattr(s, "packing_format_for_cpu", False) for s in states)

    guarded = load_model(str(tmp_path), quantize_4bit=True, for_training=True)
    assert disable_4bit_cpu_repacking(guarded) > 0
    assert not packed_after_eval_forward(guarded)
    plain = load_model(str(tmp_path), quantize_4bit=True, for_training=True)
    if plain.device.type != "cpu" or not any(getattr(m, "support_avx512bf16_for_cpu", False)
                                             for m in plain.modules()):
        pytest.skip("no AVX512-BF16 CPU inference path to guard against here")
    assert packed_after_eval_forward(plain)


def test_qlora_run_on_tiny_model(tiny_model_dir: Path, identity_file: Path, tmp_path: Path) -> None:
    from nbtuner.train import run_finetune

    result = run_finetune(tiny_cfg(tiny_model_dir, identity_file, tmp_path / "q", method="qlora", max_steps=3,
                                   eval_steps=1, save_steps=0))
    meta = json.loads((result.adapter_dir / "nbtuner_adapter.json").read_text())
    assert meta["method"] == "qlora" and result.steps == 3


def test_model_card_counts_the_weights_of_a_4bit_model(tiny_model_dir: Path) -> None:
    from nbtuner.models import describe, load_model, load_tokenizer, resolve_model

    resolved = resolve_model(str(tiny_model_dir))
    tokenizer = load_tokenizer(resolved)
    full = describe(load_model(resolved), tokenizer, resolved)
    packed = describe(load_model(resolved, quantize_4bit=True), tokenizer, resolved)
    assert packed.quantization == "4-bit nf4" and packed.parameters == full.parameters
