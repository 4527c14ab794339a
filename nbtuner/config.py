"""One flat fine-tuning configuration shared by YAML files, CLI flags, `--set` and `%%finetune`.

Flat keys keep the three spellings identical: `lr: 1e-4` in YAML, `--set lr=1e-4` on the command
line and in a notebook cell body all mean the same field. Defaults follow XTuner's
`internlm2_chat_1_8b_qlora_alpaca_e3` recipe in shape (LoRA on every linear layer, cosine
schedule, 3% warm-up, grad-norm 1), with batch and length sized for the embedded 135M model on a
laptop CPU.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import ConfigError

METHODS = ("auto", "qlora", "lora", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")

DEFAULT_EVAL_PROMPTS = ("Please introduce yourself", "请介绍一下你自己")


@dataclass
class FinetuneConfig:
    """Everything a run needs; `nbtuner train` writes the resolved copy into the run folder."""

    # what to train
    model: str = "smollm2"
    data: str | None = None
    data_format: str | None = None
    method: str = "auto"
    out: str | None = None
    trust_remote_code: bool = False
    # LoRA
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    target_modules: Any = "all-linear"
    # data
    max_length: int = 512
    system: str | None = None
    val_ratio: float = 0.0
    # optimisation
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 42
    # bookkeeping
    logging_steps: int = 1
    save_steps: int = 20
    eval_steps: int = 10
    eval_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_EVAL_PROMPTS))
    eval_max_new_tokens: int = 48
    resume_from: str | None = None
    # identity learning without parroting (see nbtuner/evaluate.py and nbtuner/replay.py)
    persona: str | None = None
    replay_ratio: float | None = None
    replay_prompts: list[str] | None = None
    replay_max_new_tokens: int = 96
    extra_probes: list[str] = field(default_factory=list)
    early_stop: bool = True
    identity_target: float = 0.9
    leakage_max: float = 0.1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks values early, before any model is loaded or any folder created."""
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        positive = {"lora_r": self.lora_r, "lora_alpha": self.lora_alpha, "max_length": self.max_length,
                    "batch_size": self.batch_size, "grad_accum": self.grad_accum, "lr": self.lr,
                    "logging_steps": self.logging_steps}
        for name, value in positive.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("lora_dropout", "warmup_ratio", "val_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if self.replay_ratio is not None and (not isinstance(self.replay_ratio, (int, float)) or self.replay_ratio < 0):
            raise ConfigError(f"replay_ratio must be >= 0 (or unset for automatic), got {self.replay_ratio!r}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ConfigError("set epochs > 0 or max_steps > 0")
        for name in ("eval_prompts", "replay_prompts", "extra_probes"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])

    @classmethod
    def build(cls, **settings: Any) -> "FinetuneConfig":
        """Like the constructor, but applies the model's measured recipe (as YAML and the CLI do)."""
        return from_mapping(settings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return from_mapping({**self.to_dict(), **changes})


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(FinetuneConfig)]


def _coerce(name: str, value: Any) -> Any:
    """YAML and `--set` give strings or YAML scalars; cast them to the field's declared type."""
    default = FinetuneConfig.__dataclass_fields__[name]
    template = default.default if default.default is not dataclasses.MISSING else default.default_factory()
    if value is None or template is None or isinstance(template, (list, str)) and not isinstance(template, bool):
        if isinstance(template, list) and isinstance(value, str):
            return [value]
        return value
    try:
        if isinstance(template, bool):
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(template, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(template, float):
            return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} expects a {type(template).__name__}, got {value!r}") from None
    return value


# Measured recipes for models whose library defaults would be wrong. The embedded SmolLM2-135M
# on a 2-core CPU: with XTuner's r=64/alpha=16 and lr 2e-4 the identity is not learned in the
# minutes a workshop has; at r=16/alpha=32, lr 5e-4, batch 4 the name appears by step 20. With
# replay at 0.8 (train.DEFAULT_REPLAY_RATIO), 50 steps reached 100% identity / 0% leakage where
# 40 steps at 0.6 gave 100% / 10% (same seed; BENCHMARKS.md has the seeds and variants measured).
# Keys a user sets always win.
MODEL_RECIPES: dict[str, dict[str, Any]] = {
    "smollm2": {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lr": 5e-4, "warmup_ratio": 0.1,
                "batch_size": 4, "max_length": 256, "epochs": 0.0, "max_steps": 50, "eval_steps": 25,
                "save_steps": 25},
}


def recipe_for(model: str | None) -> dict[str, Any]:
    return dict(MODEL_RECIPES.get(str(model or FinetuneConfig.model).lower(), {}))


def from_mapping(values: Mapping[str, Any], *, source: str = "config") -> FinetuneConfig:
    """Builds a config, rejecting unknown keys with a did-you-mean hint; the model's recipe fills
    the keys the caller did not set."""
    known = field_names()
    recipe = recipe_for(values.get("model"))
    if "epochs" in values or "max_steps" in values:  # either one decides the length; drop the recipe's pair
        recipe.pop("epochs", None)
        recipe.pop("max_steps", None)
    values = {**recipe, **values}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{source}: unknown setting '{key}'{suggestion}")
        kwargs[key] = _coerce(key, value)
    return FinetuneConfig(**kwargs)


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Parses `KEY=VALUE` strings; values are read as YAML scalars so `1e-4` and `[a, b]` work."""
    import yaml

    result: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got '{pair}'")
        key, raw = pair.split("=", 1)
        try:
            result[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            result[key.strip()] = raw
    return result


def load_yaml_text(text: str, *, source: str = "config") -> dict[str, Any]:
    import yaml

    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
    return values


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                text: str | None = None) -> FinetuneConfig:
    """YAML file (or text), then explicit overrides, in that order of precedence."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        values.update(load_yaml_text(p.read_text(encoding="utf-8"), source=str(p)))
    if text:
        values.update(load_yaml_text(text, source="cell"))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_mapping(values, source=str(path) if path else "config")
