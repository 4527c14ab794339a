"""nbtuner: fine-tune chat LLMs from a Jupyter notebook, a terminal or Python.

Importing this package is instant: torch, transformers and peft load on first use. In a
notebook, `%load_ext nbtuner` registers the magics.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

__version__ = "0.1.0"

# On a shared CPU (a workshop laptop running a notebook server, CI), OpenMP threads that
# spin-wait ran training on the main thread 15-20x slower than sleeping ones; measured here.
# libgomp reads this once, so it only helps when nbtuner is imported before torch.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")



class _DropHubKernelNotice(logging.Filter):
    """bitsandbytes logs, when peft or the Trainer import it, that an optional CPU kernel it
    would fetch from a model hub is missing; harmless, and confusing in a workshop."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelNotice())

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
