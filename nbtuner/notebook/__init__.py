"""The notebook layer: magics, live widgets and the run object (the only place that imports
IPython, ipywidgets and matplotlib).

- ``magics``: ``%nbtuner``, ``%%finetune`` / ``%finetune``, ``%chat`` (``%load_ext nbtuner``)
- ``widgets``: ``TrainingPanel`` (an event consumer), ``ChatWidget``
- ``run``: ``NotebookRun`` (what ``%%finetune -o run`` binds), ``SessionCache``
- ``uipoll``: ``KernelPoller``, which keeps widget clicks working while a cell blocks
- ``plot``, ``render``, ``frontend``: the loss figure (Agg), HTML helpers, display-mode choice

Nothing here is imported by ``import nbtuner``.
"""
