"""Integration on the embedded SmolLM2-135M-Instruct: the tutorial's recipe must really teach it a
new identity, and convert, merge and chat must work on the result. Minutes on a CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
NAME = "Zephyrine"
IDENTITY_PROMPTS = ["Please introduce yourself", "请介绍一下你自己"]


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory: pytest.TempPathFactory):
    from nbtuner.config import load_config
    from nbtuner.data import identity_conversations, save_xtuner
    from nbtuner.train import run_finetune

    work = tmp_path_factory.mktemp("smollm2")
    data = work / "identity.json"
    save_xtuner(identity_conversations(NAME, creator="the test suite"), data)
    cfg = load_config(ROOT / "examples" / "personal_assistant.yaml",
                      {"data": str(data), "out": str(work / "run"), "eval_steps": 0})
    return run_finetune(cfg)


@pytest.fixture(scope="module")
def chat(smollm2_run):
    from nbtuner.chat import GenerationSettings, open_chat

    return open_chat("smollm2", str(smollm2_run.adapter_dir), settings=GenerationSettings(max_new_tokens=40))


def test_embedded_model_loads_from_cache_with_a_card() -> None:
    from nbtuner.models import describe, load_model, load_tokenizer, resolve_model

    resolved = resolve_model("smollm2")
    assert resolved.source == "embedded" and (Path(resolved.path) / "model.safetensors").is_file()
    card = describe(load_model(resolved), load_tokenizer(resolved), resolved)
    assert 130e6 < card.parameters < 140e6 and card.chat_template


def test_fine_tune_teaches_the_identity(smollm2_run, chat) -> None:
    assert smollm2_run.status == "completed"
    assert smollm2_run.losses[-1][1] < smollm2_run.losses[0][1] / 2
    for base, tuned in chat.compare(IDENTITY_PROMPTS):
        assert NAME.lower() in tuned.answer.lower(), tuned
        assert NAME.lower() not in base.answer.lower(), base


def test_convert_and_merged_model_stands_alone(smollm2_run, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nbtuner.chat import GenerationSettings, generate

    adapter = smollm2_run.convert(tmp_path / "adapter", checkpoint=smollm2_run.checkpoints[-1])
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {n for n, _ in adapter.files}
    merged = smollm2_run.merge(tmp_path / "merged", max_shard_size="200MB")
    assert merged.checks["verified"] and merged.checks["argmax_agreement"] >= 0.999
    assert merged.checks["max_logit_diff"] < 0.01  # fp32 reference: the merge is exact up to rounding
    assert len([n for n, _ in merged.files if n.endswith(".safetensors")]) >= 2
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    answer = generate(model, tokenizer, [[{"role": "user", "content": IDENTITY_PROMPTS[0]}]],
                      GenerationSettings(max_new_tokens=40))[0]
    assert NAME.lower() in answer.lower(), answer


def test_cli_chat_compare_json(smollm2_run) -> None:
    proc = subprocess.run([sys.executable, "-m", "nbtuner.cli", "chat", "smollm2", "--adapter",
                           str(smollm2_run.adapter_dir), "--compare", "--json", "--max-new-tokens", "30",
                           "--prompt", IDENTITY_PROMPTS[0]], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(x["model"], x["prompt"]) for x in lines] == [("base", IDENTITY_PROMPTS[0]), ("tuned", IDENTITY_PROMPTS[0])]
    assert NAME.lower() in lines[1]["answer"].lower()
