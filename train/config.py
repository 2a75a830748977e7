"""Run configuration: dataclasses, filled from a YAML file and `section.key=value` overrides.

    torchrun train/dpo.py --config experiments/quickstart/dpo.yaml optim.lr=5e-7 train.steps=200

YAML maps onto the dataclasses field by field; an unknown section or key is an error that names it
and the file. Override values are parsed as YAML scalars (`1e-5`, `true`, `null`, `[a, b]`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class ModelSection:
    checkpoint: str | None = None  # native / HF / Meta directory to start from
    preset: str | None = None  # or a randomly initialized preset (tiny experiments)
    tokenizer: str | None = None  # default: the shipped byte-level tokenizer


@dataclass
class DataSection:
    train: str = ""
    eval: str | None = None
    max_len: int = 2048
    batch_size: int = 32  # examples per optimizer step, over all ranks
    tokens_per_microbatch: int = 16384  # per rank
    overlength: str = "truncate"  # truncate | drop
    skip_invalid: bool = False
    keep_strengths: list[str] | None = None  # Llama 3: [significantly_better, better]
    seed: int = 0


@dataclass
class OptimSection:
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # 0 = off


@dataclass
class TrainSection:
    run_dir: str = "runs/default"
    steps: int = 100
    seed: int = 0
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    keep_last: int = 2
    resume: str = "auto"  # auto | never
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    activation_checkpointing: bool = False
    compile: bool = False
    kernels: str = "auto"  # auto | triton | torch
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping
    export_hf: bool = False


@dataclass
class LoggingSection:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "llama-posttrain"
    name: str | None = None
    log_every: int = 1
    progress: bool = True


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


CHOICES = {
    ("data", "overlength"): ("truncate", "drop"),
    ("optim", "schedule"): ("cosine", "linear", "constant"),
    ("train", "resume"): ("auto", "never"),
    ("train", "mixed_precision"): ("auto", "bf16", "fp32"),
    ("train", "kernels"): ("auto", "triton", "torch"),
    ("logging", "wandb"): ("offline", "online", "disabled"),
}


def _check_type(value, tp, where: str):
    """Validate (and lightly coerce: int -> float) a YAML value against a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        errors = []
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [_check_type(v, arg, where) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls, raw: dict, source: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    sections = {}
    for name, values in raw.items():
        if name not in hints:
            raise ValueError(f"{source}: unknown section {name!r} (known: {', '.join(hints)})")
        sec_cls = hints[name]
        sec_hints = typing.get_type_hints(sec_cls)
        values = values or {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping")
        kwargs = {}
        for key, value in values.items():
            if key not in sec_hints:
                raise ValueError(f"{source}: unknown key {name}.{key} (known: {', '.join(sec_hints)})")
            value = _check_type(value, sec_hints[key], f"{source}: {name}.{key}")
            if (name, key) in CHOICES and value not in CHOICES[(name, key)]:
                raise ValueError(f"{source}: {name}.{key} must be one of {CHOICES[(name, key)]}, got {value!r}")
            kwargs[key] = value
        sections[name] = sec_cls(**kwargs)
    return cls(**sections)


def load_config(cls, path: str | None, overrides: list[str] = ()):
    """YAML file + `section.key=value` overrides -> cls instance."""
    raw: dict = {}
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections")
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        raw.setdefault(section, {})
        if raw[section] is None:
            raw[section] = {}
        raw[section][key] = yaml.safe_load(value)
    return from_dict(cls, raw, path or "<overrides>")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
