"""Training throughput on the embedded SmolLM2: bf16 autocast vs fp32, QLoRA vs LoRA.

Every variant runs in this one process on the same data and steps, interleaved in rounds, so the
ratios against the fp32 LoRA baseline survive a noisy shared machine better than absolute numbers.
Usage: python bench/train_throughput.py [--steps 8] [--rounds 2] [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from publish import publish

VARIANTS = [("lora", "fp32"), ("lora", "bf16"), ("qlora", "fp32"), ("qlora", "bf16")]


def measure(method: str, precision: str, data: Path, steps: int, work: Path) -> float:
    from nbtuner.config import FinetuneConfig
    from nbtuner.train import run_finetune

    cfg = FinetuneConfig(model="smollm2", data=str(data), method=method, precision=precision, max_steps=steps,
                         batch_size=4, lora_r=16, lora_alpha=32, lora_dropout=0.0, eval_steps=0, save_steps=0,
                         replay_ratio=0, max_length=256, out=str(work / f"{method}-{precision}"))
    return run_finetune(cfg, force=True).tokens_per_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--markdown", help="append the result table to this file")
    args = parser.parse_args()

    from nbtuner.data import identity_conversations, save_xtuner
    from nbtuner.models import cpu_has_fast_bf16, device_kind

    work = Path(tempfile.mkdtemp(prefix="nbtuner-bench-"))
    data = save_xtuner(identity_conversations("Nova", n=200), work / "identity.json")
    results: dict[tuple[str, str], list[float]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for method, precision in VARIANTS:
            results[(method, precision)].append(measure(method, precision, data, args.steps, work))
    baseline = statistics.median(results[("lora", "fp32")])
    lines = [f"Training throughput, SmolLM2-135M, {device_kind()}, fast bf16: {cpu_has_fast_bf16()}, "
             f"{args.steps} steps x {args.rounds} rounds, batch 4, r=16; median tokens/s and ratio to fp32 LoRA:",
             "", "| method | precision | tokens/s | ratio |", "|---|---|---|---|"]
    for (method, precision), values in results.items():
        med = statistics.median(values)
        lines.append(f"| {method} | {precision} | {med:.0f} | {med / baseline:.2f} |")
    publish(lines, args.markdown)


if __name__ == "__main__":
    main()
