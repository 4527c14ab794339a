"""What ``%%finetune -o run`` binds: a training run you can watch, stop, export and chat with.

:class:`NotebookRun` wraps the engine's :class:`~nbtuner.train.TrainResult` once training has
ended, and before that records the event stream itself, so ``run.losses`` is live while a
background run trains. Chat sessions come from a :class:`SessionCache` shared by the shell, so
the base model is loaded once for ``%chat``, ``run.chat()`` and the panel's Chat button.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

from .. import events as ev
from ..errors import ConfigError, NbtunerError
from .render import comparison_html, duration, error_text, esc, kv_table, png_img_tag, samples_by_step


def readable(exc: BaseException) -> BaseException:
    """Marks an nbtuner error so IPython shows its one-line message, not a traceback.

    IPython asks an exception for ``_render_traceback_`` before formatting a traceback; the
    instance keeps its type, so ``except ConfigError`` still works.
    """
    if isinstance(exc, NbtunerError) and not hasattr(exc, "_render_traceback_"):
        name = type(exc).__name__
        message = str(exc)
        try:
            exc._render_traceback_ = lambda: [f"\x1b[0;31m{name}\x1b[0m: {message}"]  # type: ignore[attr-defined]
        except AttributeError:  # pragma: no cover - exotic exception classes with __slots__
            pass
    return exc


class SessionCache:
    """Loaded chat sessions keyed by (model, adapter); keeps the `keep` most recently used."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._sessions: OrderedDict[tuple[str, str | None], Any] = OrderedDict()
        self.trusted: set[str] = set()  # models whose own code the user allowed (--trust-remote-code)

    @staticmethod
    def _key(model: str, adapter: str | Path | None) -> tuple[str, str | None]:
        return str(model), str(Path(adapter).resolve()) if adapter else None

    def get(self, model: str, adapter: str | Path | None = None, **kwargs: Any) -> Any:
        key = self._key(model, adapter)
        if key in self._sessions:
            self._sessions.move_to_end(key)
            return self._sessions[key]
        from ..chat import open_chat

        while len(self._sessions) >= self.keep:
            self._sessions.popitem(last=False)
        import gc

        gc.collect()
        kwargs.setdefault("trust_remote_code", str(model) in self.trusted)
        session = open_chat(model, str(adapter) if adapter else None, **kwargs)
        self._sessions[key] = session
        return session

    def put(self, model: str, adapter: str | Path | None, session: Any) -> None:
        self._sessions[self._key(model, adapter)] = session
        self._sessions.move_to_end(self._key(model, adapter))

    def clear(self) -> None:
        self._sessions.clear()

    def __len__(self) -> int:
        return len(self._sessions)


def usable_spec(spec: str | None, path: str | None) -> str | None:
    """The spec a run recorded, unless it was a relative folder that no longer resolves from here
    (the notebook moved to another directory): then the absolute path recorded beside it."""
    if not spec:
        return path
    if Path(spec).exists() or spec.lower().startswith("smollm2") or not path or not Path(path).exists():
        return spec
    return path


def base_model_of(adapter: str | Path, default: str | None = None) -> str | None:
    """The base model an adapter was trained on, from nbtuner's metadata beside it."""
    from ..export import adapter_metadata

    meta = adapter_metadata(adapter)
    return usable_spec(meta.get("base_model"), meta.get("base_path")) or default


class Comparison(list):
    """(base, tuned) answer pairs; a table in notebooks, aligned text elsewhere."""

    def _repr_html_(self) -> str:
        return comparison_html(self)

    def __repr__(self) -> str:
        lines = []
        for base, tuned in self:
            lines += [f"prompt: {base.prompt}", f"  base:  {base.answer}", f"  tuned: {tuned.answer}"]
        return "\n".join(lines) or "Comparison([])"


class NotebookRun:
    """A fine-tuning run started from a notebook (or loaded from its folder)."""

    def __init__(self, config: Any = None, *, sessions: SessionCache | None = None, name: str | None = None,
                 result: Any = None) -> None:
        self.config = config
        self.name = name
        self.sessions = sessions or SessionCache()
        self.stop_event = threading.Event()
        self.result = result
        self.error: BaseException | None = None
        self.panel: Any = None
        self.status = result.status if result is not None else "pending"
        self._losses: list[tuple[int, float]] = []
        self._val_losses: list[tuple[int, float]] = []
        self._samples: list[dict[str, Any]] = []
        self._probes: list[tuple[int, float, float]] = []
        self._run_dir: str | None = str(result.run_dir) if result is not None else None
        self.step = result.steps if result is not None else 0
        self.total_steps: int | None = None
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        if result is not None:
            self._done.set()

    @classmethod
    def load(cls, run_dir: str | Path, sessions: SessionCache | None = None) -> "NotebookRun":
        from ..train import TrainResult

        result = TrainResult.load(run_dir)
        return cls(result.config, sessions=sessions, name=Path(run_dir).name, result=result)

    # ------------------------------------------------------------------ training
    def __call__(self, event: ev.Event) -> None:
        """Records the event stream (worker thread): live losses before the result exists."""
        if isinstance(event, ev.TrainStarted):
            self.status, self._run_dir, self.total_steps = "running", event.run_dir, event.total_steps
        elif isinstance(event, ev.StepLogged):
            self.step, self.total_steps = event.step, event.total_steps
            self._losses.append((event.step, event.loss))
        elif isinstance(event, ev.EvalLogged):
            self._val_losses.append((event.step, event.val_loss))
        elif isinstance(event, ev.SamplesGenerated):
            self._samples += [{"step": event.step, "prompt": p, "answer": a} for p, a in event.answers]
        elif isinstance(event, ev.ProbeLogged):
            self._probes.append((event.step, event.identity_rate, event.leakage_rate))
            self._samples += [{"step": event.step, "prompt": p, "kind": k, "answer": a} for p, k, a in event.answers]
        elif isinstance(event, ev.TrainFinished):
            self.status = event.status

    def start(self, callbacks: Iterable[ev.Callback] = (), *, force: bool = False) -> "NotebookRun":
        """Trains on a worker thread; returns at once (see :meth:`wait`)."""
        if self._thread is not None:
            raise ConfigError("this run has already been started")
        consumers = [self, *callbacks]

        def work() -> None:
            from ..train import run_finetune

            try:
                self.status = "running"
                self.result = run_finetune(self.config, consumers, self.stop_event, force=force)
                self.status = self.result.status
                self.step = self.result.steps
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                self.error = readable(exc)
                self.status = "failed"
                if self.panel is not None:
                    self.panel.fail(exc)
            finally:
                self._done.set()

        self._thread = threading.Thread(target=work, name="nbtuner-train", daemon=True)
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> "NotebookRun":
        """Blocks until training ends; re-raises a training error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"training still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        """Asks training to stop after the current step (a checkpoint is saved)."""
        if self.panel is not None:
            self.panel.stop()
        self.stop_event.set()

    # ------------------------------------------------------------------ what it produced
    @property
    def losses(self) -> list[tuple[int, float]]:
        return list(self.result.losses) if self.result is not None else list(self._losses)

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return list(self.result.val_losses) if self.result is not None else list(self._val_losses)

    @property
    def samples(self) -> list[dict[str, Any]]:
        return list(self.result.samples) if self.result is not None else list(self._samples)

    @property
    def probes(self) -> list[tuple[int, float, float]]:
        """(step, identity rate, leakage rate) on held-out probes, when the run has a persona."""
        return list(getattr(self.result, "probes", [])) if self.result is not None else list(self._probes)

    @property
    def best_checkpoint(self) -> str | None:
        return getattr(self.result, "best_checkpoint", None) if self.result is not None else None

    @property
    def run_dir(self) -> Path | None:
        if self.result is not None:
            return Path(self.result.run_dir)
        return Path(self._run_dir) if self._run_dir else None

    @property
    def adapter_dir(self) -> Path | None:
        return Path(self.result.adapter_dir) if self.result is not None and self.result.adapter_dir else None

    @property
    def checkpoints(self) -> list[str]:
        return list(self.result.checkpoints) if self.result is not None else []

    @property
    def final_loss(self) -> float | None:
        if self.result is not None:
            return self.result.final_loss
        return self._losses[-1][1] if self._losses else None

    @property
    def model(self) -> str:
        if self.adapter_dir is not None and self.method != "full":
            found = base_model_of(self.adapter_dir)
            if found:
                return found
        config = self.result.config if self.result is not None else (self.config.to_dict() if self.config else {})
        return str(config.get("model") or "smollm2")

    @property
    def method(self) -> str | None:
        config = self.result.config if self.result is not None else {}
        return config.get("method")

    def _finished_result(self) -> Any:
        if self.result is None:
            if self.error is not None:
                raise readable(ConfigError(f"training failed: {error_text(self.error)}"))
            raise readable(ConfigError("training has not finished yet; wait for it (run.wait()) or stop it"))
        return self.result

    def convert(self, out: str | Path | None = None, checkpoint: str | Path | None = None,
                force: bool = False) -> Any:
        """A clean PEFT adapter folder (default: run/hf_adapter); returns an ExportResult."""
        try:
            return self._finished_result().convert(out, checkpoint=checkpoint, force=force)
        except NbtunerError as exc:
            raise readable(exc)

    def merge(self, out: str | Path | None = None, max_shard_size: str = "2GB", force: bool = False) -> Any:
        """Adapter merged into the base (default: run/merged), verified; returns an ExportResult."""
        try:
            return self._finished_result().merge(out, max_shard_size=max_shard_size, force=force)
        except NbtunerError as exc:
            raise readable(exc)

    def report(self, persona: str | None = None, checkpoint: str | Path | None = None) -> Any:
        """Before/after identity report on held-out probes (see ``TrainResult.report``)."""
        try:
            return self._finished_result().report(persona, checkpoint)
        except NbtunerError as exc:
            raise readable(exc)

    # ------------------------------------------------------------------ chatting with it
    def session(self) -> Any:
        """The tuned model as a ChatSession (base model + adapter, loaded once and cached)."""
        result = self._finished_result()
        if result.adapter_dir is None:
            raise readable(ConfigError(f"{result.run_dir}: this run saved no adapter"))
        try:
            if self.method == "full":
                return self.sessions.get(str(result.adapter_dir))
            return self.sessions.get(self.model, result.adapter_dir)
        except NbtunerError as exc:
            raise readable(exc)

    def base_session(self) -> Any:
        """Only for full fine-tunes, whose tuned model is a separate folder; else None."""
        return self.sessions.get(self.model) if self.method == "full" else None

    def chat(self, prompt: str, *, which: str | None = None, remember: bool = True) -> str:
        """One answer from the tuned model (``which="base"`` for the base model)."""
        if which == "base" and self.method == "full":
            return self.base_session().ask(prompt, remember=remember)
        return self.session().ask(prompt, which=which, remember=remember)

    def compare(self, prompts: str | Sequence[str]) -> Comparison:
        """Base and tuned answers to the same prompts, one base model in memory."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.method == "full":
            base = self.base_session().answer_all(prompts, "base")
            tuned = [type(a)(a.prompt, "tuned", a.answer) for a in self.session().answer_all(prompts)]
            return Comparison(zip(base, tuned))
        return Comparison(self.session().compare(prompts))

    def chat_widget(self, compare: bool = True) -> Any:
        from .widgets import ChatWidget

        return ChatWidget(self.session(), compare=compare, base_session=self.base_session())

    # ------------------------------------------------------------------ display
    def _rows(self) -> list[tuple[str, Any]]:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        steps = f"{self.step}/{self.total_steps}" if self.result is None and self.total_steps else self.step
        rows: list[tuple[str, Any]] = [("status", self.status), ("steps", steps), ("final loss", loss)]
        if self.probes:
            step, identity, leakage = self.probes[-1]
            rows.append(("identity / leakage", f"{identity:.0%} / {leakage:.0%} at step {step}"))
        if self.best_checkpoint:
            rows.append(("best checkpoint", self.best_checkpoint))
        if self.result is not None:
            rows += [("time", duration(self.result.elapsed_s)),
                     ("throughput", f"{self.result.tokens_per_s:.0f} tokens/s"),
                     ("run folder", self.result.run_dir), ("adapter", self.result.adapter_dir or "none"),
                     ("checkpoints", len(self.result.checkpoints))]
        elif self.run_dir is not None:
            rows.append(("run folder", self.run_dir))
        if self.error is not None:
            rows.append(("error", error_text(self.error)))
        return rows

    def __repr__(self) -> str:
        name = f" {self.name}" if self.name else ""
        keys = ("status", "steps", "final loss", "identity / leakage", "run folder", "adapter", "error")
        parts = ", ".join(f"{k}={v}" for k, v in self._rows() if k in keys)
        return f"NotebookRun{name}({parts})"

    def _repr_html_(self) -> str:
        parts = [f"<div class='nbtuner-run'><b>nbtuner run{' ' + esc(self.name) if self.name else ''}</b>",
                 kv_table(self._rows())]
        losses, val = self.losses, self.val_losses
        if losses:
            try:
                from .plot import loss_png

                parts.append(png_img_tag(loss_png(losses, val, probes=self.probes), width=420))
            except ImportError:  # matplotlib missing: the table is enough
                pass
        grouped = samples_by_step([s for s in self.samples if "kind" not in s])  # eval prompts, not probes
        if grouped:
            from .render import samples_table

            steps = sorted(grouped)
            parts.append(samples_table((steps[0], grouped[steps[0]]), (steps[-1], grouped[steps[-1]])))
        parts.append("</div>")
        return "".join(parts)
