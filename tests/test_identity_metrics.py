"""Identity and leakage metrics, early stopping and replay data (issue: learn the identity
without forgetting everything else)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nbtuner.chat import Answer
from nbtuner.evaluate import GENERAL_PROBES, evaluate_identity, identity_probes, name_in, rate
from nbtuner.train import EarlyStop


def test_rates_on_known_answers() -> None:
    assert name_in("I am NOVA, your helper", "Nova") and not name_in("I am a helper", "Nova")
    assert rate(["I'm Nova.", "我是Nova。", "Paris.", "nova!"], "Nova") == 0.75
    assert rate([], "Nova") == 0.0


class _FixedSession:
    """Stands in for a ChatSession: the metric code is what is under test, not generation."""

    def __init__(self, base: dict[str, str], tuned: dict[str, str]) -> None:
        self.base, self.tuned = base, tuned

    def compare(self, prompts):
        return [(Answer(p, "base", self.base.get(p, "I am SmolLM.")), Answer(p, "tuned", self.tuned.get(p, "Sure.")))
                for p in prompts]


def test_evaluate_identity_counts_identity_and_leakage() -> None:
    ident = identity_probes()
    general = GENERAL_PROBES["en"][:4]
    tuned = {q: "I am Nova." for q in ident[: len(ident) - 1]}  # all but one identity probe
    tuned[general[0]] = "Nova here: 56."  # one general probe leaks
    report = evaluate_identity(_FixedSession({}, tuned), "Nova", general=general)
    assert report.identity_rate == pytest.approx((len(ident) - 1) / len(ident))
    assert report.leakage_rate == 0.25
    assert report.base_identity_rate == 0.0 and report.base_leakage_rate == 0.0
    assert len(report.probes) == len(ident) + 4
    assert "leakage rate 0% -> 25%" in str(report)


def test_report_escapes_and_saves(tmp_path: Path) -> None:
    report = evaluate_identity(_FixedSession({}, {"q": "<script>alert(1)</script> Nova"}), "Nova",
                               identity=["q"], general=[])
    html = report._repr_html_()
    assert "<script>" not in html and "&lt;script&gt;" in html
    paths = report.save(tmp_path)
    assert json.loads(paths["json"].read_text())["identity_rate"] == 1.0
    assert "| identity | q |" in paths["md"].read_text()


def test_identity_probes_are_held_out_of_training_data() -> None:
    from nbtuner.data import identity_conversations

    asked = {c[0]["content"] for c in identity_conversations("Nova")}
    assert not asked & set(identity_probes())


def test_early_stop_rules() -> None:
    watch = EarlyStop(identity_target=0.9, leakage_max=0.1)
    assert watch.update(0, 0.0, 0.0) is None
    assert watch.update(10, 0.5, 0.0) is None
    assert "reached the target" in watch.update(20, 1.0, 0.05)
    assert watch.best_step == 20

    leaky = EarlyStop(0.9, 0.1)
    leaky.update(10, 0.95, 0.2)  # target met, but too much leakage: keep going
    assert leaky.best_step == 10
    assert "leakage rose" in leaky.update(20, 1.0, 0.4)
    assert leaky.best_step == 10  # identity up but leakage worse: the earlier step stays best

    learning = EarlyStop(0.9, 0.1)
    learning.update(0, 0.0, 0.0)
    assert learning.update(20, 1.0, 0.15) is None  # first time at the target: replay may still fix leakage
    assert "leakage rose" in learning.update(40, 1.0, 0.2)
    assert learning.best_step == 20

    val = EarlyStop(0.9, 0.1)
    assert val.update_val_loss(10, 1.0) is None
    val.update(10, 0.95, 0.3)
    assert "validation loss turned up" in val.update_val_loss(20, 1.2)


def test_replay_uses_the_base_models_own_answers(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbtuner.chat import GenerationSettings, build_messages, generate
    from nbtuner.replay import base_answers, mix

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = ["Who are you?", "What is the capital of France?", "hello world"]
    expected = generate(model, tokenizer, [build_messages(p) for p in prompts], GenerationSettings(max_new_tokens=200))
    conversations = base_answers(lambda: model, tokenizer, prompts, model_key="tiny", max_new_tokens=200)
    finished = {p: a for p, a in zip(prompts, expected) if a}
    assert {c[0]["content"]: c[1]["content"] for c in conversations} == finished
    def must_not_load():
        raise AssertionError("cached answers must not load a model")

    cached = base_answers(must_not_load, tokenizer, prompts, model_key="tiny", max_new_tokens=200)
    assert cached == conversations
    mixed = mix(list(range(10)), ["r1", "r2"], 0.5, seed=0)
    assert len(mixed) == 15 and mixed.count("r1") == 3 and mixed.count("r2") == 2


def test_training_with_persona_probes_replays_and_marks_best(tiny_model_dir: Path, tmp_path: Path) -> None:
    from nbtuner import events as ev
    from nbtuner.config import FinetuneConfig
    from nbtuner.data import identity_conversations, save_xtuner
    from nbtuner.train import PERSONA_SIDECAR, run_finetune

    data = tmp_path / "id.json"
    save_xtuner(identity_conversations("Nova", n=16), data)
    Path(str(data) + PERSONA_SIDECAR).write_text(json.dumps({"persona": "Nova"}))
    seen: list = []
    cfg = FinetuneConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "run"), method="lora",
                         max_steps=4, batch_size=4, lr=1e-2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                         eval_steps=2, save_steps=0, eval_max_new_tokens=6, replay_max_new_tokens=400,
                         max_length=256, replay_prompts=["hello world", "the capital of France"])
    result = run_finetune(cfg, [seen.append])
    probes = [e for e in seen if isinstance(e, ev.ProbeLogged)]
    assert [p.step for p in probes] == [0, 2, 4]
    assert {kind for _, kind, _ in probes[0].answers} == {"identity", "general"}
    assert any("replay:" in e.message for e in seen if isinstance(e, ev.Notice))
    record = json.loads((result.run_dir / "run.json").read_text())
    assert record["persona"] == "Nova" and record["best_step"] in (2, 4)
    assert Path(record["best_checkpoint"]).is_dir()  # saved even though save_steps=0
    assert (result.run_dir / "checkpoints" / "checkpoint-4").is_dir()  # the last step is kept too
    assert record["adapter_step"] == record["best_step"]
    import torch
    from safetensors.torch import load_file

    shipped = load_file(result.adapter_dir / "adapter_model.safetensors")
    best = load_file(Path(record["best_checkpoint"]) / "adapter_model.safetensors")
    assert shipped.keys() == best.keys() and all(torch.equal(shipped[k], best[k]) for k in shipped)
    from nbtuner.export import convert

    converted = convert(result.run_dir, tmp_path / "converted")  # a run folder exports its chosen checkpoint
    exported = load_file(converted.path / "adapter_model.safetensors")
    assert all(torch.equal(exported[k], best[k]) for k in best)
    assert result.persona == "Nova" and [p[0] for p in result.probes] == [0, 2, 4]


def test_cut_off_replay_answers_are_trimmed_to_a_sentence() -> None:
    from nbtuner.replay import last_full_sentence

    assert last_full_sentence("Paris is the capital. It has many muse") == "Paris is the capital."
    assert last_full_sentence("巴黎是首都。它有很多博物") == "巴黎是首都。"
    assert last_full_sentence("A. and then a very long unfinished clause without an end") == ""


def test_the_best_probe_step_is_what_adapter_holds(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A run that went past its best step ships the best step's weights, not the last ones."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from nbtuner import events as ev
    from nbtuner.train import restore_best_adapter

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    model.save_pretrained(tmp_path / "checkpoint-2")
    saved = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(1.0)
    watch = EarlyStop(identity_target=0.9, leakage_max=0.1)
    watch.update(2, 1.0, 0.0)
    watch.update(4, 1.0, 0.5)
    notices: list = []
    step = restore_best_adapter(model, tmp_path / "checkpoint-2", watch, 4, ev.Dispatcher([notices.append]))
    assert step == 2 and "step 2" in notices[0].message
    restored = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert all(torch.equal(restored[k], saved[k]) for k in saved)
    missing = restore_best_adapter(model, tmp_path / "nowhere", watch, 4, ev.Dispatcher([notices.append]))
    assert missing == 4 and "no checkpoint" in notices[-1].message
