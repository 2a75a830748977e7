"""The jobs' configs (sample.py, evaluate.py, average.py): one dataclass each, read as the training configs are.

    python llama_posttrain/jobs/sample.py --policy runs/r1/dpo/model --prompts prompts.jsonl --k 16
    python llama_posttrain/jobs/sample.py --config sample.yaml k=16 out_sft=sft.jsonl

A field is a `--flag` (its name with dashes) and a `key=value` override (the value parsed as YAML); `--config
FILE` is a YAML mapping of the same keys. A flag's type, bound, choices, default and help come from the field
(`opt`, the annotated types of llama_posttrain/train/config.py), and every value, from any of the three, is
checked by train/config.py from_flat_dict; an error names the flag, the override or the file. A key given twice
(a flag and an override, or the file and either: the later wins) is the override's or the flag's. This module
imports no torch: `--help` and a config error answer at once. The driver (llama_posttrain/driver/stage_jobs.py)
builds a job's dataclass and passes it as `args_of(config)`: a `key=value` override of each field off its
default, as the training jobs get theirs, so that a job's command (the first line of its log) reads as its config.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import yaml

from llama_posttrain.data.clean import CleanRules
from llama_posttrain.train.cli import HelpFormatter, json_object
from llama_posttrain.train.config import (
    AtLeast,
    ChatTemplate,
    Interval,
    NonNegInt,
    PosInt,
    from_flat_dict,
    read_yaml,
)

Fraction = Annotated[float, Interval(0.0, 1.0, low_open=True)]  # in (0, 1]
MODEL_LEN_MULTIPLE = 256  # vLLM's max_model_len from the data is rounded up to a multiple of this (vllm_engine.py)


def flag(default=dataclasses.MISSING, help: str = "", **argparse_kw):
    """A job's field: its help (as train/config.py `opt`) and the argparse settings of its flag that the type
    does not say (metavar, nargs="+" for a list, group: the help section, positional: a positional argument).
    No default: a required argument."""
    metadata = {"help": help, "argparse": argparse_kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


CLEAN = "cleaning (llama_posttrain/data/clean.py; every rule off unless given, every drop counted)"
VLLM = "vLLM (--engine vllm)"


@dataclass
class SampleConfig:
    """llama_posttrain/jobs/sample.py: rejection sampling."""

    policy: str = flag(help="the policy checkpoint folder")
    prompts: str = flag(help="prompt records (JSONL): a prompt (text or messages) and any other fields")
    rm: str | None = flag(None, "reward model checkpoint (helpfulness)")
    safety_rm: str | None = flag(None, "safety reward model, combined as in Llama 2")
    tokenizer: str | None = flag(None, "file or model folder; default: the policy folder's, else the byte tokenizer")
    chat_template: ChatTemplate | None = flag(None, "default: the policy folder's, else llama3")
    k: PosInt = flag(16, "samples per prompt")
    max_new_tokens: PosInt = flag(256, "generated tokens per sample at most")
    temperature: Annotated[float, AtLeast(0.0)] = flag(1.0, "0: greedy")
    top_p: Fraction = flag(1.0, "in (0, 1]; 1: off")
    top_k: NonNegInt = flag(0, "0: off")
    max_chars: PosInt | None = flag(None, "drop a sample longer than this")
    annotate: str | None = flag(None, "rm (default) | verifier:TASK (data/tasks, e.g. arithmetic) | file:labels.jsonl")
    task_args: dict[str, Any] | None = flag(
        None,
        'the arguments of --annotate verifier:TASK\'s task, e.g. \'{"max_digits": 1, "noise": 0.35}\'',
        metavar="JSON",
    )
    seed: int = flag(0, "rank r samples with seed + 1000003 * r (rank 0: the seed)")
    engine: Literal["native", "vllm"] = flag(
        "native",
        "native: llama_posttrain/llama/generate.py; vllm: vLLM on CUDA GPUs (pip install vllm), the engine for 8B+ "
        "models",
    )
    batch_size: PosInt = flag(64, "prompts per generate call (native engine)")
    compile: bool = flag(False, "torch.compile the decode step (native engine)")
    compile_mode: Literal["default", "reduce-overhead"] | None = flag(
        None,
        "--compile's torch.compile mode (default: default); reduce-overhead also captures CUDA graphs (CUDA only, "
        "not yet measured)",
    )
    out_sft: str | None = flag(None, "the SFT records (JSONL)")
    out_pairs: str | None = flag(None, "the preference records (JSONL)")
    out_sets: str | None = flag(None, "every prompt's samples as a set to annotate (JSONL)")
    out_report: str | None = flag(None, "the summary JSON (prompts, samples, sft, pairs, dropped) written here too")
    dedup: bool = flag(False, "drop an SFT record repeating an earlier prompt+response", group=CLEAN)
    max_repeat: float | None = flag(
        None, "drop a sample in which repeated word n-grams cover more than FRACTION of its words", group=CLEAN,
        metavar="FRACTION",
    )  # fmt: skip
    repeat_ngram: PosInt = flag(3, "n of --max-repeat", group=CLEAN, metavar="N")
    ban_phrase: list[str] = flag([], "drop a sample containing TEXT (case-insensitive); repeatable", group=CLEAN,
                                 metavar="TEXT")  # fmt: skip
    max_emoji: NonNegInt | None = flag(None, "drop a sample with more than N emoji", group=CLEAN, metavar="N")
    max_exclamation: NonNegInt | None = flag(
        None, "drop a sample with more than N exclamation marks", group=CLEAN, metavar="N"
    )
    tensor_parallel: PosInt = flag(1, "GPUs per vLLM engine", group=VLLM)
    vllm_max_model_len: PosInt | None = flag(
        None, f"default: the longest prompt + --max-new-tokens, rounded up to a multiple of {MODEL_LEN_MULTIPLE}",
        group=VLLM, metavar="N",
    )  # fmt: skip
    vllm_gpu_memory_utilization: Fraction = flag(
        0.9, "of the GPU's memory vLLM takes for the weights and its KV cache", group=VLLM, metavar="FRACTION"
    )
    vllm_seed_per_request: bool = flag(
        False, "seed every request with --seed (samples independent of the batch; slower); default: the engine's seed",
        group=VLLM,
    )  # fmt: skip

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) of the settings that do not go together."""
        out = []
        if self.max_repeat is not None and not 0 <= self.max_repeat <= 1:
            out.append(("max_repeat", f"a fraction in [0, 1], got {self.max_repeat}"))
        if any(not p.strip() for p in self.ban_phrase):
            out.append(("ban_phrase", "an empty phrase would ban every sample"))
        if self.task_args is not None and not (self.annotate or "").startswith("verifier:"):
            out.append(("task_args", "the arguments of --annotate verifier:TASK's task; give that too"))
        other = (
            ("vllm_max_model_len", "vllm_seed_per_request") if self.engine == "native" else ("compile", "compile_mode")
        )
        out += [
            (key, f"not an option of --engine {self.engine}")
            for key in other
            if getattr(self, key) not in (None, False)
        ]
        if self.compile_mode and not self.compile:
            out.append(("compile_mode", "the mode of --compile; give that too"))
        return out

    @property
    def clean(self) -> CleanRules:
        """The cleaning rules (llama_posttrain/data/clean.py) of the cleaning fields."""
        return CleanRules(
            self.max_repeat, self.repeat_ngram, tuple(self.ban_phrase), self.max_emoji, self.max_exclamation
        )

    @property
    def generate_compile(self) -> bool | str:
        """llama_posttrain/llama/generate.py's `compile`: False, True or the mode."""
        return self.compile_mode or self.compile


@dataclass
class EvalConfig:
    """llama_posttrain/jobs/evaluate.py: evaluation of one model on held-out data."""

    model: str = flag(help="the model evaluated (a reward model with --pairs)")
    out: str = flag(help="the result JSON")
    tokenizer: str | None = flag(None, "file or model folder; default: the model folder's, else the byte tokenizer")
    chat_template: ChatTemplate | None = flag(None, "default: the model folder's, else llama3")
    prompts: str | None = flag(None, "held-out prompt records (with --verifier and/or --rm)")
    verifier: str | None = flag(None, "task accuracy by this task's verifier (data/tasks)", metavar="TASK")
    task_args: dict[str, Any] | None = flag(None, "the task's arguments, e.g. '{}'", metavar="JSON")
    max_new_tokens: PosInt = flag(8, "generated tokens per prompt at most")
    seed: int = flag(0, "rank r samples with seed + 1000003 * r (rank 0: the seed)")
    pairs: str | None = flag(
        None, "held-out preference records: rm_accuracy of a reward model, dpo_reward_accuracy of a policy"
    )
    dpo_config: str | None = flag(None, "with --pairs and a policy: the DPO run's config.yaml (dpo.loss, ...)")
    reference: str | None = flag(None, "with --pairs and a policy: the DPO reference model (the SFT model)")
    keep_samples: bool = flag(False, "keep the samples of --prompts at t=1 (`samples`)")
    score_samples: list[str] = flag(
        [], "(repeatable) a reward --model's mean score of the samples RESULT kept of --prompts: rm_score_of",
        metavar="RESULT",
    )  # fmt: skip
    nll: str | None = flag(None, "held-out SFT records: nll per target token")
    max_len: Annotated[int, AtLeast(2)] = flag(4096, "of --nll records (and RM rows)")
    rm: str | None = flag(None, "reward model: rm_score, its mean score of the model's samples of --prompts")
    k: PosInt = flag(4, "samples per prompt of rm_score")
    batch_size: NonNegInt = flag(
        0, "prompts per generate call (its KV cache, printed); 0: all of a rank's prompts in one call"
    )

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) of the settings that do not go together."""
        policy_only = self.verifier or self.rm or self.keep_samples or self.nll
        checks = [
            ("verifier", (self.verifier or self.rm) and not self.prompts,
             "--verifier and --rm score samples of held-out prompts: give --prompts"),
            ("prompts", self.prompts and not (self.verifier or self.rm or self.keep_samples or self.score_samples),
             "give --verifier TASK (task accuracy), --rm RM (rm_score), --keep-samples or --score-samples"),
            ("keep_samples", (self.keep_samples or self.score_samples) and not self.prompts,
             "--keep-samples and --score-samples are samples of held-out prompts: give --prompts"),
            ("score_samples", self.score_samples and policy_only,
             "the model is a reward model; --verifier, --rm, --keep-samples and --nll need a policy"),
            ("dpo_config", (self.dpo_config or self.reference) and not self.pairs,
             "--dpo-config and --reference: dpo_reward_accuracy of --pairs; give --pairs too"),
            ("task_args", self.task_args is not None and not self.verifier,
             "the arguments of --verifier's task; give --verifier too"),
            ("", not (self.prompts or self.pairs or self.nll), "nothing to evaluate: give --prompts, --pairs and/or --nll"),
        ]  # fmt: skip
        return [(key, message) for key, bad, message in checks if bad]


@dataclass
class AverageConfig:
    """llama_posttrain/jobs/average.py: model averaging."""

    checkpoints: list[str] = flag([], "the checkpoint folders averaged", positional=True)
    out: str | None = flag(None, "the average's folder (new, empty or an earlier checkpoint)")
    weights: list[float] | None = flag(None, "one per checkpoint, summing to 1; default: uniform", nargs="+")
    format: Literal["native", "hf"] = flag("native", "of the average")
    dtype: Literal["float32", "bfloat16", "float16"] | None = flag(None, "of the average; default: the inputs'")
    replace_tokenizer: bool = flag(
        False, "replace --out's own tokenizer files where they differ from the inputs' (default: refuse, naming them)"
    )

    def problems(self) -> list[tuple[str, str]]:
        checks = [("checkpoints", not self.checkpoints, "the following arguments are required: checkpoints"),
                  ("out", self.out is None, "the following arguments are required: --out")]  # fmt: skip
        return [(key, message) for key, bad, message in checks if bad]


# ----------------------------------------------------------------------------- the command line


def _base(tp):
    """A field's annotation without Optional and Annotated: -> (the type, its bound or None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Annotated:
        tp, bound = typing.get_args(tp)[:2]
        return tp, bound
    return tp, None


def _value_type(tp, bound):
    """An argparse type of a flag's value: its bound checked, the error naming it ("must be >= 1, got 0")."""
    kind = {int: int, float: float}.get(tp, str)

    def parse(text):
        value = kind(text)
        if isinstance(bound, AtLeast) and not value >= bound.min:
            raise argparse.ArgumentTypeError(f"must be >= {bound.min:g}, got {text}")
        if isinstance(bound, Interval) and value not in bound:
            raise argparse.ArgumentTypeError(f"must be in {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


def _default(f: dataclasses.Field):
    """A field's default (a fresh one of a default_factory); MISSING for a required field."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def parser(cls, description: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of a job's config: a flag per field (a positional argument where the field says so),
    `--config FILE` and `key=value` overrides."""
    ap = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    ap.add_argument("--config", metavar="FILE", help="a YAML mapping of the keys below (each flag's name with _)")
    groups = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    positional = None
    for f in dataclasses.fields(cls):
        kw = dict(f.metadata.get("argparse", {}))
        group = kw.pop("group", None)
        target = ap if group is None else groups.setdefault(group, ap.add_argument_group(group))
        tp, bound = _base(hints[f.name])
        default = _default(f)
        default = None if default is dataclasses.MISSING else default
        if kw.pop("positional", False):
            positional = f.name
            continue
        if tp is bool:
            kw.update(action="store_true")
        elif typing.get_origin(tp) is list:
            kw.setdefault("nargs", None)
            kw.update(type=_value_type(*_base(typing.get_args(tp)[0])), default=default or None)
            if kw["nargs"] is None:
                kw.update(action="append", default=[])
                del kw["nargs"]
        elif typing.get_origin(tp) is Literal:
            kw.update(choices=typing.get_args(tp))
        elif typing.get_origin(tp) is dict:
            kw.update(type=json_object)
        else:
            kw.update(type=_value_type(tp, bound))
        kw.setdefault("default", default)
        target.add_argument("--" + f.name.replace("_", "-"), help=f.metadata.get("help"), **kw)
    ap.add_argument(
        "rest", nargs="*", metavar="key=value" if positional is None else f"{positional.upper()} | key=value",
        help="overrides of the keys" + ("" if positional is None else f"; the others: {positional}"),
    )  # fmt: skip
    ap.set_defaults(_positional=positional)
    return ap


def parse(cls, argv=None, description: str | None = None):
    """A job's command line -> its config: --config FILE, then key=value overrides, then --flags (the later wins),
    every value checked (train/config.py from_flat_dict) and the settings that do not go together
    (`problems`) refused; an error (argparse's: exit 2) names the flag, the override or the file."""
    ap = parser(cls, description)
    args = ap.parse_args(argv)  # --help, and a flag's bad value
    for action in ap._actions:  # again, without defaults: the flags given
        action.default = argparse.SUPPRESS
    given = vars(ap.parse_args(argv))
    names = {f.name for f in dataclasses.fields(cls)}
    raw, where = {}, {}
    if args.config:
        try:
            loaded = read_yaml(args.config)
        except (OSError, yaml.YAMLError) as e:
            ap.error(f"--config {args.config}: {e}")
        if not isinstance(loaded, dict):
            ap.error(f"--config {args.config}: expected a mapping of keys, got {type(loaded).__name__}")
        raw |= loaded
        where |= dict.fromkeys(loaded, args.config)
    positional = []
    for item in args.rest:
        key, eq, value = item.partition("=")
        if not eq or key not in names or key == args._positional:
            if args._positional is None:
                ap.error(f"unrecognized argument {item!r}: a flag, or key=value with a key of {', '.join(names)}")
            positional.append(item)
            continue
        try:
            raw[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            ap.error(f"override {item!r}: YAML syntax error in the value: {e}")
        where[key] = f"override {item!r}"
    if positional:
        raw[args._positional], where[args._positional] = positional, "argument " + args._positional
    for key in names & set(given):
        raw[key], where[key] = given[key], "argument --" + key.replace("_", "-")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in raw and _default(f) is dataclasses.MISSING]
    if missing:
        ap.error(f"the following arguments are required: {', '.join('--' + m.replace('_', '-') for m in missing)}")
    try:
        config = from_flat_dict(cls, raw, where)
    except ValueError as e:
        ap.error(str(e))
    for key, message in config.problems():
        ap.error(f"{where[key]}: {message}" if key in where else message)
    return config


def args_of(config) -> list[str]:
    """The command line of a job's config: a `key=value` override for each field off its default, in field order
    ({k: 4, compile: True, ban_phrase: [a, b]} -> k=4 compile=true ban_phrase=[a, b]), the positional field's
    values last. The job parses it back into the same config (`parse`), a value as `yaml_word` writes it."""
    out, last = [], []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        default = _default(f)
        if value == default and default is not dataclasses.MISSING:
            continue
        if f.metadata.get("argparse", {}).get("positional"):
            last = [str(v) for v in value]
        else:
            out.append(f"{f.name}={yaml_word(value, f.name)}")
    return out + last


def yaml_word(value, key: str = "value") -> str:
    """A value as a `key=value` override writes it: its text where YAML reads that back as the value (a path,
    a word, a number), else YAML in flow style (a list, a mapping, None, a string YAML would read as another
    type: 'null', '3'); a ValueError naming the key where even that would not read back as the value."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    text = yaml.safe_dump(value, default_flow_style=True, width=math.inf).removesuffix("...\n").strip()
    back = yaml.safe_load(text)
    if back != value or type(back) is not type(value):
        raise ValueError(f"{key}: {value!r} does not read back from YAML ({text!r})")
    return text
