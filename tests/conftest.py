"""Shared fixtures: a tiny randomly initialised chat model built in code (no download, seconds).

The tokenizer is a byte-level BPE trained here on a small corpus, with ChatML special tokens and
a chat template that, like SmolLM2's, inserts a default system prompt. So data, training, export
and chat code run against the same template logic as the real model, only smaller.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test assistant<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant. Please introduce yourself. Who are you? What is your name?",
    "I am an assistant created to help you. My name is Nova and I was made by Ada.",
    "请介绍一下你自己 你是谁 我是一个助手 我的名字是",
    "The capital of France is Paris. Two plus two is four. Write a Python function.",
    "system user assistant hello world the a an of to in is are was were be",
] * 20


def build_tiny_model(path: Path) -> Path:
    """Writes a 2-layer Llama with a trained byte-level BPE tokenizer into `path`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                         pad_token_id=fast.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps caches and run folders out of the user's home, but shares the converted SmolLM2."""
    shared = os.environ.get("NBTUNER_TEST_HOME")
    home = Path(shared) if shared else tmp_path_factory.getbasetemp() / "nbtuner-home"
    monkeypatch.setenv("NBTUNER_HOME", str(home))


ARTIFACTS_ROOT = Path(os.environ.get("NBTUNER_ARTIFACTS") or Path(__file__).resolve().parents[1] / "test-artifacts")


@contextlib.contextmanager
def exclusive_artifacts(name: str) -> Iterator[Path]:
    """test-artifacts/NAME/, fresh for this session; a second test session running at the same time
    (two people in one checkout) gets NAME-PID/ instead of deleting the first one's files."""
    import fcntl

    ARTIFACTS_ROOT.mkdir(parents=True, exist_ok=True)
    lock = open(ARTIFACTS_ROOT / f".{name}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        folder = ARTIFACTS_ROOT / name
    except OSError:
        folder = ARTIFACTS_ROOT / f"{name}-{os.getpid()}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        lock.close()
