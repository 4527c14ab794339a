"""Identity rate and leakage rate: nbtuner's default recipe against the seed tutorial's recipe shape.

The seed (XTuner's personal-assistant tutorial) trains on its two identity strings copied many
times, without replay. Both recipes here train the embedded SmolLM2 for the same number of steps
with the same optimiser settings, then answer the same held-out probes (identity phrasings the
generator never emits, and unrelated questions in English and Chinese), greedy.
Usage: python bench/identity_recipes.py [--name Nova] [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from publish import publish


def seed_conversations(name: str, copies: int) -> list:
    """The tutorial's data: one Chinese and one English identity pair, repeated."""
    zh = [{"role": "user", "content": "请介绍一下你自己"},
          {"role": "assistant", "content": f"我是{name}的小助手，内在是一个乐于助人的AI大模型哦"}]
    en = [{"role": "user", "content": "Please introduce yourself"},
          {"role": "assistant", "content": f"I am {name}'s assistant, a helpful AI model inside."}]
    return [zh, en] * copies


def run(label: str, data: Path, persona: str, work: Path, extra: dict) -> dict:
    from nbtuner.config import load_config
    from nbtuner.train import run_finetune

    cfg = load_config(overrides={"model": "smollm2", "data": str(data), "out": str(work / label),
                                 "persona": persona, "early_stop": False, **extra})
    t0 = time.perf_counter()
    result = run_finetune(cfg, force=True)
    seconds = time.perf_counter() - t0
    report = result.report()
    return {"recipe": label, "steps": result.steps, "train_s": round(seconds), "identity": report.identity_rate,
            "leakage": report.leakage_rate, "base_identity": report.base_identity_rate,
            "base_leakage": report.base_leakage_rate, "report": str(work / label / "identity_report.md")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="Nova")
    parser.add_argument("--markdown")
    args = parser.parse_args()

    from nbtuner.data import identity_conversations, save_xtuner

    work = Path(tempfile.mkdtemp(prefix="nbtuner-identity-"))
    ours = save_xtuner(identity_conversations(args.name, creator="Ada Lab"), work / "identity.json")
    seed = save_xtuner(seed_conversations(args.name, 208), work / "seed.json")
    rows = [run("nbtuner-default", ours, args.name, work, {}),
            run("seed-shape", seed, args.name, work, {"replay_ratio": 0})]
    lines = ["| recipe | steps | train s | identity rate | leakage rate | (base: identity / leakage) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['steps']} | {r['train_s']} | {r['identity']:.0%} | {r['leakage']:.0%} | "
              f"{r['base_identity']:.0%} / {r['base_leakage']:.0%} |" for r in rows]
    print(json.dumps(rows, indent=1))
    publish(lines, args.markdown)


if __name__ == "__main__":
    main()
