"""The `nbtuner` command: a thin layer that maps sub-commands onto the engine's functions.

Nothing heavy is imported at module level, so `nbtuner --help` is instant. Errors the user can
fix print one line and exit with status 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from .errors import NbtunerError
from .quiet import quiet_libraries

EPILOG = """examples:
  nbtuner data identity --name Nova -o data/identity.json
  nbtuner data check data/identity.json --model smollm2
  nbtuner train --model smollm2 --data data/identity.json --out runs/nova
  nbtuner convert runs/nova/checkpoints/checkpoint-40 runs/nova/hf_adapter
  nbtuner merge smollm2 runs/nova/adapter runs/nova/merged
  nbtuner chat smollm2 --adapter runs/nova/adapter --compare --prompt "Who are you?"
"""


def cmd_data_identity(args: argparse.Namespace) -> int:
    from .data import write_identity_dataset

    out, count = write_identity_dataset(args.output, args.name, args.model_desc, n=args.n, seed=args.seed,
                                        creator=args.creator, force=args.force)
    print(f"wrote {count} identity conversations for '{args.name}' to {out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .data import check_dataset, load_conversations

    conversations = load_conversations(args.file, args.format)
    tokenizer = None
    if args.model:
        from .models import load_tokenizer

        tokenizer = load_tokenizer(args.model)
    report = check_dataset(conversations, tokenizer, max_length=args.max_length, system=args.system,
                           file=args.file)
    print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) if args.json else report)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config, parse_overrides
    from .events import ConsoleLogger
    from .train import run_finetune

    overrides: dict[str, Any] = parse_overrides(args.set or [])
    for key in ("model", "data", "method", "epochs", "max_steps", "out"):
        value = getattr(args, key)
        if value is not None:
            overrides[key] = value
    if args.resume:
        overrides["resume_from"] = args.resume
    cfg = load_config(args.config, overrides)
    result = run_finetune(cfg, [ConsoleLogger(every=args.log_every)], force=args.force)
    print(result)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .export import convert

    print(convert(args.checkpoint, args.out, force=args.force))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .export import merge

    print(f"merging {args.adapter} into {args.base} ...", flush=True)
    print(merge(args.base, args.adapter, args.out, max_shard_size=args.max_shard_size, force=args.force,
                verify=not args.no_verify, trust_remote_code=args.trust_remote_code))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .chat import GenerationSettings, open_chat
    from .evaluate import evaluate_identity, general_probes

    session = open_chat(args.model, args.adapter, system=args.system,
                        settings=GenerationSettings(max_new_tokens=args.max_new_tokens))
    report = evaluate_identity(session, args.persona, general=general_probes(extra=args.probe or ()))
    if args.out:
        from pathlib import Path

        Path(args.out).mkdir(parents=True, exist_ok=True)
        report.save(args.out)
    print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) if args.json else report)
    return 0


def _print_answer(args: argparse.Namespace, prompt: str, which: str, answer: str) -> None:
    if args.json:
        print(json.dumps({"prompt": prompt, "model": which, "answer": answer}, ensure_ascii=False), flush=True)
    else:
        print(f"[{which}] {answer}", flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import GenerationSettings, open_chat

    if args.compare and not args.adapter:
        raise NbtunerError("--compare needs --adapter DIR: it compares the base model with the tuned one")
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    session = open_chat(args.model, args.adapter, system=args.system, settings=settings,
                        trust_remote_code=args.trust_remote_code)
    if not args.json:
        print(session.card(), flush=True)

    def answer(prompt: str, remember: bool) -> None:
        if args.compare:
            for base, tuned in session.compare([prompt]):
                if not args.json:
                    print(f">>> {prompt}")
                _print_answer(args, prompt, "base", base.answer)
                _print_answer(args, prompt, "tuned", tuned.answer)
        elif args.json:
            which = "tuned" if session.has_adapter else "base"
            _print_answer(args, prompt, which, session.ask(prompt, remember=remember))
        else:
            print(f">>> {prompt}\n", end="", flush=True)
            session.ask(prompt, remember=remember, on_text=lambda t: print(t, end="", flush=True))
            print(flush=True)

    if args.prompt:
        for prompt in args.prompt:
            answer(prompt, remember=False)
        return 0
    print("chat: type a message; /reset clears the history, /exit (or Ctrl-D) quits", flush=True)
    while True:
        try:
            prompt = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if prompt in ("/exit", "/quit"):
            return 0
        if prompt == "/reset":
            session.clear()
            continue
        if prompt:
            answer(prompt, remember=not args.compare)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbtuner", description="Fine-tune chat LLMs with LoRA/QLoRA.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"nbtuner {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="make and check datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    ident = data_sub.add_parser("identity", help="generate an identity (self-introduction) dataset")
    ident.add_argument("--name", required=True, help="the assistant's new name")
    ident.add_argument("--model-desc", help="what the assistant is, e.g. 'a study helper for chemistry'")
    ident.add_argument("--creator", help="who made it, e.g. 'Ada Lovelace'")
    ident.add_argument("-n", type=int, help="number of conversations (default: every distinct one)")
    ident.add_argument("--seed", type=int, default=0)
    ident.add_argument("-o", "--output", required=True, help="output file (.json: XTuner format, .jsonl: messages)")
    ident.add_argument("--force", action="store_true", help="replace an existing output file")
    ident.set_defaults(func=cmd_data_identity)
    check = data_sub.add_parser("check", help="report records, duplicates, token lengths and masked tokens")
    check.add_argument("file")
    check.add_argument("--model", help="model spec whose tokenizer and chat template to use")
    check.add_argument("--max-length", type=int, default=512)
    check.add_argument("--format", choices=["xtuner", "alpaca", "openai"], help="force the file format")
    check.add_argument("--system", help="system prompt added to conversations without one")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=cmd_data_check)

    train = sub.add_parser("train", help="fine-tune a model (QLoRA by default)")
    train.add_argument("config", nargs="?", help="YAML config (flat keys, as in --set)")
    train.add_argument("--model", help="model spec: smollm2, a local folder, a .gguf file or a hub id")
    train.add_argument("--data", help="dataset file (XTuner, Alpaca or OpenAI messages JSON/JSONL)")
    train.add_argument("--method", choices=["auto", "qlora", "lora", "full"])
    steps = train.add_mutually_exclusive_group()
    steps.add_argument("--epochs", type=float)
    steps.add_argument("--max-steps", type=int)
    train.add_argument("--out", help="run folder (default: runs/<timestamp>)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config key")
    train.add_argument("--resume", metavar="CHECKPOINT", help="continue from a checkpoint folder")
    train.add_argument("--force", action="store_true", help="replace an existing run folder")
    train.add_argument("--log-every", type=int, default=1, help="print every N steps")
    train.set_defaults(func=cmd_train)

    conv = sub.add_parser("convert", help="turn a training checkpoint into a clean PEFT adapter folder")
    conv.add_argument("checkpoint", help="a checkpoint folder, an adapter folder, or a run folder (the checkpoint "
                                          "its identity probes chose, else its final adapter)")
    conv.add_argument("out")
    conv.add_argument("--force", action="store_true")
    conv.set_defaults(func=cmd_convert)

    merge = sub.add_parser("merge", help="merge an adapter into its base model and verify the result")
    merge.add_argument("base", help="base model spec")
    merge.add_argument("adapter")
    merge.add_argument("out")
    merge.add_argument("--max-shard-size", default="2GB")
    merge.add_argument("--force", action="store_true")
    merge.add_argument("--no-verify", action="store_true", help="skip the logits comparison")
    merge.add_argument("--trust-remote-code", action="store_true")
    merge.set_defaults(func=cmd_merge)

    evaluate = sub.add_parser("eval", help="identity and leakage rates of base vs tuned on held-out probes")
    evaluate.add_argument("model", help="base model spec")
    evaluate.add_argument("--adapter", required=True)
    evaluate.add_argument("--persona", required=True, help="the name the tuned model should give")
    evaluate.add_argument("--probe", action="append", help="an extra unrelated question (repeatable)")
    evaluate.add_argument("--system")
    evaluate.add_argument("--max-new-tokens", type=int, default=48)
    evaluate.add_argument("--out", help="also write identity_report.{json,md,html} here")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=cmd_eval)

    chat = sub.add_parser("chat", help="chat with a model, optionally with an adapter, or compare base and tuned")
    chat.add_argument("model", nargs="?", default="smollm2", help="model spec (default: smollm2)")
    chat.add_argument("--adapter", help="LoRA adapter folder")
    chat.add_argument("--prompt", action="append", help="answer this prompt and exit (repeatable)")
    chat.add_argument("--compare", action="store_true", help="answer with the base and the tuned model")
    chat.add_argument("--system", help="system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (reproducible)")
    chat.add_argument("--json", action="store_true", help="one JSON object per answer")
    chat.add_argument("--trust-remote-code", action="store_true")
    chat.set_defaults(func=cmd_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="nbtuner: %(message)s")
    quiet_libraries()
    try:
        return args.func(args)
    except NbtunerError as exc:
        print(f"nbtuner: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"\nnbtuner: interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
