"""Keeps terminals and cell outputs readable: no per-tensor progress bars, no library chatter
below warnings. Called by the CLI and the magics just before they load models, never at import
(it imports transformers)."""
from __future__ import annotations

import os
import warnings


def hide_known_deprecations() -> None:
    """transformers 5 deprecates a name that peft still calls on every adapter load and training
    run; there is nothing for a user to do about it."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    hide_known_deprecations()
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is an engine dependency
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
