#!/usr/bin/env bash
# XTuner's "personal assistant" tutorial, end to end with nbtuner on the embedded
# SmolLM2-135M-Instruct, on a CPU, in minutes:
#   chat before -> identity data -> check -> QLoRA fine-tune -> convert -> merge -> chat after.
# Usage: bash examples/personal_assistant.sh   (or `make demo`); NAME, CREATOR and OUT can be overridden.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=${NAME:-Nova}
CREATOR=${CREATOR:-the nbtuner workshop}
OUT=${OUT:-outputs/personal_assistant}
PROMPTS=(--prompt "Please introduce yourself" --prompt "请介绍一下你自己" --prompt "What is the capital of France?")
step() { printf '\n=== %s\n' "$*"; }
start=$(date +%s)

step "1. The base model, before fine-tuning"
nbtuner chat smollm2 "${PROMPTS[@]}" --max-new-tokens 60

step "2. An identity dataset for '$NAME' (XTuner conversation JSON)"
mkdir -p "$OUT"
nbtuner data identity --name "$NAME" --creator "$CREATOR" -o "$OUT/identity.json" --force

step "3. Check it with the model's chat template"
nbtuner data check "$OUT/identity.json" --model smollm2 --max-length 256

step "4. QLoRA fine-tune (examples/personal_assistant.yaml)"
nbtuner train examples/personal_assistant.yaml --data "$OUT/identity.json" --out "$OUT/run" --force --log-every 5

step "5. Convert the run's chosen checkpoint (best on the identity probes) into a clean PEFT adapter"
nbtuner convert "$OUT/run" "$OUT/hf_adapter" --force

step "6. Merge the adapter into the base model (verified against base + adapter)"
nbtuner merge smollm2 "$OUT/run/adapter" "$OUT/merged" --max-shard-size 200MB --force

step "7. After: base and tuned side by side on the same prompts"
nbtuner chat smollm2 --adapter "$OUT/run/adapter" --compare "${PROMPTS[@]}" --max-new-tokens 60

step "8. The merged folder on its own, with plain transformers"
python - "$OUT/merged" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging
logging.disable_progress_bar()
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
for prompt in ["Please introduce yourself", "请介绍一下你自己"]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=60, do_sample=False)
    print(f"[merged] {prompt!r} -> {tok.decode(out[0][ids['input_ids'].shape[1]:], skip_special_tokens=True)!r}")
PY

step "Artifacts"
echo "dataset:        $OUT/identity.json"
echo "run folder:     $OUT/run (config.yaml, metrics.jsonl, samples.jsonl, run.json, checkpoints/)"
echo "final adapter:  $OUT/run/adapter"
echo "converted:      $OUT/hf_adapter (the checkpoint recorded as best_checkpoint in $OUT/run/run.json)"
echo "merged model:   $OUT/merged"
echo "total time:     $(( $(date +%s) - start )) s"
