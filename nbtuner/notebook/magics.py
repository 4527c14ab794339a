"""IPython magics: ``%nbtuner``, ``%%finetune`` / ``%finetune`` and ``%chat``.

Thin by design: parse the line, build a config, call the engine, show and return the result.
Loading the extension imports nothing heavy (no torch, transformers, peft, ipywidgets or
matplotlib): those load when a magic first needs them.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments

from ..errors import ConfigError, NbtunerError
from ..quiet import quiet_libraries

AVAILABLE = ("nbtuner: %nbtuner model|data|convert|merge|runs, %%finetune (or %finetune), %chat "
             "-- add ? for help, e.g. %finetune?")


class NotebookState:
    """One per shell: the chosen base model, loaded chat sessions, runs started here."""

    def __init__(self) -> None:
        from .run import SessionCache

        self.model_spec: str | None = None
        self.sessions = SessionCache()
        self.callbacks: list[Callable[[Any], None]] = []  # extra event consumers for every run
        self.runs: list[Any] = []
        self.last_panel: Any = None

    @property
    def last_run(self) -> Any:
        return self.runs[-1] if self.runs else None


_STATES: "weakref.WeakKeyDictionary[Any, NotebookState]" = weakref.WeakKeyDictionary()


def get_state(shell: Any) -> NotebookState:
    state = _STATES.get(shell)
    if state is None:
        state = _STATES[shell] = NotebookState()
    return state


def _readable(exc: BaseException) -> BaseException:
    from .run import readable

    return readable(exc)


def _display(obj: Any) -> None:
    from IPython.display import display

    display(obj)


# ---------------------------------------------------------------------- waiting for training
def wait_for_run(run: Any, panel: Any, shell: Any, poll_interval: float = 0.05) -> None:
    """Blocks the cell until `run` ends while the kernel keeps handling widget messages.

    The first KeyboardInterrupt (kernel interrupt, Ctrl-C) asks for a graceful stop and keeps
    waiting for the checkpoint; a second one stops waiting and lets the run end in the background.
    """
    from .uipoll import KernelPoller

    poller = KernelPoller(shell) if panel.widgets else None
    interrupts = 0
    try:
        while not run.done:
            try:
                if poller is not None and poller.active:
                    poller.poll(poll_interval)
                else:
                    run._done.wait(poll_interval)
                panel.refresh()
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    run.stop()
                    print("nbtuner: stopping after this step and saving a checkpoint (interrupt again to stop "
                          "waiting)", file=sys.stderr, flush=True)
                else:
                    print("nbtuner: no longer waiting; the run stops after its current step in the background "
                          "(see run.status)", file=sys.stderr, flush=True)
                    break
    finally:
        if poller is not None:
            poller.close()
        panel.refresh(force=True)


def _ticker(run: Any, panel: Any, interval: float = 0.2) -> None:
    while not run.done:
        run._done.wait(interval)
        panel.refresh()
    panel.refresh(force=True)


# ---------------------------------------------------------------------- %nbtuner sub-commands
def _nbtuner_parser() -> MagicArgumentParser:
    parser = MagicArgumentParser(prog="%nbtuner", add_help=False,
                                 description="Models, datasets, exports and runs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    model = sub.add_parser("model", add_help=False, help="load a base model (and tokenizer) and show its card")
    model.add_argument("spec", nargs="?", help="smollm2 (default), a local folder, a .gguf file or a hub id")
    model.add_argument("--trust-remote-code", action="store_true",
                       help="run the model's own Python code (models such as InternLM2 need it)")
    data = sub.add_parser("data", add_help=False, help="make or check a dataset")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    ident = data_sub.add_parser("identity", add_help=False, help="generate an identity dataset")
    ident.add_argument("--name", required=True, help="the assistant's new name")
    ident.add_argument("--model-desc", help="what it is, e.g. 'a study helper for chemistry'")
    ident.add_argument("--creator", help="who made it")
    ident.add_argument("-n", type=int, help="number of conversations (default: all distinct ones)")
    ident.add_argument("--seed", type=int, default=0)
    ident.add_argument("-o", "--output", required=True, help="output file (.json XTuner, .jsonl messages)")
    ident.add_argument("--force", action="store_true", help="replace an existing file")
    check = data_sub.add_parser("check", add_help=False, help="records, duplicates, lengths, loss mask")
    check.add_argument("file")
    check.add_argument("--max-length", type=int, default=512)
    check.add_argument("--model", help="tokenizer to check with (default: the model from %%nbtuner model)")
    check.add_argument("--format", choices=["xtuner", "alpaca", "openai"])
    check.add_argument("--system", help="system prompt added to conversations without one")
    conv = sub.add_parser("convert", add_help=False, help="checkpoint -> clean PEFT adapter folder")
    conv.add_argument("checkpoint")
    conv.add_argument("out")
    conv.add_argument("--force", action="store_true")
    merge = sub.add_parser("merge", add_help=False, help="merge an adapter into its base and verify")
    merge.add_argument("base")
    merge.add_argument("adapter")
    merge.add_argument("out")
    merge.add_argument("--max-shard-size", default="2GB")
    merge.add_argument("--force", action="store_true")
    merge.add_argument("--no-verify", action="store_true")
    runs = sub.add_parser("runs", add_help=False, help="list run folders with status, steps and loss")
    runs.add_argument("--dir", default="runs", help="folder holding the runs (default: runs)")
    sub.add_parser("help", add_help=False, help="this help")
    return parser


def _nbtuner_help() -> str:
    parser = _nbtuner_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    lines = ["%nbtuner COMMAND ...", "", "Commands:"]
    for choice in sub._choices_actions:
        lines.append(f"  {choice.dest:<8} {choice.help}")
    lines += ["", "Usage:"]

    def usage(p: argparse.ArgumentParser) -> str:
        fmt = argparse.HelpFormatter(p.prog, width=100)
        fmt.add_usage(p.usage, p._actions, p._mutually_exclusive_groups, prefix="")
        return "  " + " ".join(fmt.format_help().split())

    for name, p in sub.choices.items():
        if name == "data":
            inner = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
            lines += [usage(q) for q in inner.choices.values()]
        else:
            lines.append(usage(p))
    lines += ["", "Examples:", "  %nbtuner model smollm2",
              "  %nbtuner data identity --name Nova -n 200 -o data/nova.json",
              "  %nbtuner data check data/nova.json --max-length 256",
              "  %nbtuner convert runs/nova/checkpoints/checkpoint-40 runs/nova/hf_adapter",
              "  %nbtuner merge smollm2 runs/nova/adapter runs/nova/merged --max-shard-size 500MB",
              "  %nbtuner runs"]
    return "\n".join(lines)


class RunTable(list):
    """Rows read from run folders' run.json; a table in notebooks, text elsewhere."""

    COLUMNS = ("run", "status", "steps", "final loss", "model", "started")

    def _repr_html_(self) -> str:
        from .render import esc

        head = "".join(f"<th style='text-align:left'>{c}</th>" for c in self.COLUMNS)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{esc(str(r[c]))}</td>" for c in self.COLUMNS)
                       + "</tr>" for r in self)
        return f"<table><tr>{head}</tr>{body}</table>" if self else "<i>no runs</i>"

    def __repr__(self) -> str:
        if not self:
            return "no runs"
        widths = {c: max(len(c), *(len(str(r[c])) for r in self)) for c in self.COLUMNS}
        lines = ["  ".join(c.ljust(widths[c]) for c in self.COLUMNS)]
        lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in self.COLUMNS) for r in self]
        return "\n".join(lines)


def list_runs(folder: str | Path = "runs") -> RunTable:
    import json

    rows = RunTable()
    root = Path(folder)
    if not root.is_dir():
        return rows
    for run_dir in sorted(p for p in root.iterdir() if (p / "run.json").is_file()):
        try:
            record = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            rows.append({"run": run_dir.name, "status": "unreadable run.json", "steps": "", "final loss": "",
                         "model": "", "started": ""})
            continue
        loss = record.get("final_loss")
        rows.append({"run": run_dir.name, "status": record.get("status", "?"), "steps": record.get("steps", 0),
                     "final loss": f"{loss:.4f}" if isinstance(loss, (int, float)) else "",
                     "model": (record.get("config") or {}).get("model", ""),
                     "started": str(record.get("started", ""))[:19].replace("T", " ")})
    return rows


# ---------------------------------------------------------------------- %chat helpers
_CHAT_VALUE_OPTIONS = {"--adapter", "--run", "--system", "--max-new-tokens", "--temperature", "--model"}


_TOKEN = re.compile(r"""\s*("(?:[^"\\]|\\.)*"|'[^']*'|\S+)""")


def split_chat_line(line: str) -> tuple[str, str]:
    """Leading options vs the prompt, which is kept verbatim (quotes, apostrophes and all).

    A prompt that itself starts with '-' goes after ``--``."""
    rest = line.strip()
    options: list[str] = []
    while rest.startswith("-"):
        match = _TOKEN.match(rest)
        token, after = match.group(1), rest[match.end():]
        if token == "--":
            rest = after.strip()
            break
        name, eq, _ = token.partition("=")
        value = _TOKEN.match(after) if name in _CHAT_VALUE_OPTIONS and not eq else None
        if value is not None:
            options += [token, value.group(1)]
            rest = after[value.end():].strip()
        else:
            options.append(token)
            rest = after.strip()
    if len(rest) >= 2 and rest[0] == rest[-1] and rest[0] in "'\"":
        rest = rest[1:-1]
    return " ".join(options), rest


@magics_class
class NbtunerMagics(Magics):
    """Fine-tune chat LLMs from a notebook."""

    @property
    def state(self) -> NotebookState:
        return get_state(self.shell)

    # ------------------------------------------------------------------ %nbtuner
    @line_magic
    def nbtuner(self, line: str) -> Any:
        args = _nbtuner_parser().parse_args(_split(line))
        command = args.command
        if command in (None, "help"):
            print(_nbtuner_help())
            return None
        if command in ("model", "merge") or command == "data" and getattr(args, "data_command", None) == "check":
            quiet_libraries()
        try:
            if command == "model":
                return self._model(args.spec, args.trust_remote_code)
            if command == "data":
                if args.data_command is None:
                    raise UsageError("%nbtuner data: give an action: identity or check")
                return self._data_identity(args) if args.data_command == "identity" else self._data_check(args)
            if command == "convert":
                from ..export import convert

                return convert(args.checkpoint, args.out, force=args.force)
            if command == "merge":
                from ..export import merge

                return merge(args.base, args.adapter, args.out, max_shard_size=args.max_shard_size,
                             force=args.force, verify=not args.no_verify)
            if command == "runs":
                return list_runs(args.dir)
        except NbtunerError as exc:
            raise _readable(exc)
        raise UsageError(f"%nbtuner: unknown command '{command}'")  # pragma: no cover - argparse catches it

    nbtuner.__doc__ = _nbtuner_help()

    def _model(self, spec: str | None, trust_remote_code: bool = False) -> Any:
        if spec is None:
            if self.state.model_spec is None:
                print("no model loaded yet: %nbtuner model SPEC (e.g. smollm2)")
                return None
            spec = self.state.model_spec
        if trust_remote_code:
            self.state.sessions.trusted.add(spec)
        session = self.state.sessions.get(spec)
        self.state.model_spec = spec
        return session.card()

    def _data_identity(self, args: argparse.Namespace) -> Path:
        from ..data import write_identity_dataset

        out, count = write_identity_dataset(args.output, args.name, args.model_desc, n=args.n, seed=args.seed,
                                            creator=args.creator, force=args.force)
        print(f"wrote {count} identity conversations for '{args.name}' to {out}")
        return out

    def _data_check(self, args: argparse.Namespace) -> Any:
        from ..data import check_dataset, load_conversations

        conversations = load_conversations(args.file, args.format)
        tokenizer = None
        if args.model:
            from ..models import load_tokenizer

            tokenizer = load_tokenizer(args.model)
        elif self.state.model_spec is not None:
            tokenizer = self.state.sessions.get(self.state.model_spec).tokenizer
        else:
            print("no model chosen (%nbtuner model SPEC or --model): token lengths and the loss mask are not "
                  "checked", file=sys.stderr)
        return check_dataset(conversations, tokenizer, max_length=args.max_length, system=args.system,
                             file=args.file)

    # ------------------------------------------------------------------ %%finetune
    @magic_arguments()
    @argument("--model", help="model spec: smollm2, a local folder, a .gguf file or a hub id "
                              "(default: the model from %%nbtuner model, else smollm2)")
    @argument("--data", help="dataset file (XTuner, Alpaca or OpenAI messages JSON/JSONL)")
    @argument("--method", choices=["auto", "qlora", "lora", "full"], help="default: auto (QLoRA where supported)")
    @argument("--epochs", type=float, help="passes over the data")
    @argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    @argument("--out", help="run folder (default: runs/<timestamp>)")
    @argument("--set", action="append", metavar="KEY=VALUE", help="override any config key (repeatable)")
    @argument("--config", metavar="FILE", help="YAML config file; the cell body and flags override it")
    @argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint folder")
    @argument("--force", action="store_true", help="replace an existing run folder")
    @argument("-o", "--output", metavar="NAME", help="bind the run object to NAME in the notebook")
    @argument("--background", action="store_true",
              help="return at once and train in the background (the panel keeps updating)")
    @argument("--display", choices=["auto", "widgets", "text"], default="auto",
              help="live widget panel or printed progress (default: widgets in Jupyter, text elsewhere)")
    @argument("--log-every", type=int, default=1, help="text display: print every N steps")
    @line_cell_magic
    def finetune(self, line: str, cell: str | None = None) -> Any:
        """Fine-tune a chat model with a live panel; returns the run object.

        The cell body (``%%finetune``) is a YAML config with the flat keys of ``nbtuner train``
        (lr, lora_r, batch_size, eval_prompts, ...). Without a body use the line form
        ``%finetune``, since IPython rejects an empty cell magic. Precedence: --config file, then
        the cell body, then --set, then the named flags.

        The cell blocks until training ends (so "Run All" and headless runs wait for it), but the
        panel's Stop button works meanwhile; interrupting the kernel also stops after the current
        step with a checkpoint. Examples::

            %%finetune --data data/nova.json --max-steps 60 -o run
            lr: 2e-4
            lora_r: 16

            %finetune --data data/nova.json --method lora --epochs 1 -o run
            run.compare(["Who are you?"])
        """
        args = _parse(self.finetune, line)
        if args.epochs is not None and args.max_steps is not None:
            raise UsageError("%finetune: give --epochs or --max-steps, not both")
        if args.output is not None and not args.output.isidentifier():
            raise UsageError(f"%finetune: -o needs a Python name, got '{args.output}'")
        cfg = self._build_config(args, cell)
        from .frontend import use_widgets
        from .run import NotebookRun
        from .widgets import TrainingPanel

        run = NotebookRun(cfg, sessions=self.state.sessions, name=args.output)
        panel = TrainingPanel(run, widgets=use_widgets(args.display, self.shell), log_every=args.log_every)
        run.panel = panel
        self.state.last_panel = panel
        self.state.runs.append(run)
        if args.output:
            self.shell.user_ns[args.output] = run
        if panel.widgets:
            _display(panel)
        quiet_libraries()
        run.start([panel, *self.state.callbacks], force=args.force)
        if args.background:
            if panel.widgets:
                threading.Thread(target=_ticker, args=(run, panel), name="nbtuner-panel", daemon=True).start()
            return run
        wait_for_run(run, panel, self.shell)
        if run.error is not None:
            raise run.error
        return run

    def _build_config(self, args: argparse.Namespace, cell: str | None) -> Any:
        from ..config import load_config, load_yaml_text, parse_overrides

        try:
            overrides: dict[str, Any] = parse_overrides(args.set or [])
            for key in ("model", "data", "method", "epochs", "max_steps", "out"):
                value = getattr(args, key)
                if value is not None:
                    overrides[key] = value
            if args.resume:
                overrides["resume_from"] = args.resume
            if "model" not in overrides and self.state.model_spec is not None:
                from_file = load_yaml_text(Path(args.config).read_text(encoding="utf-8"), source=args.config) \
                    if args.config and Path(args.config).is_file() else {}
                from_cell = load_yaml_text(cell, source="cell") if cell and cell.strip() else {}
                if "model" not in from_file and "model" not in from_cell:
                    overrides["model"] = self.state.model_spec
            return load_config(args.config, overrides, text=cell if cell and cell.strip() else None)
        except ConfigError as exc:
            raise UsageError(f"%finetune: {exc}") from None

    # ------------------------------------------------------------------ %chat
    @magic_arguments()
    @argument("--adapter", metavar="DIR", help="LoRA adapter folder to chat with")
    @argument("--run", metavar="NAME", help="a run: a name bound by %%finetune -o, or a run folder")
    @argument("--model", help="base model (default: the adapter's base, else the model from %%nbtuner model)")
    @argument("--compare", action="store_true", help="answer with the base and the tuned model side by side")
    @argument("--system", help="system prompt")
    @argument("--max-new-tokens", type=int, help="answer length limit")
    @argument("--temperature", type=float, help="0 = greedy (reproducible)")
    @argument("--clear", action="store_true", help="forget the conversation so far")
    @argument("prompt", nargs="*", help="ask this and stream the answer; without it, open the chat widget")
    @line_magic
    def chat(self, line: str) -> Any:
        """Chat with the base or tuned model: ``%chat PROMPT`` streams one answer, ``%chat`` opens
        the chat widget. ``--compare`` puts base and tuned side by side. Examples::

            %chat Who are you?
            %chat --run run --compare Please introduce yourself
            %chat --adapter runs/nova/adapter
        """
        option_text, prompt = split_chat_line(line)
        args = _parse(self.chat, option_text)
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise UsageError("%chat: --max-new-tokens must be at least 1")
        quiet_libraries()
        try:
            session, base_session = self._chat_sessions(args)
        except NbtunerError as exc:
            raise _readable(exc)
        if args.compare and base_session is None and not session.has_adapter:
            raise UsageError("%chat --compare needs a tuned model: add --adapter DIR or --run NAME")
        for s in filter(None, (session, base_session)):
            if args.system is not None:
                s.system = args.system or None
            if args.max_new_tokens is not None:
                s.settings.max_new_tokens = args.max_new_tokens
            if args.temperature is not None:
                s.settings.temperature = args.temperature
            if args.clear:
                s.clear()
        if not prompt:
            from .frontend import use_widgets
            from .widgets import ChatWidget

            if not use_widgets("auto", self.shell):
                print("no widget front end here: use %chat PROMPT (add --compare for base vs tuned)",
                      file=sys.stderr)
            return ChatWidget(session, compare=args.compare, base_session=base_session)
        self._stream_answers(session, base_session, prompt, args.compare)
        return None

    def _chat_sessions(self, args: argparse.Namespace) -> tuple[Any, Any]:
        from .run import base_model_of

        state = self.state
        if args.run and args.adapter:
            raise UsageError("%chat: give --adapter or --run, not both")
        if args.run:
            run = self._find_run(args.run)
            if args.model:
                return state.sessions.get(args.model, run.adapter_dir), None
            return run.session(), run.base_session()
        if args.adapter:
            adapter = Path(args.adapter)
            if not (adapter / "adapter_config.json").is_file():
                raise ConfigError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
            model = args.model or base_model_of(adapter) or state.model_spec or "smollm2"
            return state.sessions.get(model, adapter), None
        model = args.model or state.model_spec or "smollm2"
        if state.model_spec is None:
            state.model_spec = model
        return state.sessions.get(model), None

    def _find_run(self, name: str) -> Any:
        from ..train import TrainResult
        from .run import NotebookRun

        obj = self.shell.user_ns.get(name) if name.isidentifier() else None
        if isinstance(obj, NotebookRun):
            if not obj.done:
                raise ConfigError(f"run '{name}' is still training; wait for it or stop it first")
            return obj
        if isinstance(obj, TrainResult):
            return NotebookRun(obj.config, sessions=self.state.sessions, name=name, result=obj)
        for folder in (Path(name), Path("runs") / name):
            if (folder / "run.json").is_file():
                return NotebookRun.load(folder, sessions=self.state.sessions)
        raise ConfigError(f"--run {name}: no run object of that name and no run folder {name} or runs/{name}")

    @staticmethod
    def _stream_answers(session: Any, base_session: Any, prompt: str, compare: bool) -> None:
        def stream(label: str, ask: Callable[..., str]) -> None:
            print(f"{label}: " if label else "", end="", flush=True)
            ask(on_text=lambda t: print(t, end="", flush=True))
            print(flush=True)

        if not compare:
            stream("", lambda on_text: session.ask(prompt, on_text=on_text))
            return
        base = base_session or session
        which = None if base_session is not None else "base"
        stream("base ", lambda on_text: base.ask(prompt, which=which, remember=False, on_text=on_text))
        stream("tuned", lambda on_text: session.ask(prompt, which="tuned" if base_session is None else None,
                                                    remember=False, on_text=on_text))


def _split(line: str) -> list[str]:
    """Shell-style words: `--creator "Ada Lab"` gives `Ada Lab`, without the quotes. IPython's own
    parse_argstring keeps the quotes (it splits with posix=False), so a quoted value would reach
    the data and the config with its quote marks."""
    from IPython.utils._process_common import arg_split

    return arg_split(line, posix=os.name != "nt", strict=False)


def _parse(magic: Any, line: str) -> argparse.Namespace:
    return magic.parser.parse_args(_split(line))


_CHAT_LINE = re.compile(r"^(\s*)%chat\s+(.*\S)\s*$")


def protect_chat_questions(lines: list[str]) -> list[str]:
    """``%chat Who are you?`` would otherwise be read as a help request for ``you`` (IPython turns
    any line ending in '?' into ``%pinfo``). A cleanup transformer runs before that: it rewrites
    such a %chat line into the equivalent ``run_line_magic`` call. ``%chat?`` stays help."""
    if lines and lines[0].lstrip().startswith("%%"):
        return lines
    out = []
    for line in lines:
        match = _CHAT_LINE.match(line)
        if match and match.group(2).endswith("?") and match.group(2).strip("?"):
            out.append(f"{match.group(1)}get_ipython().run_line_magic('chat', {match.group(2)!r})\n")
        else:
            out.append(line)
    return out


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(NbtunerMagics)
    cleanup = ipython.input_transformers_cleanup
    if not any(getattr(t, "__name__", "") == protect_chat_questions.__name__ for t in cleanup):
        cleanup.append(protect_chat_questions)
    print(AVAILABLE)
