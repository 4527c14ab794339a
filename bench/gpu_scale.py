"""QLoRA, LoRA and full fine-tuning on a GPU, on a model the size of the ones workshops move up to (1.5B).

No hub is reachable from the machines we test on, so the model has Qwen2.5-1.5B-Instruct's shape
with random weights and SmolLM2's tokenizer: speed and memory depend on the shape, not on the
values. All variants train the same identity data for the same steps in this one process; the
table gives tokens/s and peak GPU memory, with ratios against bf16 LoRA.
Usage: python bench/gpu_scale.py [--steps 30] [--rounds 2] [--markdown BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from publish import publish


def build_model(folder: Path, tokenizer_path: str | None) -> tuple[Path, int]:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from nbtuner.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or resolve_model("smollm2").path)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


def measure(model_dir: Path, method: str, data: Path, steps: int, work: Path) -> tuple[float, float]:
    import torch

    from nbtuner.config import FinetuneConfig
    from nbtuner.train import run_finetune

    torch.cuda.reset_peak_memory_stats()
    cfg = FinetuneConfig(model=str(model_dir), data=str(data), method=method, max_steps=steps, batch_size=16,
                         lora_r=16, lora_alpha=32, lora_dropout=0.0, eval_steps=0, save_steps=0, replay_ratio=0,
                         max_length=256, out=str(work / method))
    result = run_finetune(cfg, force=True)
    return result.tokens_per_s, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--markdown", help="append the result table to this file")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the embedded SmolLM2's)")
    args = parser.parse_args()

    import torch

    from nbtuner.data import identity_conversations, save_xtuner

    work = Path(tempfile.mkdtemp(prefix="nbtuner-gpu-scale-"))
    data = save_xtuner(identity_conversations("Nova"), work / "identity.json")
    model_dir, params = build_model(work / "model", args.tokenizer)
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in ("lora", "qlora", "full")}
    for _ in range(args.rounds):  # interleaved, so the first run's warm-up is not one method's alone
        for method in runs:
            runs[method].append(measure(model_dir, method, data, args.steps, work))
            torch.cuda.empty_cache()
    rows = {m: (statistics.median(s for s, _ in r), max(g for _, g in r)) for m, r in runs.items()}
    base_speed, base_mem = rows["lora"]
    lines = [f"{torch.cuda.get_device_name(0)}, Qwen2.5-1.5B-shaped model ({params / 1e9:.2f}B parameters, random "
             f"weights), batch 16, r=16, {args.steps} steps x {args.rounds} rounds, bf16; median tokens/s:", "",
             "| method | tokens/s | ratio | peak GPU memory GiB | ratio |", "|---|---|---|---|---|"]
    for method, (speed, mem) in rows.items():
        lines.append(f"| {method} | {speed:.0f} | {speed / base_speed:.2f} | {mem:.1f} | {mem / base_mem:.2f} |")
    lines.append("")
    lines.append("per round, tokens/s: " + "; ".join(f"{m} {', '.join(f'{s:.0f}' for s, _ in r)}"
                                                      for m, r in runs.items()))
    publish(lines, args.markdown)


if __name__ == "__main__":
    main()
