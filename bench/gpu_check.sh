#!/usr/bin/env bash
# Every GPU check in one go, for a CUDA machine: the GPU and engine tests, the tutorial's default
# run (`nbtuner train --model smollm2 --data identity.json`, no flags) with its identity report,
# merge and chat, and the throughput benchmark. CI has no GPU, so this is run by hand where one is lent.
# Usage: bash bench/gpu_check.sh [OUTDIR]   (PYTHON=python3 by default; the package must be importable)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
export NBTUNER_HOME=${NBTUNER_HOME:-$(mktemp -d)} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
work=$(mktemp -d)
step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py - <<'PY'
import importlib.metadata as m
import torch
print({p: m.version(p) for p in ["torch", "transformers", "peft", "bitsandbytes", "accelerate"]})
print("cuda", torch.cuda.is_available(), torch.version.cuda, "bf16", torch.cuda.is_bf16_supported())
PY

step "tests on CUDA (tiny model)"
$py -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_engine.py \
    tests/test_identity_metrics.py tests/test_data.py tests/test_cli.py 2>&1 | tail -25

step "tutorial default run on CUDA (embedded SmolLM2)"
$py -m nbtuner data identity --name Nova --creator "Ada Lab" -o "$work/identity.json"
SECONDS=0
$py -m nbtuner train --model smollm2 --data "$work/identity.json" --out "$work/run" --log-every 10 ${TRAIN_ARGS:-} 2>&1 \
    | tee "$out/train.txt" | grep -v "^step [0-9]*/" | tail -30
echo "train command wall: ${SECONDS} s" | tee -a "$out/train.txt"
$py -m nbtuner eval smollm2 --adapter "$work/run/adapter" --persona Nova --out "$out/report" | tail -8
$py -m nbtuner merge smollm2 "$work/run/adapter" "$work/merged" | tail -4
$py -m nbtuner chat smollm2 --adapter "$work/run/adapter" --compare --prompt "Who are you?" \
    --prompt "What is the capital of France?" --max-new-tokens 40

step "throughput (bf16 vs fp32, QLoRA vs LoRA)"
$py bench/train_throughput.py --steps "${BENCH_STEPS:-30}" --rounds 2 2>&1 | grep -v "^step\|^note" | tail -12 \
    | tee "$out/throughput.md"

step "a 1.5B-shaped model: QLoRA vs LoRA speed and memory"
$py bench/gpu_scale.py --steps "${BENCH_STEPS:-30}" 2>&1 | grep -v "^step\|^note" | tail -8 | tee "$out/scale.md"
step "done"
