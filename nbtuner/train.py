"""One fine-tuning run: validate, set up, train with transformers' Trainer, save, record.

Lifecycle (fixed, like torchtune's recipes): data is read and checked before a model is loaded
or a folder is created; the run folder then gets the resolved config, metrics and sample answers
as they happen, checkpoints (all kept: LoRA checkpoints are small and users roll back to one
from before overfitting), the final adapter and a run record. A stop request (the stop event,
Ctrl-C once in a terminal) ends the run after the current step with a checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

from . import events as ev
from .config import FinetuneConfig
from .data.identity import PERSONA_SIDECAR
from .errors import ConfigError, DataError, OutputExistsError

DEFAULT_REPLAY_RATIO = 0.8  # measured on SmolLM2: 0.3 left 35% leakage, 0.6 10-20%, 0.8 0-15% (BENCHMARKS.md)



@dataclass
class TrainResult:
    """What a run produced; also what `%%finetune -o run` binds in a notebook."""

    run_dir: Path
    status: str
    config: dict[str, Any]
    adapter_dir: Path | None = None
    steps: int = 0
    final_loss: float | None = None
    elapsed_s: float = 0.0
    tokens_per_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    probes: list[tuple[int, float, float]] = field(default_factory=list)  # (step, identity, leakage)
    best_checkpoint: str | None = None
    persona: str | None = None

    @classmethod
    def load(cls, run_dir: str | Path) -> "TrainResult":
        """Rebuilds the result from a run folder, so earlier runs stay usable after a restart."""
        run_dir = Path(run_dir)
        record_path = run_dir / "run.json"
        if not record_path.is_file():
            raise ConfigError(f"{run_dir}: not an nbtuner run folder (no run.json)")
        record = json.loads(record_path.read_text(encoding="utf-8"))
        losses, val_losses, probes = [], [], []
        for line in _read_lines(run_dir / "metrics.jsonl"):
            if line["event"] == "StepLogged":
                losses.append((line["step"], line["loss"]))
            elif line["event"] == "EvalLogged":
                val_losses.append((line["step"], line["val_loss"]))
            elif line["event"] == "ProbeLogged":
                probes.append((line["step"], line["identity_rate"], line["leakage_rate"]))
        samples = list(_read_lines(run_dir / "samples.jsonl"))
        adapter = run_dir / "adapter"
        return cls(run_dir, record["status"], record["config"], adapter if adapter.is_dir() else None,
                   record.get("steps", 0), record.get("final_loss"), record.get("elapsed_s", 0.0),
                   record.get("tokens_per_s", 0.0), losses, val_losses, samples, list_checkpoints(run_dir), probes,
                   record.get("best_checkpoint"), record.get("persona"))

    def convert(self, out: str | Path | None = None, checkpoint: str | Path | None = None,
                force: bool = False) -> Any:
        """A clean adapter folder from the final adapter or a chosen checkpoint."""
        from .export import convert

        source = checkpoint or self.adapter_dir or (self.checkpoints[-1] if self.checkpoints else None)
        if source is None:
            raise ConfigError(f"{self.run_dir}: this run has no adapter or checkpoint to convert")
        return convert(source, out or self.run_dir / "hf_adapter", force=force)

    def merge(self, out: str | Path | None = None, max_shard_size: str = "2GB", force: bool = False) -> Any:
        from .export import merge

        if self.adapter_dir is None:
            raise ConfigError(f"{self.run_dir}: this run has no adapter to merge")
        return merge(self.base_model, self.adapter_dir, out or self.run_dir / "merged",
                     max_shard_size=max_shard_size, force=force)

    @property
    def base_model(self) -> str:
        """The base spec, or the folder it resolved to when the spec was a relative path that no
        longer resolves from the current directory."""
        spec = str(self.config["model"])
        record = json.loads((self.run_dir / "run.json").read_text(encoding="utf-8"))
        relative = spec.startswith(".") or (os.sep in spec and not os.path.isabs(spec))
        if relative and not Path(spec).exists() and record.get("model_path"):
            return record["model_path"]
        return spec

    def report(self, persona: str | None = None, checkpoint: str | Path | None = None) -> Any:
        """Before/after identity report on held-out probes; also written into the run folder."""
        from .chat import GenerationSettings, open_chat
        from .evaluate import evaluate_identity, general_probes

        name = persona or self.persona
        if not name:
            raise ConfigError("no persona name for this run: pass persona='NAME'")
        adapter = checkpoint or self.adapter_dir
        if adapter is None:
            raise ConfigError(f"{self.run_dir}: this run has no adapter to evaluate")
        session = open_chat(self.base_model, str(adapter), system=self.config.get("system"),
                            settings=GenerationSettings(max_new_tokens=self.config.get("eval_max_new_tokens", 48)))
        result = evaluate_identity(session, name, general=general_probes(extra=self.config.get("extra_probes") or ()))
        result.val_loss = self.val_losses[-1][1] if self.val_losses else None
        result.save(self.run_dir)
        return result

    def __repr__(self) -> str:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        probe = (f", identity {self.probes[-1][1]:.0%} / leakage {self.probes[-1][2]:.0%}" if self.probes else "")
        return (f"TrainResult({self.status}, {self.steps} steps, final loss {loss}{probe}, "
                f"{self.tokens_per_s:.0f} tok/s, run_dir='{self.run_dir}')")

    def _repr_html_(self) -> str:
        from html import escape

        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        rows = [("status", self.status), ("steps", self.steps), ("final loss", loss),
                ("time", f"{self.elapsed_s:.0f} s"), ("throughput", f"{self.tokens_per_s:.0f} tokens/s"),
                ("run folder", self.run_dir), ("adapter", self.adapter_dir or "none"),
                ("checkpoints", len(self.checkpoints))]
        if self.probes:
            step, ident, leak = self.probes[-1]
            rows += [("identity rate (unseen questions)", f"{ident:.0%} at step {step}"),
                     ("leakage rate (unrelated questions)", f"{leak:.0%}"),
                     ("best checkpoint", self.best_checkpoint or "n/a")]
        body = "".join(f"<tr><th style='text-align:left'>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>"
                       for k, v in rows)
        return f"<table>{body}</table>"


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)


def list_checkpoints(run_dir: str | Path) -> list[str]:
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir()] if folder.is_dir() else []
    return [str(p) for p in sorted(found, key=lambda p: int(p.name.split("-")[1]))]


def _resolve_method(method: str) -> str:
    from .models import default_method

    return default_method() if method == "auto" else method


def _prepare_run_dir(cfg: FinetuneConfig, force: bool) -> Path:
    if cfg.resume_from:
        checkpoint = Path(cfg.resume_from)
        if not (checkpoint / "trainer_state.json").is_file():
            raise ConfigError(f"{checkpoint}: not a training checkpoint (no trainer_state.json)")
        run_dir = Path(cfg.out) if cfg.out else checkpoint.parent.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise OutputExistsError(f"{run_dir}: run folder exists and is not empty; pick another --out, "
                                    "resume with resume_from=CHECKPOINT, or pass --force to replace it")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _split(items: list[Any], ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    if ratio <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = min(len(items) - 1, max(1, round(len(items) * ratio)))
    val = {i for i in order[:n_val]}
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


@contextlib.contextmanager
def stop_on_sigint(stop_event: threading.Event) -> Iterator[None]:
    """First Ctrl-C asks for a graceful stop (checkpoint after this step); a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if stop_event.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop_event.set()
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", flush=True)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    result = {}
    for name in ("nbtuner", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            result[name] = version(name)
        except PackageNotFoundError:
            pass
    return result


def _save_adapter(model: Any, target: Path, meta: dict[str, Any], full: bool, tokenizer: Any) -> Path:
    """Writes into a temporary sibling and renames, so a crash never leaves half an adapter."""
    from .export import ADAPTER_META_FILE, move_into_place, temp_sibling, write_adapter_card

    tmp = temp_sibling(target)
    try:
        model.save_pretrained(tmp)
        if full:
            tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        write_adapter_card(tmp, meta)
        move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _bridge(cfg: FinetuneConfig, emit: ev.Dispatcher, stop_event: threading.Event, tokenizer: Any,
            run_dir: Path, started: dict[str, Any], persona: str | None) -> Any:
    """Translates Trainer callbacks into nbtuner events; checks the stop event after each step."""
    from transformers import TrainerCallback

    from .chat import GenerationSettings, answer_prompts

    from .evaluate import general_probes, identity_probes, rate

    settings = GenerationSettings(max_new_tokens=cfg.eval_max_new_tokens)
    id_probes, gen_probes = identity_probes(), general_probes(extra=cfg.extra_probes)
    watcher = EarlyStop(cfg.identity_target, cfg.leakage_max)
    started["probes"] = watcher

    class Bridge(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.tokens0 = 0
            self.last_sampled = -1
            self.generating_s = 0.0  # sample answers and probes: not training, so not in tokens/s

        def evaluate(self, model: Any, step: int) -> str | None:
            """Sample answers and identity/leakage probes at this step, in one generation batch
            (generation pays per new token, so one batch costs about what the probes alone did).
            Returns why training should stop, if it should."""
            samples = list(cfg.eval_prompts) if cfg.eval_prompts and step != self.last_sampled else []
            probes = id_probes + gen_probes if persona and step not in watcher.steps else []
            if not samples and not probes:
                return None
            t0 = time.perf_counter()
            answers = answer_prompts(model, tokenizer, samples + probes, settings, cfg.system)
            self.generating_s += time.perf_counter() - t0
            started["generating_s"] = self.generating_s
            if samples:
                self.last_sampled = step
                emit(ev.SamplesGenerated(step, tuple(zip(samples, answers))))
            if not probes:
                return None
            answers = answers[len(samples):]
            ident, gen = answers[:len(id_probes)], answers[len(id_probes):]
            kinds = ["identity"] * len(ident) + ["general"] * len(gen)
            event = ev.ProbeLogged(step, rate(ident, persona), rate(gen, persona), tuple(zip(probes, kinds, answers)))
            emit(event)
            return watcher.update(step, event.identity_rate, event.leakage_rate)

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            self.t0 = time.perf_counter()
            self.tokens0 = state.num_input_tokens_seen
            emit(ev.TrainStarted(str(run_dir), state.max_steps, started["train"], started["val"],
                                 started["method"], started["device"], started["precision"], started["trainable"]))
            if cfg.eval_steps > 0 and state.global_step == 0:
                self.evaluate(model, 0)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if stop_event.is_set():
                control.should_training_stop = True
                control.should_save = True
                started["stopped"] = True
            if cfg.eval_steps > 0 and state.global_step % cfg.eval_steps == 0:
                reason = self.evaluate(model, state.global_step)
                if watcher.best_step == state.global_step:
                    control.should_save = True  # the best checkpoint must exist on disk
                if reason and cfg.early_stop:
                    emit(ev.Notice(f"early stop at step {state.global_step}: {reason}"))
                    control.should_training_stop = True
                    control.should_save = True
            if persona and started["method"] != "full" and state.global_step >= state.max_steps:
                control.should_save = True  # adapter/ may get an earlier step: keep the last one too

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" in logs:
                elapsed = time.perf_counter() - self.t0
                done = max(state.global_step, 1)
                tokens = state.num_input_tokens_seen - self.tokens0
                training_s = elapsed - self.generating_s
                emit(ev.StepLogged(state.global_step, state.max_steps, float(state.epoch or 0), float(logs["loss"]),
                                   float(logs.get("learning_rate", 0.0)), tokens / training_s if training_s > 0 else 0.0,
                                   elapsed, elapsed / done * (state.max_steps - state.global_step),
                                   float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None))
            if "eval_loss" in logs:
                emit(ev.EvalLogged(state.global_step, float(logs["eval_loss"])))
                reason = watcher.update_val_loss(state.global_step, float(logs["eval_loss"]))
                if reason and cfg.early_stop:
                    emit(ev.Notice(f"early stop at step {state.global_step}: {reason}"))
                    control.should_training_stop = True
                    control.should_save = True

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            emit(ev.CheckpointSaved(state.global_step, str(path)))

        def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
            if cfg.eval_steps > 0:
                self.evaluate(model, state.global_step)

    return Bridge()


@dataclass
class EarlyStop:
    """Tracks identity and leakage rates; picks the best step and says when to stop.

    Best: the target identity rate with the least leakage, else the highest identity-minus-leakage.
    Stop: the identity target is met with leakage within bounds, or, once the target has been
    met at an earlier probe, leakage rises past its bound or the validation loss turns up. The
    probe that first reaches the target never stops on leakage alone: right after the name is
    learned, replay is still pulling unrelated answers back (measured: 15% leakage at step 20,
    5% at step 40 on SmolLM2).
    """

    identity_target: float
    leakage_max: float
    steps: dict[int, tuple[float, float]] = field(default_factory=dict)
    best_step: int | None = None
    val_losses: list[float] = field(default_factory=list)

    def _score(self, step: int) -> tuple[int, float]:
        ident, leak = self.steps[step]
        good = ident >= self.identity_target and leak <= self.leakage_max
        return (1 if good else 0, ident - leak)

    @property
    def target_met(self) -> bool:
        return any(i >= self.identity_target for i, _ in self.steps.values())

    def update(self, step: int, identity: float, leakage: float) -> str | None:
        previous = self.steps[max(self.steps)] if self.steps else None
        met_before = self.target_met  # leakage "rising" compares against a step that had the identity
        self.steps[step] = (identity, leakage)
        if step > 0 and (self.best_step is None or self._score(step) > self._score(self.best_step)):
            self.best_step = step
        if step == 0:
            return None
        if identity >= self.identity_target and leakage <= self.leakage_max:
            return f"identity rate {identity:.0%} reached the target with leakage {leakage:.0%}"
        if met_before and previous and leakage > self.leakage_max and leakage > previous[1]:
            return f"leakage rose to {leakage:.0%} after the identity target was met"
        return None

    def update_val_loss(self, step: int, loss: float) -> str | None:
        rising = bool(self.val_losses) and loss > self.val_losses[-1]
        self.val_losses.append(loss)
        if rising and self.target_met:
            return f"validation loss turned up ({self.val_losses[-2]:.3f} -> {loss:.3f})"
        return None


def prepare_data(cfg: FinetuneConfig, tokenizer: Any) -> tuple[list[Any], list[Any], list[str], str]:
    """Reads, tokenises and splits the data; returns train, val, notices and the data fingerprint."""
    from .data import fingerprint, load_conversations, tokenize_dataset

    conversations = load_conversations(cfg.data, cfg.data_format)
    samples = tokenize_dataset(conversations, tokenizer, cfg.max_length, cfg.system, file=cfg.data)
    notices = []
    empty = [i for i, s in enumerate(samples) if s.n_trainable == 0]
    if len(empty) == len(samples):
        raise DataError(f"no record has any assistant token left to learn from within max_length="
                        f"{cfg.max_length}; raise max_length or check the data", file=cfg.data)
    if empty:
        notices.append(f"{len(empty)} record(s) have no trainable tokens within max_length={cfg.max_length} and "
                       f"are skipped (first: record {empty[0]})")
    truncated = sum(s.truncated for s in samples)
    if truncated:
        notices.append(f"{truncated} record(s) were truncated at max_length={cfg.max_length}")
    kept = [{"input_ids": s.input_ids, "labels": s.labels, "attention_mask": [1] * len(s.input_ids)}
            for s in samples if s.n_trainable > 0]
    train, val = _split(kept, cfg.val_ratio, cfg.seed)
    return train, val, notices, fingerprint(conversations)


def run_finetune(cfg: FinetuneConfig, callbacks: Iterable[ev.Callback] = (),
                 stop_event: threading.Event | None = None, *, force: bool = False) -> TrainResult:
    """Trains an adapter (or the full model) as `cfg` says and returns what it produced."""
    if not cfg.data:
        raise ConfigError("no training data: pass --data FILE (or data: in the config)")
    from .data import load_conversations

    load_conversations(cfg.data, cfg.data_format)  # fail on bad records before anything heavy happens
    from .models import (compute_dtype, device_kind, disable_4bit_cpu_repacking, load_model, load_tokenizer,
                         resolve_model)

    method = _resolve_method(cfg.method)
    resolved = resolve_model(cfg.model)
    tokenizer = load_tokenizer(resolved, cfg.trust_remote_code)
    train_set, val_set, notices, data_hash = prepare_data(cfg, tokenizer)
    run_dir = _prepare_run_dir(cfg, force)
    stop_event = stop_event or threading.Event()
    emit = ev.Dispatcher([ev.JsonlWriter(run_dir), *callbacks])
    for notice in notices:
        emit(ev.Notice(notice))

    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "method": method}, allow_unicode=True,
                                                        sort_keys=False), encoding="utf-8")
    record: dict[str, Any] = {"status": "running", "config": {**cfg.to_dict(), "method": method},
                              "model_path": resolved.path, "data_sha256": data_hash, "versions": _versions(),
                              "started": datetime.now(timezone.utc).isoformat(), "train_samples": len(train_set),
                              "val_samples": len(val_set)}
    _write_record(run_dir, record)

    from transformers import set_seed

    set_seed(cfg.seed)
    persona = persona_for(cfg)
    ratio = replay_ratio_for(cfg, persona)
    if ratio > 0 and not cfg.resume_from:
        train_set = _add_replay(cfg, tokenizer, resolved, method, train_set, ratio, emit)
        record["train_samples"] = len(train_set)
    model = load_model(resolved, quantize_4bit=method == "qlora", precision=cfg.precision,
                       trust_remote_code=cfg.trust_remote_code, for_training=True, train_all_weights=method == "full")
    disable_4bit_cpu_repacking(model)  # before the first eval-mode forward (the step-0 samples)
    model, trainer, started = _build_trainer(cfg, method, model, tokenizer, train_set, val_set, run_dir, emit,
                                             stop_event, persona)
    status, error = "completed", None
    t0 = time.perf_counter()
    try:
        with stop_on_sigint(stop_event):
            trainer.train(resume_from_checkpoint=cfg.resume_from)
        if started.get("stopped"):
            status = "stopped"
    except KeyboardInterrupt:
        status = "interrupted"
        step = trainer.state.global_step
        checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
        trainer.save_model(str(checkpoint))
        trainer.state.save_to_json(str(checkpoint / "trainer_state.json"))
        emit(ev.CheckpointSaved(step, str(checkpoint)))
    except Exception as exc:
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        record.update(status=status, error=error)
        _write_record(run_dir, record)
        emit(ev.TrainFinished(status, trainer.state.global_step, str(run_dir), None, None,
                              time.perf_counter() - t0, error))
        raise
    elapsed = time.perf_counter() - t0
    generating = started.get("generating_s", 0.0)  # probes and sample answers, inside `elapsed`
    state = trainer.state
    losses = [(h["step"], h["loss"]) for h in state.log_history if "loss" in h]
    final_loss = losses[-1][1] if losses else None
    tokens = state.num_input_tokens_seen
    meta = {"base_model": cfg.model, "base_path": resolved.path, "method": method, "lora_r": cfg.lora_r,
            "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout, "target_modules": cfg.target_modules,
            "status": status, "steps": state.global_step, "epochs": round(float(state.epoch or 0), 3),
            "lr": cfg.lr, "batch_size": cfg.batch_size * cfg.grad_accum, "max_length": cfg.max_length,
            "data": str(cfg.data), "data_sha256": data_hash, "train_samples": len(train_set),
            "final_loss": final_loss, "system": cfg.system}
    watcher = started.get("probes")
    best = None
    if watcher is not None and watcher.best_step is not None:
        best = run_dir / "checkpoints" / f"checkpoint-{watcher.best_step}"
        record.update(best_step=watcher.best_step, best_checkpoint=str(best) if best.is_dir() else None,
                      probe_rates={str(k): v for k, v in watcher.steps.items()}, persona=persona)
    meta["step"] = state.global_step
    if status == "completed" and method != "full" and best is not None and watcher.best_step != state.global_step:
        meta["step"] = restore_best_adapter(model, best, watcher, state.global_step, emit)
    record["adapter_step"] = meta["step"]
    target = run_dir / ("model" if method == "full" else "adapter")
    adapter_dir = _save_adapter(model, target, meta, method == "full", tokenizer)
    training_s = elapsed - generating
    record.update(status=status, steps=state.global_step, final_loss=final_loss, elapsed_s=round(elapsed, 2),
                  generating_s=round(generating, 2), tokens=tokens,
                  tokens_per_s=round(tokens / training_s, 1) if training_s > 0 else 0.0,
                  adapter_dir=str(adapter_dir), finished=datetime.now(timezone.utc).isoformat())
    _write_record(run_dir, record)
    emit(ev.TrainFinished(status, state.global_step, str(run_dir), str(adapter_dir), final_loss, elapsed))
    result = TrainResult.load(run_dir)
    if status == "interrupted":
        raise KeyboardInterrupt(f"training interrupted; checkpoint and adapter saved in {run_dir}")
    return result


def restore_best_adapter(model: Any, checkpoint: Path, watcher: "EarlyStop", last_step: int,
                         emit: ev.Dispatcher) -> int:
    """Puts the best probe step's LoRA weights back before the adapter is saved.

    Without this, a run that went on past its best step (leakage rising at the last probe, say)
    would ship its last weights and only mention the better checkpoint in run.json; the adapter
    that Convert, Merge and chat pick up by default should be the one the probes chose.
    """
    from peft import load_peft_weights, set_peft_model_state_dict

    step = watcher.best_step
    if not checkpoint.is_dir():
        emit(ev.Notice(f"the best probe step ({step}) has no checkpoint on disk; adapter/ holds step {last_step}"))
        return last_step
    set_peft_model_state_dict(model, load_peft_weights(str(checkpoint)))
    ident, leak = watcher.steps[step]
    emit(ev.Notice(f"adapter/ holds step {step}, the best probe step (identity {ident:.0%}, leakage {leak:.0%}); "
                   f"the last step's weights stay in checkpoints/"))
    return step


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    tmp = run_dir / "run.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
    os.replace(tmp, run_dir / "run.json")


def persona_for(cfg: FinetuneConfig) -> str | None:
    """The persona name to measure: set in the config, or recorded by `nbtuner data identity`."""
    if cfg.persona:
        return cfg.persona
    sidecar = Path(str(cfg.data) + PERSONA_SIDECAR)
    if sidecar.is_file():
        return json.loads(sidecar.read_text(encoding="utf-8")).get("persona")
    return None


def replay_ratio_for(cfg: FinetuneConfig, persona: str | None) -> float:
    """Replay is on by default for identity data, where parroting is the known failure."""
    if cfg.replay_ratio is not None:
        return cfg.replay_ratio
    return DEFAULT_REPLAY_RATIO if persona else 0.0


def _add_replay(cfg: FinetuneConfig, tokenizer: Any, resolved: Any, method: str, train_set: list,
                ratio: float, emit: ev.Dispatcher) -> list:
    from .data import tokenize_dataset
    from .models import load_model
    from .replay import base_answers, mix, replay_prompts

    prompts = cfg.replay_prompts or replay_prompts()
    emit(ev.Notice(f"replay: the base model answers {len(prompts)} general prompts (cached after the first run)"))
    t0 = time.perf_counter()
    def inference_copy() -> Any:
        return load_model(resolved, quantize_4bit=method == "qlora", precision=cfg.precision,
                          trust_remote_code=cfg.trust_remote_code)

    conversations = base_answers(inference_copy, tokenizer, prompts, model_key=f"{resolved.path}|{method}",
                                 system=cfg.system, max_new_tokens=cfg.replay_max_new_tokens)
    samples = [{"input_ids": s.input_ids, "labels": s.labels, "attention_mask": [1] * len(s.input_ids)}
               for s in tokenize_dataset(conversations, tokenizer, cfg.max_length, cfg.system) if s.n_trainable]
    mixed = mix(train_set, samples, ratio, cfg.seed)
    emit(ev.Notice(f"replay: {len(mixed) - len(train_set)} samples of the base model's own answers to "
                   f"{len(samples)} general prompts mixed in (ratio {ratio:g}; {time.perf_counter() - t0:.0f} s)"))
    return mixed


def _build_trainer(cfg: FinetuneConfig, method: str, model: Any, tokenizer: Any, train_set: list, val_set: list,
                   run_dir: Path, emit: ev.Dispatcher, stop_event: threading.Event, persona: str | None
                   ) -> tuple[Any, Any, dict]:
    import torch
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainingArguments

    from .models import compute_dtype, device_kind
    from .quiet import hide_known_deprecations

    hide_known_deprecations()
    device = device_kind()
    dtype = compute_dtype(cfg.precision, device)
    if method in ("qlora", "lora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    args = TrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr, lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, logging_steps=cfg.logging_steps,
        save_strategy="steps" if cfg.save_steps > 0 else "no", save_steps=max(cfg.save_steps, 1),
        eval_strategy="steps" if val_set else "no", eval_steps=max(cfg.eval_steps, 1) if val_set else None,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu", seed=cfg.seed,
        report_to=[], disable_tqdm=True, include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False, dataloader_num_workers=0, save_only_model=False,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    started = {"train": len(train_set), "val": len(val_set), "method": method, "device": device,
               "precision": precision, "trainable": trainable}
    bridge = _bridge(cfg, emit, stop_event, tokenizer, run_dir, started, persona)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set or None,
                      data_collator=collator, callbacks=[bridge])
    trainer.remove_callback(PrinterCallback)  # our events carry the logs; no raw dicts on stdout
    return model, trainer, started
