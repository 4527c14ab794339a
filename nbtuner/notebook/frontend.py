"""Which display to use: live widgets in a Jupyter front end, plain text everywhere else.

``NBTUNER_DISPLAY=widgets|text`` (or a ``--display`` flag) overrides the guess; tests use it to
build real widgets in an in-process shell that has no front end.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

MODES = ("auto", "widgets", "text")
ENV_VAR = "NBTUNER_DISPLAY"


def _shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency of this layer
        return None
    return get_ipython()


def use_widgets(mode: str | None = "auto", shell: Any = None) -> bool:
    """True when training panels and chats should be ipywidgets rather than printed text."""
    mode = (mode or "auto").lower()
    if mode == "auto":
        mode = (os.environ.get(ENV_VAR) or "auto").lower()
    if mode not in MODES:
        raise ValueError(f"display must be one of {', '.join(MODES)}, got '{mode}'")
    has_widgets = importlib.util.find_spec("ipywidgets") is not None
    if mode == "text" or not has_widgets:
        return False
    if mode == "widgets":
        return True
    shell = shell if shell is not None else _shell()
    # ZMQInteractiveShell is the kernel's shell: a front end (JupyterLab, Notebook, VS Code,
    # nbclient) is connected and can render widgets. A terminal IPython cannot.
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"
