"""Identity rate and leakage rate: nbtuner's default recipe, over several seeds, against the seed
tutorial's recipe shape.

The default recipe is what `nbtuner train --model smollm2 --data identity.json` does with no flags
(replay, probes, early stopping and checkpoint choice included); its rates are those of the step
that `adapter/` holds. The seed (XTuner's personal-assistant tutorial) trains on its two identity
strings copied many times, without replay, for the default recipe's full number of steps with the
same optimiser settings. All rates come from the same held-out probes (identity phrasings the
generator never emits, and unrelated questions in English and Chinese), answered greedily.
Usage: python bench/identity_recipes.py [--seeds 42,1] [--set KEY=VALUE ...] [--no-seed-shape]
                                        [--markdown BENCHMARKS.md]
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
                                 "persona": persona, **extra})
    t0 = time.perf_counter()
    result = run_finetune(cfg, force=True)
    seconds = time.perf_counter() - t0
    record = json.loads((result.run_dir / "run.json").read_text(encoding="utf-8"))
    rates = record["probe_rates"]
    identity, leakage = rates[str(record["adapter_step"])]
    return {"recipe": label, "seed": cfg.seed, "steps": result.steps, "adapter_step": record["adapter_step"],
            "train_s": round(seconds), "identity": identity, "leakage": leakage,
            "probes": {int(k): v for k, v in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", default="Nova")
    parser.add_argument("--seeds", default="42", help="comma-separated training seeds for the default recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the default recipe (to compare variants)")
    parser.add_argument("--no-seed-shape", action="store_true", help="skip the seed tutorial's recipe shape")
    parser.add_argument("--markdown")
    args = parser.parse_args()

    from nbtuner.config import load_config, parse_overrides
    from nbtuner.data import identity_conversations, save_xtuner

    work = Path(tempfile.mkdtemp(prefix="nbtuner-identity-"))
    ours = save_xtuner(identity_conversations(args.name, creator="Ada Lab"), work / "identity.json")
    variant = parse_overrides(args.set)
    rows = [run(f"nbtuner-default-{seed}", ours, args.name, work, {**variant, "seed": int(seed)})
            for seed in args.seeds.split(",")]
    if not args.no_seed_shape:
        steps = load_config(overrides={"model": "smollm2", **variant}).max_steps
        seed = save_xtuner(seed_conversations(args.name, 208), work / "seed.json")
        rows.append(run("seed-shape", seed, args.name, work,
                        {**variant, "replay_ratio": 0, "early_stop": False, "max_steps": steps}))
    label = f"nbtuner default{' with ' + ', '.join(args.set) if args.set else ''}"
    lines = [f"{label}; rates at the step adapter/ holds (probes at every step listed):", "",
             "| recipe | seed | steps run | adapter step | train s | identity rate | leakage rate "
             "| probes: step identity/leakage |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['recipe']} | {r['seed']} | {r['steps']} | {r['adapter_step']} | {r['train_s']} | "
              f"{r['identity']:.0%} | {r['leakage']:.0%} | "
              + ", ".join(f"{s}: {i:.0%}/{l:.0%}" for s, (i, l) in sorted(r["probes"].items())) + " |" for r in rows]
    print(json.dumps(rows, indent=1))
    publish(lines, args.markdown)


if __name__ == "__main__":
    main()
