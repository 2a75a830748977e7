"""Run configuration: dataclasses, filled from a YAML file and `section.key=value` overrides.

    torchrun llama_posttrain/train/dpo.py --config experiments/quickstart/dpo.yaml optim.lr=5e-7 train.steps=200

YAML maps onto the dataclasses field by field; an unknown section or key, a value of the wrong
type, a choice outside its `Literal[...]` or a number outside its bound is an error that names
the key and the file (or the override). Override values are parsed as YAML scalars (`1e-5`,
`true`, `null`, `[a, b]`). `--help` lists every key with its default and help (`opt`: the field's metadata).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import fnmatch
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml

from llama_posttrain.data.io import write_text
from llama_posttrain.llama.formats import read_yaml  # the one YAML reader of configs


# Bounds ride on the annotation: Annotated[int, AtLeast(1)], Annotated[float, Interval(0, 1, high_open=True)].
class AtLeast(typing.NamedTuple):
    min: float


class Interval(typing.NamedTuple):
    """The allowed values of a number: `x in Interval(0, 0.5, high_open=True)`; NaN is in none."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return bool(above and below)

    def __str__(self) -> str:
        low, high = (
            "(" if self.low_open or self.low == -math.inf else "[",
            ")" if self.high_open or self.high == math.inf else "]",
        )
        return f"{low}{self.low:g}, {self.high:g}{high}"


PosInt = Annotated[int, AtLeast(1)]
NonNegInt = Annotated[int, AtLeast(0)]
NonNegFloat = Annotated[float, AtLeast(0.0)]
Decay = Annotated[float, Interval(0.0, 1.0, high_open=True)]  # a moving average's decay (Adam's betas)
ChatTemplate = Literal["llama3", "llama3.1", "llama3.2"]  # llama_posttrain/llama/chat.py TEMPLATES (3.3 uses llama3.1)


def opt(default, help: str):
    """A config field with its `--help` text: `lr: float = opt(1e-5, "peak learning rate")`. A list or dict
    default is copied for each instance (a default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSection:
    checkpoint: str | None = opt(None, "native / HF / Meta directory to start from")
    preset: str | None = opt(None, "or a randomly initialized preset (tiny experiments)")
    tokenizer: str | None = opt(
        None, "file or model folder; default: the checkpoint folder's; byte tokenizer for presets"
    )
    chat_template: ChatTemplate | None = opt(None, "llama3|llama3.1|llama3.2; default: the checkpoint's, else llama3")


@dataclass
class DataSection:
    train: str | list[str | dict] = opt("", "JSONL/Parquet file, Parquet/datasets folder, or [{path, weight}]")
    eval: str | None = opt(None, "held-out file, evaluated whole every train.eval_every steps")
    max_len: PosInt = opt(2048, "tokens per row")
    batch_size: PosInt = opt(32, "examples per optimizer step, over all ranks")
    tokens_per_microbatch: PosInt = opt(16384, "per rank")
    overlength: Literal["truncate", "drop"] = opt("truncate", "what to do with an example over max_len")
    skip_invalid: bool = opt(False, "skip (and count) invalid records instead of stopping at the first")
    keep_strengths: list[str] | None = opt(None, "Llama 3: [significantly_better, better]")
    seed: int = opt(0, "shuffling of the examples (and of RM responses)")
    cache: bool = opt(
        True,
        "tokenize once into arrays on disk (llama_posttrain/data/cache.py); false: encode in memory every start",
    )
    cache_dir: str | None = opt(None, "tokenized caches; default <train.run_dir>/.tokenized (pipeline: its folder's)")
    num_workers: NonNegInt = opt(0, "processes that tokenize a new cache; 0: one per CPU core (at most 32)")


@dataclass
class OptimSection:
    lr: NonNegFloat = opt(1e-5, "peak learning rate")
    weight_decay: NonNegFloat = opt(0.0, "AdamW's decoupled weight decay")
    betas: list[Decay] = opt([0.9, 0.95], "AdamW's moving-average decays")
    eps: NonNegFloat = opt(1e-8, "AdamW's denominator term")
    warmup_steps: NonNegInt = opt(0, "linear warmup from lr / warmup_steps")
    schedule: Literal["cosine", "linear", "constant"] = opt("cosine", "decay after warmup")
    min_lr_ratio: NonNegFloat = opt(0.1, "the decay ends at lr * min_lr_ratio")
    grad_clip: NonNegFloat = opt(1.0, "max global grad norm; 0 = off")
    fused: bool | None = opt(None, "fused AdamW, a non-finite step skipped on the device; None: unless cpu_offload")


@dataclass
class TrainSection:
    run_dir: str = opt("runs/default", "checkpoints, metrics.jsonl, config.yaml, the exported model")
    steps: PosInt = opt(100, "optimizer steps")
    seed: int = opt(0, "model init (presets and fresh heads)")
    eval_every: NonNegInt = opt(0, "0 = only at the start and the end")
    save_every: NonNegInt = opt(0, "0 = only at the end")
    keep_last: NonNegInt = opt(2, "checkpoints kept; 0 = all")
    resume: Literal["auto", "never", "restart"] = opt("auto", "restart deletes this run_dir's previous run first")
    mixed_precision: Literal["auto", "bf16", "fp32"] = opt("auto", "auto: bf16 on CUDA, fp32 on CPU")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in the backward")
    compile: bool = opt(False, "torch.compile each block")
    # Micro-batch shapes. N: every micro-batch (rows per micro-batch, T), T in llama_posttrain/data/rows.py bucket_lengths(max_len, N)
    # (multiples of N up to 8N, then doubling), each shape compiled once (dynamic=False); 0: rows as packed and T
    # the longest row rounded up to 8, compiled with torch's dynamic shapes; auto: 128 with train.compile, else 0.
    shape_buckets: NonNegInt | Literal["auto"] = opt(
        "auto", "static shapes: T in buckets of N, 0 off; auto: 128 if compile"
    )
    shard_degree: NonNegInt = opt(
        0,
        "ranks sharing one copy of the model; 0 = all (FSDP); N: HSDP, sharded within groups of N ranks (a node's GPUs), replicated across the nproc/N groups",
    )
    cpu_offload: bool = opt(
        False,
        "FSDP2 CPU offload: parameters, gradients and optimizer state in CPU memory (slower; for a model that does not fit)",
    )
    kernels: Literal["auto", "triton", "torch"] = opt("auto", "target log-prob path")
    max_bad_steps: PosInt = opt(5, "consecutive non-finite steps before stopping")
    export_hf: bool = opt(False, "also write <run_dir>/model_hf in the Hugging Face format")


@dataclass
class LoggingSection:
    wandb: Literal["offline", "online", "disabled"] = opt("offline", "Weights & Biases logging")
    project: str = opt("llama-posttrain", "wandb project")
    name: str | None = opt(None, "default: the run_dir's name")
    group: str | None = opt(None, "wandb run group (the pipeline sets its run's name: every stage in one group)")
    job_type: str | None = opt(None, "wandb job type (the pipeline sets the stage: rm, sft, dpo, pretrain)")
    log_every: PosInt = opt(1, "steps between metric lines")
    progress: bool = opt(True, "progress bar on stderr")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    logging: LoggingSection = field(default_factory=LoggingSection)


def _check_type(value, tp, where: str):
    """Validate (and lightly coerce: int -> float) a YAML value against a field's annotation."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        value = _check_type(value, base, where)
        for bound in extras:
            if isinstance(bound, AtLeast) and not value >= bound.min:
                raise ValueError(f"{where}: must be >= {bound.min:g}, got {value!r}")
            if isinstance(bound, Interval) and value not in bound:
                raise ValueError(f"{where}: must be in {bound}, got {value!r}")
        return value
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ValueError(f"{where} must be one of {typing.get_args(tp)}, got {value!r}")
        return value
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
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):  # .nan, .inf: no setting wants one
        raise ValueError(f"{where}: must be a finite number, got {value!r}")
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls, include_extras=True)


def from_dict(cls, raw: dict, source: str, overridden: dict[str, str] | None = None):
    """Sections of raw -> cls. Errors name `source` (the file), or for a key in `overridden`
    ("section.key" -> "override 'section.key=value'") the override that set it."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    overridden = overridden or {}
    hints = _hints(cls)
    sections = {}
    for name, values in raw.items():
        if name not in hints:
            raise ValueError(f"{source}: unknown section {name!r} (known: {', '.join(hints)})")
        sec_cls = hints[name]
        sec_hints = _hints(sec_cls)
        values = values or {}
        if not isinstance(values, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping")
        kwargs = {}
        for key, value in values.items():
            where = overridden.get(f"{name}.{key}", source)
            if key not in sec_hints:
                raise ValueError(f"{where}: unknown key {name}.{key} (known: {', '.join(sec_hints)})")
            kwargs[key] = _check_type(value, sec_hints[key], f"{where}: {name}.{key}")
        try:
            sections[name] = sec_cls(**kwargs)
        except ValueError as e:  # the section's own checks (__post_init__): name where its values came from
            named = [key for key in kwargs if f"{name}.{key}" in str(e)] or list(kwargs)  # the keys it names
            names = sorted({overridden.get(f"{name}.{key}", source) for key in named}) or [source]
            raise ValueError(f"{', '.join(names)}: {e}") from None
    return cls(**sections)


def load_config(cls, path: str | None, overrides: list[str] = ()):
    """YAML file + `section.key=value` overrides -> cls instance."""
    raw: dict = {}
    if path:
        raw = read_yaml(path)
        if raw is None:
            raise ValueError(f"{path}: the config file is empty")
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    overridden = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like section.key=value")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if not isinstance(raw.get(section) or {}, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping")
        raw[section] = raw.get(section) or {}
        try:
            raw[section][key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: YAML syntax error in the value: {e}") from None
        overridden[dotted] = f"override {item!r}"
    return from_dict(cls, raw, path or "<overrides>", overridden)


def differences(saved, now, key: str = "") -> dict[str, tuple]:
    """Dotted key -> (saved value, new value) for every leaf of two configs (nested mappings) that differs;
    a key missing on one side reads as '<absent>'. The one config diff (resume checks, the pipeline)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = {}
        for k in [*saved, *(k for k in now if k not in saved)]:
            out |= differences(saved.get(k, "<absent>"), now.get(k, "<absent>"), f"{key}.{k}" if key else str(k))
        return out
    return {} if saved == now else {key: (saved, now)}


def changeable(key: str, patterns) -> bool:
    """A dotted key that one of `patterns` names (fnmatch: "train.steps", "logging.*"), itself or a section
    above it ("configs" names configs.rm)."""
    parts = key.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(k, p) for k in prefixes for p in patterns)


def config_changes(saved: dict, now: dict, patterns, defaults: dict | None = None) -> tuple[dict, dict]:
    """A recorded config against the config of a new start: what may change (a resume, a run folder
    continued) and what not, one rule for every record. -> (changes allowed, changes refused), each
    {"section.key": (saved, now)} in `differences`' order; a change is allowed when `patterns` (the
    caller's changeable keys, as for `changeable`) name its key or every key that differs below it, and a
    refused mapping is shown without its changeable keys (one left empty reads as '<absent>').
    defaults: the config class's defaults; a key the saved config lacks (added to the code since the
    record was written: a new key's default keeps the old behaviour) reads as its default there."""
    if defaults is not None:
        saved = _with_defaults(saved, defaults)
    allowed, refused = {}, {}
    for key, (was, new) in differences(saved, now).items():
        if changeable(key, patterns):
            allowed[key] = (was, new)
            continue
        was_, new_ = _without_changeable(was, key, patterns), _without_changeable(new, key, patterns)
        if was_ == new_:
            allowed[key] = (was, new)
        else:
            refused[key] = (was_, new_)
    return allowed, refused


def _without_changeable(value, key: str, patterns):
    """`value` (the config's at `key`) without the keys `patterns` name, at any depth; a mapping left empty
    reads as absent."""
    if not isinstance(value, dict):
        return value
    kept = {k: _without_changeable(v, f"{key}.{k}", patterns) for k, v in value.items()}
    kept = {k: v for k, v in kept.items() if v != "<absent>" and not changeable(f"{key}.{k}", patterns)}
    return kept or "<absent>"


def _with_defaults(saved, defaults):
    if not (isinstance(saved, dict) and isinstance(defaults, dict)):
        return saved
    filled = {k: v for k, v in defaults.items() if k not in saved}
    return {**filled, **{k: _with_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def _help(f: dataclasses.Field) -> str:
    return f"  # {f.metadata['help']}" if f.metadata.get("help") else ""


def describe(cls) -> str:
    """Every section.key (or key, for a flat config such as the pipeline's) with its type, default and
    help (its field's metadata, `opt`): the `--help` epilog."""
    if not all(dataclasses.is_dataclass(tp) for tp in _hints(cls).values()):  # flat: keys, no sections
        lines = []
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(f"  {f.name} = {default!r}" + _help(f))
        return "\n".join(lines)
    lines = []
    for name, sec_cls in _hints(cls).items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(sec_cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            tp = _hints(sec_cls)[f.name]
            choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
            text = f"  {name}.{f.name} = {default!r}" + (f"  {'|'.join(choices)}" if choices else "")
            lines.append(text + _help(f))
    return "\n".join(lines)


def parse_args(cls, argv=None, description: str | None = None):
    """`--config FILE section.key=value ...` -> config instance."""
    ap = argparse.ArgumentParser(
        description=description,
        epilog="keys (section.key = default):\n" + describe(cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config", help="YAML file")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    return load_config(cls, args.config, args.overrides)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config, path: Path) -> None:
    write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def from_flat_dict(cls, raw: dict, source: str | dict[str, str]):
    """A flat dataclass (keys, no sections: the pipeline's config, a task's arguments) from key -> value,
    checked as the training configs are. `source` says where the values came from: one name for all,
    or key -> name (the file, or the override that set it); every error names it and the key. A
    ValueError from the dataclass's own checks (__post_init__) is prefixed with the source too."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    where = source if isinstance(source, dict) else dict.fromkeys(raw, source)
    hints = _hints(cls)
    unknown = [key for key in raw if key not in hints]
    if unknown:
        names = ", ".join(sorted({str(where[key]) for key in unknown}))
        raise ValueError(f"{names}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(hints)})")
    values = {key: _check_nested(v, hints[key], f"{where[key]}: {key}") for key, v in raw.items()}
    try:
        return cls(**values)
    except ValueError as e:
        names = source if isinstance(source, str) else ", ".join(sorted(set(where.values()))) or "defaults"
        raise ValueError(f"{names}: {e}") from None


def _check_nested(value, tp, where: str):
    """_check_type, descending into dict[K, V] and list[V] values so that an error names the entry
    (`variants.dpo[0]`); typing.Any accepts anything."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin is list and args and isinstance(value, list):
        return [_check_nested(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict and args and isinstance(value, dict):
        return {_check_nested(k, args[0], where): _check_nested(v, args[1], f"{where}.{k}") for k, v in value.items()}
    return _check_type(value, tp, where)  # a leaf, or a value that is not the container it should be: the error
