"""nbtuner: fine-tune chat LLMs from a Jupyter notebook, a terminal or Python.

Importing this package is instant: torch, transformers and peft load on first use. In a
notebook, `%load_ext nbtuner` registers the magics.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "FinetuneConfig": "config", "load_config": "config",
    "run_finetune": "train", "TrainResult": "train",
    "convert": "export", "merge": "export",
    "open_chat": "chat", "ChatSession": "chat", "GenerationSettings": "chat",
    "resolve_model": "models", "load_model": "models", "load_tokenizer": "models",
    "load_conversations": "data", "identity_conversations": "data", "check_dataset": "data",
}

__all__ = [*_LAZY, "load_ipython_extension", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'nbtuner' has no attribute '{name}'")


def load_ipython_extension(ipython: Any) -> None:
    from .notebook.magics import load_ipython_extension as load

    load(ipython)
