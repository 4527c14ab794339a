"""Training events and the consumers that ship with the engine.

A display is any callable that takes an event: the console logger here, the JSONL writer the
run folder uses, and the notebook panel later all consume the same stream, so the engine never
knows who is watching. A consumer that raises is reported once and then ignored: a broken
display must not kill a training run.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO, Union

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainStarted:
    run_dir: str
    total_steps: int
    train_samples: int
    val_samples: int
    method: str
    device: str
    precision: str
    trainable_parameters: int


@dataclass(frozen=True)
class StepLogged:
    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    grad_norm: float | None = None


@dataclass(frozen=True)
class EvalLogged:
    step: int
    val_loss: float


@dataclass(frozen=True)
class SamplesGenerated:
    """Answers to the evaluation prompts at one step (step 0 is the untrained model)."""

    step: int
    answers: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ProbeLogged:
    """Identity and leakage rates on held-out probes at one step (step 0 is the base model)."""

    step: int
    identity_rate: float
    leakage_rate: float
    answers: tuple[tuple[str, str, str], ...]  # (prompt, "identity" | "general", answer)


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str


@dataclass(frozen=True)
class Notice:
    """Something the user should read (a warning about the data, a fallback taken)."""

    message: str


@dataclass(frozen=True)
class TrainFinished:
    status: str  # completed | stopped | interrupted | failed
    step: int
    run_dir: str
    adapter_dir: str | None
    final_loss: float | None
    elapsed_s: float
    error: str | None = None


Event = Union[TrainStarted, StepLogged, EvalLogged, SamplesGenerated, ProbeLogged, CheckpointSaved, Notice,
              TrainFinished]
Callback = Callable[[Event], None]


def event_record(event: Event) -> dict[str, Any]:
    """A JSON-ready dict with the event's type name, as stored in the run folder."""
    return {"event": type(event).__name__, **asdict(event)}


@dataclass
class Dispatcher:
    """Fans events out to consumers and isolates their failures."""

    callbacks: list[Callback] = field(default_factory=list)
    _broken: set[int] = field(default_factory=set)

    def __call__(self, event: Event) -> None:
        for cb in self.callbacks:
            if id(cb) in self._broken:
                continue
            try:
                cb(event)
            except Exception:  # noqa: BLE001 - a display must never stop training
                self._broken.add(id(cb))
                log.exception("training display %r failed and was switched off", cb)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}:{seconds % 60:02d}"


class ConsoleLogger:
    """Plain-text progress for terminals, CI logs and notebooks converted to text."""

    def __init__(self, stream: TextIO | None = None, every: int = 1) -> None:
        self.stream, self.every = stream or sys.stdout, max(1, every)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def __call__(self, event: Event) -> None:
        if isinstance(event, TrainStarted):
            self._print(f"training {event.method} on {event.device} ({event.precision}): {event.train_samples} "
                        f"samples, {event.total_steps} steps, {event.trainable_parameters / 1e6:.2f}M trainable "
                        f"parameters -> {event.run_dir}")
        elif isinstance(event, StepLogged):
            if event.step % self.every == 0 or event.step == event.total_steps:
                self._print(f"step {event.step}/{event.total_steps}  loss {event.loss:.4f}  lr {event.lr:.2e}  "
                            f"{event.tokens_per_s:.0f} tok/s  {_duration(event.elapsed_s)} elapsed, "
                            f"eta {_duration(event.eta_s)}")
        elif isinstance(event, EvalLogged):
            self._print(f"step {event.step}: validation loss {event.val_loss:.4f}")
        elif isinstance(event, SamplesGenerated):
            for prompt, answer in event.answers:
                self._print(f"  [step {event.step}] {prompt!r} -> {answer!r}")
        elif isinstance(event, ProbeLogged):
            self._print(f"step {event.step}: identity rate {event.identity_rate:.0%} on unseen identity questions, "
                        f"leakage rate {event.leakage_rate:.0%} on unrelated questions")
        elif isinstance(event, CheckpointSaved):
            self._print(f"checkpoint: {event.path}")
        elif isinstance(event, Notice):
            self._print(f"note: {event.message}")
        elif isinstance(event, TrainFinished):
            loss = f", final loss {event.final_loss:.4f}" if event.final_loss is not None else ""
            where = f"; adapter in {event.adapter_dir}" if event.adapter_dir else ""
            err = f": {event.error}" if event.error else ""
            self._print(f"training {event.status} at step {event.step} after {_duration(event.elapsed_s)}"
                        f"{loss}{where}{err}")


class JsonlWriter:
    """Appends step metrics to metrics.jsonl and sample answers to samples.jsonl in a run folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.metrics = Path(run_dir) / "metrics.jsonl"
        self.samples = Path(run_dir) / "samples.jsonl"

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def __call__(self, event: Event) -> None:
        if isinstance(event, (StepLogged, EvalLogged)):
            self._append(self.metrics, event_record(event))
        elif isinstance(event, ProbeLogged):
            record = event_record(event)
            record.pop("answers")
            self._append(self.metrics, record)
            for prompt, kind, answer in event.answers:
                self._append(self.samples, {"step": event.step, "prompt": prompt, "kind": kind, "answer": answer})
        elif isinstance(event, SamplesGenerated):
            for prompt, answer in event.answers:
                self._append(self.samples, {"step": event.step, "prompt": prompt, "answer": answer})
