"""Convert a checkpoint into a clean adapter folder, merge an adapter into its base, verify both.

Both write into a temporary sibling folder and rename it into place at the end, so an error or
an interrupt never leaves half an adapter or half a merged model, and an existing output is only
replaced when the caller passes ``force``.

A QLoRA adapter learned corrections to the *nf4-rounded* base weights, so it is merged into
those weights dequantised to full precision (the same 4-bit config re-created, then
``model.dequantize``), not into the original checkpoint: measured here, merging into the
original weights agreed with base+adapter on 58% of next-token predictions, merging into the
dequantised weights on 99%+. Dequantise before any forward pass: bitsandbytes' CPU path repacks
4-bit weights on first use, after which dequantising gives garbage.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, NbtunerError, OutputExistsError

ADAPTER_META_FILE = "nbtuner_adapter.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
VERIFY_PROMPTS = ("Please introduce yourself", "请介绍一下你自己", "What is the capital of France?")


class VerificationError(NbtunerError):
    """The merged model does not reproduce base+adapter; nothing was written."""


def adapter_metadata(adapter_dir: str | Path | None) -> dict[str, Any]:
    """nbtuner's record beside a PEFT adapter (method, base spec...); empty for foreign adapters."""
    if not adapter_dir:
        return {}
    path = Path(adapter_dir) / ADAPTER_META_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@dataclass
class ExportResult:
    """What convert or merge wrote, with the verification figures; printable and notebook-friendly."""

    kind: str  # "adapter" | "merged"
    path: Path
    files: list[tuple[str, int]]
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def __str__(self) -> str:
        lines = [f"{self.kind} written to {self.path} ({_human(self.total_bytes)})"]
        lines += [f"  {name}  {_human(size)}" for name, size in self.files]
        lines += [f"  check: {k} = {v}" for k, v in self.checks.items()]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"ExportResult({self.kind}, '{self.path}', {len(self.files)} files, {_human(self.total_bytes)})"

    def _repr_html_(self) -> str:
        from html import escape

        files = "".join(f"<tr><td><code>{escape(n)}</code></td><td>{_human(s)}</td></tr>" for n, s in self.files)
        checks = "".join(f"<li>{escape(str(k))}: <b>{escape(str(v))}</b></li>" for k, v in self.checks.items())
        return (f"<div><b>{escape(self.kind)}</b> written to <code>{escape(str(self.path))}</code> "
                f"({_human(self.total_bytes)})<table>{files}</table><ul>{checks}</ul></div>")


def _listing(folder: Path) -> list[tuple[str, int]]:
    return [(p.name, p.stat().st_size) for p in sorted(folder.iterdir()) if p.is_file()]


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExistsError(f"{out}: already exists; choose another output or pass --force to replace it")


def move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(tmp, out)


def temp_sibling(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))


def write_adapter_card(folder: str | Path, meta: dict[str, Any]) -> None:
    """A README.md model card: what the adapter is, how it was trained, how to load it."""
    folder = Path(folder)
    method = meta.get("method", "lora")
    rows = [("base model", meta.get("base_model")), ("method", method),
            ("LoRA r / alpha / dropout", f"{meta.get('lora_r')} / {meta.get('lora_alpha')} / {meta.get('lora_dropout')}"),
            ("target modules", meta.get("target_modules")), ("steps", meta.get("steps")),
            ("epochs", meta.get("epochs")), ("learning rate", meta.get("lr")),
            ("batch size", meta.get("batch_size")), ("max length", meta.get("max_length")),
            ("training data", f"{meta.get('data')} ({meta.get('train_samples')} samples, "
                              f"sha256 {str(meta.get('data_sha256'))[:12]})"),
            ("final training loss", meta.get("final_loss")), ("run status", meta.get("status"))]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows if v is not None)
    quant = ("\nThe base was loaded in 4-bit NF4 with double quantisation during training (QLoRA); load it the "
             "same way for inference, or merge with `nbtuner merge`, which merges into the dequantised weights.\n"
             if method == "qlora" else "")
    text = f"""# LoRA adapter trained with nbtuner

| | |
|---|---|
{table}
{quant}
Load with plain PEFT:

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
base = AutoModelForCausalLM.from_pretrained("{meta.get('base_path', meta.get('base_model'))}")
model = PeftModel.from_pretrained(base, "<this folder>")
```
"""
    (folder / "README.md").write_text(text, encoding="utf-8")


def _meta_for(source: Path) -> dict[str, Any]:
    """The adapter's record, or one rebuilt from the run folder around a Trainer checkpoint."""
    meta = adapter_metadata(source)
    if meta:
        return meta
    run_record = source.parent.parent / "run.json"
    if not run_record.is_file():
        return {}
    record = json.loads(run_record.read_text(encoding="utf-8"))
    cfg = record.get("config", {})
    state_file = source / "trainer_state.json"
    state = json.loads(state_file.read_text(encoding="utf-8")) if state_file.is_file() else {}
    losses = [h["loss"] for h in state.get("log_history", []) if "loss" in h]
    return {"base_model": cfg.get("model"), "base_path": record.get("model_path"), "method": cfg.get("method"),
            "lora_r": cfg.get("lora_r"), "lora_alpha": cfg.get("lora_alpha"),
            "lora_dropout": cfg.get("lora_dropout"), "target_modules": cfg.get("target_modules"),
            "status": f"checkpoint {source.name}", "steps": state.get("global_step"),
            "epochs": state.get("epoch"), "lr": cfg.get("lr"), "batch_size": cfg.get("batch_size"),
            "max_length": cfg.get("max_length"), "data": cfg.get("data"), "data_sha256": record.get("data_sha256"),
            "train_samples": record.get("train_samples"), "final_loss": losses[-1] if losses else None,
            "system": cfg.get("system")}


def chosen_checkpoint(run_dir: Path) -> Path:
    """What a run folder stands for when it is exported: the checkpoint its probes chose, else
    its final adapter. Other folders are taken as they are."""
    record_file = run_dir / "run.json"
    if not record_file.is_file():
        return run_dir
    best = json.loads(record_file.read_text(encoding="utf-8")).get("best_checkpoint")
    if best and Path(best).is_dir():
        return Path(best)
    return run_dir / "adapter"


def convert(checkpoint: str | Path, out: str | Path, *, force: bool = False) -> ExportResult:
    """A Trainer checkpoint, an adapter folder or a run folder (its chosen checkpoint) -> a clean
    PEFT adapter folder with a model card."""
    source, out = chosen_checkpoint(Path(checkpoint)), Path(out)
    if not (source / "adapter_config.json").is_file():
        raise ConfigError(f"{source}: not a LoRA checkpoint or adapter folder (no adapter_config.json)")
    weights = [name for name in ADAPTER_FILES[1:] if (source / name).is_file()]
    if not weights:
        raise ConfigError(f"{source}: adapter weights missing (expected adapter_model.safetensors)")
    _check_output(out, force)
    meta = _meta_for(source)
    tmp = temp_sibling(out)
    try:
        for name in ("adapter_config.json", *weights):
            shutil.copy2(source / name, tmp / name)
        (tmp / ADAPTER_META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        write_adapter_card(tmp, meta)
        checks = _verify_adapter_folder(tmp)
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult("adapter", out, _listing(out), checks)


def _verify_adapter_folder(folder: Path) -> dict[str, Any]:
    """Plain PEFT must be able to read it, and the weights must hold LoRA matrices."""
    from peft import PeftConfig
    from safetensors import safe_open

    config = PeftConfig.from_pretrained(str(folder))
    weights = folder / "adapter_model.safetensors"
    tensors = 0
    if weights.is_file():
        with safe_open(str(weights), "pt") as fh:
            keys = list(fh.keys())
        tensors = len(keys)
        if not any("lora_A" in k for k in keys) or not any("lora_B" in k for k in keys):
            raise VerificationError(f"{weights}: no LoRA matrices found")
    return {"peft_type": str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type),
            "r": getattr(config, "r", None), "tensors": tensors}


def _prompt_batch(tokenizer: Any, prompts: tuple[str, ...], system: str | None) -> dict[str, Any]:
    from .chat import build_messages

    texts = [tokenizer.apply_chat_template(build_messages(p, (), system), tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _logits(model: Any, batch: dict[str, Any]) -> Any:
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        out = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    return out[batch["attention_mask"].bool()]


def merge(base: str, adapter: str | Path, out: str | Path, *, max_shard_size: str = "2GB", force: bool = False,
          verify: bool = True, trust_remote_code: bool = False) -> ExportResult:
    """Base + adapter -> a standalone model folder (sharded safetensors, tokenizer, chat template)."""
    from peft import PeftModel

    from .models import load_model, load_tokenizer, resolve_model

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    _check_output(out, force)
    meta = adapter_metadata(adapter) or _meta_for(adapter)
    qlora = meta.get("method") == "qlora"
    resolved = resolve_model(base)
    tokenizer = load_tokenizer(resolved, trust_remote_code)

    model = load_model(resolved, quantize_4bit=qlora, precision="fp32", trust_remote_code=trust_remote_code)
    if qlora:
        import torch

        model = model.dequantize(dtype=torch.float32) or model
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = temp_sibling(out)
    try:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        del merged, model
        card = {**meta, "merged_into": "nf4-dequantised base weights (fp32)" if qlora else "base weights"}
        (tmp / "nbtuner_merge.json").write_text(json.dumps(card, indent=2, ensure_ascii=False), encoding="utf-8")
        checks = verify_merge(resolved, adapter, tmp, qlora, meta.get("system"), trust_remote_code) if verify else {}
        _write_merge_card(tmp, card, checks)
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult("merged", out, _listing(out), checks)


def verify_merge(resolved: Any, adapter: Path, merged_dir: Path, qlora: bool, system: str | None = None,
                 trust_remote_code: bool = False) -> dict[str, Any]:
    """Reloads the merged folder on its own and compares next-token logits with base+adapter.

    The reference is the model as trained (4-bit base for QLoRA). Passing means: the merged model
    picks the same next token almost everywhere, and it is not simply the base model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import disable_4bit_cpu_repacking, load_model

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = _prompt_batch(tokenizer, VERIFY_PROMPTS, system)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=trust_remote_code)
    merged_logits = _logits(merged, batch)
    del merged
    base = load_model(resolved, quantize_4bit=qlora, precision="fp32", trust_remote_code=trust_remote_code)
    disable_4bit_cpu_repacking(base)  # else a CPU computes the reference in bf16, not in fp32
    reference = PeftModel.from_pretrained(base, str(adapter))
    ref_logits = _logits(reference, batch)
    with reference.disable_adapter():
        base_logits = _logits(reference, batch)
    del reference
    agree = (merged_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    max_diff = (merged_logits - ref_logits).abs().max().item()
    base_diff = (base_logits - ref_logits).abs().max().item()
    checks = {"positions": int(merged_logits.shape[0]), "argmax_agreement": round(agree, 4),
              "max_logit_diff": round(max_diff, 5), "adapter_effect_max_logit_diff": round(base_diff, 4),
              "reference": "4-bit base + adapter" if qlora else "base + adapter"}
    # The reference computes in fp32 from the same dequantised weights (measured: max logit
    # difference 0.00015 on SmolLM2 on a CPU, 0.00012 on a GPU), so agreement must be near total.
    needed = 0.999
    if agree < needed:
        raise VerificationError(f"merged model disagrees with base+adapter: next-token agreement {agree:.1%} "
                                f"(needed {needed:.1%}), max logit difference {max_diff:.3f}; nothing was written")
    if base_diff <= max_diff:
        raise VerificationError(f"the adapter changes the logits by at most {base_diff:.4f}, no more than the merge "
                                f"error {max_diff:.4f}: the merge cannot be told apart from the base; nothing written")
    checks["verified"] = True
    return checks


def _write_merge_card(folder: Path, card: dict[str, Any], checks: dict[str, Any]) -> None:
    merged_into = card.get("merged_into")
    lines = [f"# {card.get('base_model')} merged with a LoRA adapter (nbtuner)", "",
             f"- method: {card.get('method')}; merged into: {merged_into}",
             f"- training data: {card.get('data')} ({card.get('train_samples')} samples), "
             f"{card.get('steps')} steps, final loss {card.get('final_loss')}", "",
             "## Verification", "", "On a few chat prompts this folder, loaded on its own with transformers, was "
             "compared with the base model plus the adapter:", ""]
    lines += [f"- {k}: {v}" for k, v in checks.items()]
    lines += ["", "Load it with plain transformers: `AutoModelForCausalLM.from_pretrained(\"<this folder>\")`."]
    (folder / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
