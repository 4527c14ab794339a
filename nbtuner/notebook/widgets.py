"""The live training panel and the chat widget.

Both keep their state in plain Python and render it in one place (``refresh``/``_render``):
training events arrive on the worker thread and only record what happened; the thread that
waits for training (the cell's main thread, or a ticker in background mode) turns that state
into widget values, at most a few times a second for text and about once a second for the loss
plot (each PNG redraw costs 20-45 ms). Model output is untrusted: it is escaped before it
goes into any HTML.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from .. import events as ev
from ..errors import MissingDependencyError, NbtunerError

try:
    import ipywidgets as W
except ImportError:  # text-only panels still work; widgets say what to install
    W = None


def _require_widgets() -> None:
    if W is None:
        raise MissingDependencyError("notebook widgets need ipywidgets: pip install 'nbtuner[notebook]'")
from .render import duration as _duration, error_html, esc, samples_table

_BOX = "border:1px solid #d4d4d8;border-radius:6px;padding:6px 8px;margin:2px 0;white-space:pre-wrap"


class TrainingPanel:
    """An event consumer that shows a run live and offers Stop, then Convert, Merge and Chat.

    With ``widgets=False`` it prints the engine's console lines instead (terminals, CI logs).
    ``run`` is the :class:`~nbtuner.notebook.run.NotebookRun` the buttons act on.
    """

    def __init__(self, run: Any = None, stop_event: threading.Event | None = None, *, widgets: bool = True,
                 plot_interval: float = 1.0, text_interval: float = 0.25, log_every: int = 1) -> None:
        self.run = run
        self.stop_event = stop_event or (run.stop_event if run is not None else threading.Event())
        self.widgets = widgets
        self.plot_interval, self.text_interval = plot_interval, text_interval
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()
        # state, written by events (worker thread), read by refresh
        self.started: ev.TrainStarted | None = None
        self.last: ev.StepLogged | None = None
        self.train_losses: list[tuple[int, float]] = []
        self.val_losses: list[tuple[int, float]] = []
        self.probes: list[tuple[int, float, float]] = []  # (step, identity rate, leakage rate)
        self.first_samples: tuple[int, tuple[tuple[str, str], ...]] | None = None
        self.last_samples: tuple[int, tuple[tuple[str, str], ...]] | None = None
        self.notices: list[str] = []
        self.checkpoints: list[str] = []
        self.finished: ev.TrainFinished | None = None
        self.error: str | None = None
        self._version = 0
        self._shown_text = self._shown_plot = -1
        self._plot_points = 0
        self._last_text = self._last_plot = float("-inf")
        self._finished_shown = False
        self.plot_renders = 0
        self._plot_cost = 0.0
        self.console = None if widgets else ev.ConsoleLogger(every=log_every)
        self._plot = None
        if widgets:
            self._build()

    # ------------------------------------------------------------------ events (worker thread)
    def __call__(self, event: ev.Event) -> None:
        with self._lock:
            if isinstance(event, ev.TrainStarted):
                self.started = event
            elif isinstance(event, ev.StepLogged):
                self.last = event
                self.train_losses.append((event.step, event.loss))
            elif isinstance(event, ev.EvalLogged):
                self.val_losses.append((event.step, event.val_loss))
            elif isinstance(event, ev.SamplesGenerated):
                if self.first_samples is None:
                    self.first_samples = (event.step, event.answers)
                self.last_samples = (event.step, event.answers)
            elif isinstance(event, ev.ProbeLogged):
                self.probes.append((event.step, event.identity_rate, event.leakage_rate))
            elif isinstance(event, ev.Notice):
                self.notices.append(event.message)
            elif isinstance(event, ev.CheckpointSaved):
                self.checkpoints.append(event.path)
            elif isinstance(event, ev.TrainFinished):
                self.finished = event
            self._version += 1
        if self.console is not None:
            self.console(event)

    def fail(self, exc: BaseException) -> None:
        """The run raised before or during training (bad data, a crash)."""
        with self._lock:
            self.error = str(exc) if isinstance(exc, NbtunerError) else f"{type(exc).__name__}: {exc}"
            self._version += 1

    # ------------------------------------------------------------------ widgets
    def _build(self) -> None:
        _require_widgets()
        self.title = W.HTML("<b>nbtuner</b>: preparing data and model…")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", bar_style="info",
                                      layout=W.Layout(width="60%"))
        self.progress_label = W.HTML("")
        self.stats = W.HTML("")
        self.image = W.Image(format="png", layout=W.Layout(width="480px"))
        self.image.layout.display = "none"
        self.samples = W.HTML("")
        self.probes_html = W.HTML("")
        self.notices_html = W.HTML("")
        self.stop_button = W.Button(description="Stop", icon="stop", button_style="warning",
                                    tooltip="stop after the current step and save a checkpoint")
        self.stop_button.on_click(lambda _: self.stop())
        # shown when training has ended
        self.convert_button = W.Button(description="Convert", icon="file-export",
                                       tooltip="write a clean PEFT adapter folder (run/hf_adapter)")
        self.merge_button = W.Button(description="Merge", icon="compress",
                                     tooltip="merge the adapter into the base model and verify it")
        self.merge_out = W.Text(placeholder="output folder (default: run/merged)", description="merge into",
                                layout=W.Layout(width="380px"))
        self.shard_size = W.Text(value="2GB", description="shard size", layout=W.Layout(width="170px"))
        self.overwrite = W.Checkbox(value=False, description="replace existing output", indent=False)
        self.chat_button = W.Button(description="Chat", icon="comments",
                                    tooltip="compare base and tuned answers side by side")
        self.convert_button.on_click(lambda _: self.convert())
        self.merge_button.on_click(lambda _: self.merge())
        self.chat_button.on_click(lambda _: self.open_chat())
        self.export_output = W.HTML("")
        self.chat_box = W.VBox([])
        self.after = W.VBox([
            W.HBox([self.convert_button, self.chat_button]),
            W.HBox([self.merge_button, self.merge_out, self.shard_size]),
            self.overwrite, self.export_output, self.chat_box])
        self.after.layout.display = "none"
        self.widget = W.VBox([self.title, W.HBox([self.progress, self.progress_label]), self.stats,
                              self.probes_html, self.image, self.notices_html, self.samples, self.stop_button,
                              self.after])

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        if not self.widgets:
            return {"text/plain": repr(self)}
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        with self._lock:
            last, finished = self.last, self.finished
        if finished is not None:
            return f"TrainingPanel({finished.status} at step {finished.step})"
        if last is not None:
            return f"TrainingPanel(step {last.step}/{last.total_steps}, loss {last.loss:.4f})"
        return "TrainingPanel(waiting)"

    def stop(self) -> None:
        """What the Stop button does: the engine stops after this step and saves a checkpoint."""
        self.stop_event.set()
        if self.widgets:
            self.stop_button.disabled = True
            self.stop_button.description = "Stopping…"
        with self._lock:
            self._version += 1

    # ------------------------------------------------------------------ rendering (one place)
    def refresh(self, force: bool = False) -> None:
        """Turns the recorded state into widget values; cheap when nothing changed."""
        if not self.widgets:
            return
        now = time.monotonic()
        with self._lock:
            version = self._version
            if not force and version == self._shown_text and not self._plot_pending():
                return
            text_due = force or (version != self._shown_text and now - self._last_text >= self.text_interval)
            # at most one redraw per plot_interval, and never more than ~5% of the time drawing
            interval = max(self.plot_interval, 20 * self._plot_cost)
            plot_due = self._plot_pending() and (force or now - self._last_plot >= interval)
            snap = dict(started=self.started, last=self.last, train=list(self.train_losses),
                        val=list(self.val_losses), probes=list(self.probes), first=self.first_samples,
                        latest=self.last_samples,
                        notices=list(self.notices), finished=self.finished, error=self.error)
        if not (text_due or plot_due):
            return
        if not self._render_lock.acquire(blocking=force):
            return
        try:
            if text_due:
                self._render_text(**snap)
                self._shown_text, self._last_text = version, now
            if plot_due:
                self._render_plot(snap["train"], snap["val"], snap["probes"], snap["started"])
                self._last_plot = now
        finally:
            self._render_lock.release()

    def _plot_pending(self) -> bool:
        return len(self.train_losses) + len(self.val_losses) + len(self.probes) != self._plot_points

    def _render_plot(self, train: list, val: list, probes: list, started: ev.TrainStarted | None) -> None:
        if not train and not val:
            return
        if self._plot is None:
            from .plot import LossPlot

            self._plot = LossPlot()
        t0 = time.perf_counter()
        self.image.value = self._plot.png(train, val, started.total_steps if started else None, probes)
        self._plot_cost = time.perf_counter() - t0
        self.image.layout.display = None
        self._plot_points = len(train) + len(val) + len(probes)
        self.plot_renders += 1

    def _render_text(self, started: ev.TrainStarted | None, last: ev.StepLogged | None, train: list, val: list,
                     probes: list, first: Any, latest: Any, notices: list[str], finished: ev.TrainFinished | None,
                     error: str | None) -> None:
        if started is not None:
            self.title.value = (f"<b>nbtuner</b>: {esc(started.method)} on {esc(started.device)} "
                                f"({esc(started.precision)}), {started.train_samples} training samples"
                                f"{f', {started.val_samples} validation' if started.val_samples else ''}, "
                                f"{started.trainable_parameters / 1e6:.2f}M trainable parameters "
                                f"&rarr; <code>{esc(started.run_dir)}</code>")
            self.progress.max = max(started.total_steps, 1)
        if last is not None:
            self.progress.max = max(last.total_steps, 1)
            self.progress.value = min(last.step, self.progress.max)
            if finished is None:  # once finished, the label holds the final status (_show_finished)
                self.progress_label.value = (f"step {last.step}/{last.total_steps} &middot; epoch {last.epoch:.2f} "
                                             f"&middot; {_duration(last.elapsed_s)} elapsed &middot; "
                                             f"ETA {_duration(last.eta_s)}")
            val_text = f" &middot; validation loss {val[-1][1]:.4f}" if val else ""
            self.stats.value = (f"loss <b>{last.loss:.4f}</b>{val_text} &middot; learning rate {last.lr:.2e} "
                                f"&middot; {last.tokens_per_s:.0f} tokens/s")
        if probes:
            step, identity, leakage = probes[-1]
            before = f" (before training {probes[0][1]:.0%} / {probes[0][2]:.0%})" if probes[0][0] == 0 and step else ""
            self.probes_html.value = (f"step {step}: identity <b>{identity:.0%}</b> on unseen identity questions "
                                      f"&middot; leakage <b>{leakage:.0%}</b> on unrelated questions{before}")
        if notices:
            self.notices_html.value = ("<ul style='color:#b45309;margin:2px 0'>"
                                       + "".join(f"<li>{esc(n)}</li>" for n in notices) + "</ul>")
        self.samples.value = samples_table(first, latest)
        if error is not None and finished is None:
            self.title.value = f"<b>nbtuner</b>: training failed: {esc(error)}"
            self.progress.bar_style = "danger"
            self.stop_button.layout.display = "none"
        if finished is not None and not self._finished_shown:
            self._show_finished(finished)
        # Convert, Merge and Chat act on the run's result, which exists only once the run is done
        if self.run is not None and self.run.done and self.run.adapter_dir is not None:
            self.after.layout.display = None
        if self.stop_event.is_set() and finished is None and self.widgets:
            self.stop_button.disabled = True
            self.stop_button.description = "Stopping…"

    def _show_finished(self, finished: ev.TrainFinished) -> None:
        self._finished_shown = True
        style = {"completed": "success", "stopped": "warning"}.get(finished.status, "danger")
        self.progress.bar_style = style
        loss = f", final loss {finished.final_loss:.4f}" if finished.final_loss is not None else ""
        err = f": {esc(finished.error)}" if finished.error else ""
        where = f"; adapter in <code>{esc(finished.adapter_dir)}</code>" if finished.adapter_dir else ""
        self.progress_label.value = (f"<b>{esc(finished.status)}</b> at step {finished.step} after "
                                     f"{_duration(finished.elapsed_s)}{loss}{err}{where}")
        self.stop_button.layout.display = "none"
        if finished.adapter_dir and not self.merge_out.value:
            self.merge_out.placeholder = f"default: {finished.run_dir}/merged"

    # ------------------------------------------------------------------ post-training actions
    def _act(self, label: str, action: Callable[[], Any]) -> Any:
        self.export_output.value = f"<i>{esc(label)}…</i>"
        try:
            result = action()
        except Exception as exc:  # noqa: BLE001 - shown to the user, the kernel stays usable
            self.export_output.value = error_html(exc)
            return None
        html_repr = getattr(result, "_repr_html_", None)
        self.export_output.value = html_repr() if html_repr else f"<pre>{esc(str(result))}</pre>"
        return result

    def convert(self) -> Any:
        """What the Convert button does: ``run.convert()`` into run/hf_adapter."""
        return self._act("converting", lambda: self.run.convert(force=self.overwrite.value))

    def merge(self) -> Any:
        """What the Merge button does: ``run.merge(out, max_shard_size)`` and verification."""
        out = self.merge_out.value.strip() or None
        shard = self.shard_size.value.strip() or "2GB"
        return self._act("merging and verifying (loads the base model twice)",
                         lambda: self.run.merge(out, max_shard_size=shard, force=self.overwrite.value))

    def open_chat(self) -> Any:
        """What the Chat button does: a base-versus-tuned chat under the panel."""
        self.export_output.value = "<i>loading the model for chat…</i>"
        try:
            chat = self.run.chat_widget(compare=True)
        except Exception as exc:  # noqa: BLE001
            self.export_output.value = error_html(exc)
            return None
        self.export_output.value = ""
        self.chat_box.children = [chat.widget]
        return chat


class ChatWidget:
    """Chat with one model, or with base and tuned side by side (``compare=True``).

    ``session`` is a :class:`~nbtuner.chat.ChatSession`. In compare mode the base answer comes
    from ``base_session`` when given (full fine-tunes), else from ``session`` with its adapter
    switched off. Generation runs in the click handler and streams into the answer box.
    """

    def __init__(self, session: Any, *, compare: bool = False, base_session: Any = None,
                 stream_interval: float = 0.1) -> None:
        _require_widgets()
        if compare and base_session is None and not getattr(session, "has_adapter", False):
            raise NbtunerError("compare mode needs a tuned model: pass an adapter (--adapter DIR or --run NAME)")
        self.session, self.base_session, self.compare = session, base_session, compare
        self.stream_interval = stream_interval
        self.turns: list[dict[str, str]] = []  # compare mode: prompt, base, tuned
        self._pending: dict[str, str] = {}
        self._pending_prompt: str | None = None
        self._busy = False
        self._ignore_prompt_change = False

        settings = session.settings
        self.system = W.Text(value=session.system or "", placeholder="system prompt (optional)",
                             description="system", layout=W.Layout(width="100%"))
        self.max_new_tokens = W.BoundedIntText(value=settings.max_new_tokens, min=1, max=8192,
                                               description="max tokens", layout=W.Layout(width="180px"))
        self.temperature = W.FloatSlider(value=settings.temperature, min=0.0, max=2.0, step=0.05,
                                         description="temperature", readout_format=".2f")
        self.prompt = W.Text(placeholder="Ask something and press Enter", continuous_update=False,
                             layout=W.Layout(width="70%"))
        self.send_button = W.Button(description="Send", icon="paper-plane", button_style="primary")
        self.clear_button = W.Button(description="Clear", icon="eraser")
        self.status = W.HTML("")
        self.prompt.observe(self._on_prompt, names="value")
        self.send_button.on_click(lambda _: self.send())
        self.clear_button.on_click(lambda _: self.clear())
        if compare:
            self.base_html, self.tuned_html = W.HTML(""), W.HTML("")
            column = {"width": "50%", "padding": "0 6px"}
            self.history_box: W.Widget = W.HBox([
                W.VBox([W.HTML("<b>base</b>"), self.base_html], layout=W.Layout(**column)),
                W.VBox([W.HTML("<b>tuned</b>"), self.tuned_html], layout=W.Layout(**column))])
        else:
            self.history_html = W.HTML("")
            self.history_box = self.history_html
        self.widget = W.VBox([self.history_box, W.HBox([self.prompt, self.send_button, self.clear_button]),
                              self.status, W.HBox([self.max_new_tokens, self.temperature]), self.system])
        self._render()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        mode = "compare" if self.compare else ("tuned" if self.session.has_adapter else "base")
        return f"ChatWidget({mode}, {len(self.history)} turns)"

    @property
    def history(self) -> list[Any]:
        """Single mode: the session's (prompt, answer) pairs. Compare mode: dicts with prompt, base, tuned."""
        return list(self.turns) if self.compare else list(self.session.history)

    # ------------------------------------------------------------------ actions
    def _on_prompt(self, change: dict[str, Any]) -> None:
        # Enter (or leaving the box) commits the value: send it. Clearing the box after sending
        # also changes the value, hence the guard; a click on Send then finds the box empty.
        if not self._ignore_prompt_change and change["new"].strip():
            self.send()

    def _apply_settings(self) -> None:
        for session in filter(None, (self.session, self.base_session)):
            session.settings.max_new_tokens = int(self.max_new_tokens.value)
            session.settings.temperature = float(self.temperature.value)
            session.system = self.system.value.strip() or None

    def send(self, prompt: str | None = None) -> Any:
        """Answers `prompt` (or the text box): the answer string, or (base, tuned) in compare mode."""
        text = (prompt if prompt is not None else self.prompt.value).strip()
        if not text or self._busy:
            return None
        self._ignore_prompt_change = True
        try:
            self.prompt.value = ""
        finally:
            self._ignore_prompt_change = False
        self._busy = True
        self.send_button.disabled = True
        self._apply_settings()
        self._pending_prompt, self._pending = text, {}
        try:
            if self.compare:
                answers = {}
                for which in ("base", "tuned"):
                    self.status.value = f"<i>{which} model is answering…</i>"
                    answers[which] = self._ask(which, text)
                self.turns.append({"prompt": text, **answers})
                result: Any = (answers["base"], answers["tuned"])
            else:
                self.status.value = "<i>answering…</i>"
                result = self._ask(None, text)
            self.status.value = ""
            return result
        except Exception as exc:  # noqa: BLE001 - shown in the widget; the chat stays usable
            self.status.value = error_html(exc)
            return None
        finally:
            self._pending_prompt, self._pending = None, {}
            self._busy = False
            self.send_button.disabled = False
            self._render()

    def _ask(self, which: str | None, text: str) -> str:
        key = which or "answer"
        self._pending[key] = ""
        last = [0.0]

        def on_text(chunk: str) -> None:
            self._pending[key] += chunk
            now = time.monotonic()
            if now - last[0] >= self.stream_interval:
                last[0] = now
                self._render()

        if which == "base" and self.base_session is not None:
            answer = self.base_session.ask(text, remember=False, on_text=on_text)
        elif self.compare:
            answer = self.session.ask(text, which=which, remember=False, on_text=on_text)
        else:
            answer = self.session.ask(text, on_text=on_text)
        self._pending[key] = answer
        return answer

    def clear(self) -> None:
        self.session.clear()
        if self.base_session is not None:
            self.base_session.clear()
        self.turns.clear()
        self.status.value = ""
        self._render()

    # ------------------------------------------------------------------ rendering
    @staticmethod
    def _bubble(who: str, text: str, color: str) -> str:
        return (f"<div style='{_BOX};background:{color}'><b>{esc(who)}</b><br>{esc(text)}</div>")

    def _render(self) -> None:
        you = "#f4f4f5"
        if self.compare:
            columns = {"base": [], "tuned": []}
            turns = list(self.turns)
            if self._pending_prompt is not None:
                turns.append({"prompt": self._pending_prompt, "base": self._pending.get("base", "…"),
                              "tuned": self._pending.get("tuned", "…")})
            for turn in turns:
                for which in columns:
                    columns[which].append(self._bubble("you", turn["prompt"], you)
                                          + self._bubble(which, turn[which], "#eff6ff"))
            self.base_html.value = "".join(columns["base"])
            self.tuned_html.value = "".join(columns["tuned"])
            return
        who = "tuned" if self.session.has_adapter else "model"
        parts = [self._bubble("you", p, you) + self._bubble(who, a, "#eff6ff") for p, a in self.session.history]
        if self._pending_prompt is not None:
            parts.append(self._bubble("you", self._pending_prompt, you)
                         + self._bubble(who, self._pending.get("answer", "…"), "#eff6ff"))
        self.history_html.value = "".join(parts)
