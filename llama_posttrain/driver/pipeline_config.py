"""The pipeline's config: PipelineConfig (one flat YAML file and its key=value overrides, every key's type and
range checked by llama_posttrain/train/config.py), its `cleaning:` section (Cleaning), then the checks that types
cannot make (a folder name, the stage config files, the task and its settings, from_stage); the keys whose change
leaves every stage's result as it was (HARMLESS, SET_BY_PIPELINE), which the run folder's record is compared
without; and the task a config names (task_from_config). It imports no torch: `--help` and a config error answer
at once. The run itself is pipeline.py's."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml

from llama_posttrain.data.clean import CleanRules
from llama_posttrain.data.tasks import load_task, task_factory
from llama_posttrain.driver.stages import STAGE_KINDS, STAGE_SETS, absolute, stage_names
from llama_posttrain.llama import PRESETS
from llama_posttrain.train.config import (
    AtLeast,
    Interval,
    NonNegFloat,
    NonNegInt,
    PosInt,
    from_flat_dict,
    opt,
    read_yaml,
)

ROOT = Path(__file__).resolve().parents[2]  # the repository: experiments/ and the job scripts, llama_posttrain/...
Preset = Literal[tuple(PRESETS)]  # a model preset's name (llama_posttrain/llama/config.py)
QUICKSTART_CONFIGS = {kind: f"experiments/quickstart/{kind}.yaml" for kind in STAGE_KINDS}


@dataclass
class PipelineConfig:
    name: str = opt("quickstart", "the run folder: <root>/<name>")
    root: str = opt("runs", "the folder of run folders")
    task: str = opt("arithmetic", "a task in data/tasks (TASKS), or a 'package.module:factory' path")
    task_args: dict[str, typing.Any] = opt({}, "the task's settings, e.g. {max_digits: 1}")
    base: str | None = opt(None, "a checkpoint to start from instead of pre-training on the task's corpus")
    rounds: NonNegInt = opt(2, "rounds of reward model, rejection sampling, SFT and DPO after the base")
    nproc: PosInt = opt(2, "ranks per node of each training job (GPUs per node)")
    sample_nproc: NonNegInt = opt(
        0, "ranks per node of sampling jobs; 0: nproc (each rank samples its share of prompts)"
    )
    eval_nproc: NonNegInt = opt(0, "ranks per node of evaluation jobs; 0: nproc")
    launcher: Literal["local", "torchrun", "ray", "slurm"] = opt(
        "local", "how jobs start: llama_posttrain/driver/launch.py"
    )
    nnodes: PosInt = opt(1, "nodes of each distributed job (ray, slurm)")
    ray_address: str = opt(
        "auto", "launcher ray: the cluster (ray.init's address); auto: RAY_ADDRESS or `ray start` here"
    )
    rdzv_endpoint: str | None = opt(None, "slurm: host:port of the c10d rendezvous; default MASTER_ADDR:MASTER_PORT")
    engine: Literal["native", "vllm"] = opt(
        "native", "sampling engine of llama_posttrain/jobs/sample.py (vllm: one process per node)"
    )
    sample_batch_size: PosInt = opt(
        64, "native engine: prompts per generate call (sample.py --batch-size; its KV cache)"
    )
    sample_compile: bool = opt(False, "native engine: torch.compile the decode step (sample.py --compile)")
    sample_compile_mode: Literal["default", "reduce-overhead"] = opt(
        "default", "sample.py --compile-mode (CUDA graphs)"
    )
    eval_batch_size: NonNegInt = opt(
        0, "prompts per generate call of the evaluations (evaluate.py --batch-size); 0: all"
    )
    vllm_gpu_memory_utilization: float = opt(0.9, "vllm: the fraction of the GPU's memory it takes, in (0, 1]")
    vllm_max_model_len: NonNegInt = opt(0, "vllm: 0: the longest prompt + max_new_tokens, rounded up")
    annotator: Literal["auto", "verifier", "rm", "human"] = opt(
        "auto", "labels of new pairs; auto: verifier if the task has one, else rm"
    )
    safety_rm: str | None = opt(None, "a safety reward model combined with the round's RM as in Llama 2 (annotator rm)")
    sft_weights: dict[str, float] = opt({}, "{rejection_sampled: 1.0, human: 1.0}: SFT mixture weights (SFT_SOURCES)")
    cleaning: dict[str, typing.Any] = opt(
        {}, "rejection sampling's filters (Cleaning): {dedup: true, max_repeat: 0.3, ...}"
    )
    seed: int = opt(0, "the task's data and prompts, and the sampling and evaluation draws")
    preset: Preset = opt("tiny", "the pre-trained base's architecture")
    pretrain_examples: PosInt = opt(20000, "size of the pre-training corpus")
    seed_pairs: PosInt = opt(1000, 'initial "human" preference pairs')
    rs_prompts: PosInt = opt(400, "fresh prompts per round for rejection sampling")
    pref_prompts: PosInt = opt(400, "fresh prompts per round for new preference pairs")
    eval_prompts: PosInt = opt(200, "held-out prompts of the task accuracy")
    k: Annotated[int, AtLeast(2)] = opt(8, "samples per prompt")
    temperature: NonNegFloat = opt(1.0, "of the rounds' sampling")
    max_new_tokens: PosInt = opt(8, "of the rounds' sampling")
    max_dropped: Annotated[float, Interval(0.0, 1.0)] = opt(0.5, "rs/pref losing more of its samples or prompts stops")
    from_stage: str | None = opt(None, "round_<k>/<stage>: redo it and the later stages (sampling keys may change)")
    configs: dict[str, str] = opt(
        QUICKSTART_CONFIGS, "rm/sft/dpo -> config file; default: the repository's experiments/quickstart"
    )
    pretrain: dict[str, typing.Any] = opt({}, "{section.key: value}: overrides of the pre-training run's config")
    rm: dict[str, typing.Any] = opt({}, "{section.key: value}: overrides of each round's reward model run")
    sft: dict[str, typing.Any] = opt({}, "{section.key: value}: overrides of each round's SFT run")
    dpo: dict[str, typing.Any] = opt({}, "{section.key: value}: overrides of each round's DPO run")
    variants: dict[str, list[dict[str, typing.Any]]] = opt({}, "stage -> [overrides]: averaged")
    plots: bool = opt(True, "accuracy.png, rewards.png (matplotlib)")


@dataclass
class Cleaning:
    """`cleaning`: rejection sampling's filters, each a llama_posttrain/jobs/sample.py flag (the rules of
    llama_posttrain/data/clean.py), checked when the pipeline starts rather than when sampling does."""

    dedup: bool = opt(False, "--dedup: drop an SFT record repeating an earlier prompt+response")
    max_chars: PosInt | None = opt(None, "--max-chars: drop a sample longer than this")
    max_repeat: float | None = opt(None, "--max-repeat: drop a sample whose repeated n-grams cover more, in [0, 1]")
    repeat_ngram: PosInt = opt(3, "--repeat-ngram: the n of max_repeat")
    ban_phrase: list[str] = opt([], "--ban-phrase, each: drop a sample containing it (case-insensitive)")
    max_emoji: NonNegInt | None = opt(None, "--max-emoji: drop a sample with more emoji")
    max_exclamation: NonNegInt | None = opt(None, "--max-exclamation: drop a sample with more exclamation marks")

    @classmethod
    def of(cls, cleaning: dict, where: str = "cleaning") -> Cleaning:
        """The pipeline's `cleaning` mapping, checked; ValueError naming `where` and the key."""
        return from_flat_dict(cls, cleaning, where)

    def rules(self) -> CleanRules:
        return CleanRules(
            self.max_repeat, self.repeat_ngram, tuple(self.ban_phrase), self.max_emoji, self.max_exclamation
        )

    def __post_init__(self):
        if self.max_repeat is not None and not 0 <= self.max_repeat <= 1:
            raise ValueError(f"max_repeat: a fraction in [0, 1], got {self.max_repeat}")
        if any(not p.strip() for p in self.ban_phrase):
            raise ValueError("ban_phrase: an empty phrase would ban every sample")


# Keys whose change leaves every stage's result as it was: a run folder may be continued with new values.
# `configs`: the files' paths; their contents are recorded and compared (stage_configs.yaml).
LAUNCH_KEYS = {"launcher", "nnodes", "rdzv_endpoint", "ray_address", "node_rank"}  # node_rank: older records have it
# max_dropped: a stage stops or goes on, its result the same; from_stage: an action, recorded in redo.yaml.
# sample_compile_mode: the same compiled kernels, replayed by a CUDA graph or launched one by one: the same draws.
HARMLESS = {"name", "root", "rounds", "plots", "configs", "max_dropped", "from_stage", "sample_compile_mode"}
HARMLESS |= LAUNCH_KEYS
# The stage configs' keys the pipeline sets for every stage run, whatever the files say (STAGE_SETS).
SET_BY_PIPELINE = tuple(f"stage_configs.*.{key}" for key in STAGE_SETS)
SFT_SOURCES = ("rejection_sampled", "human")  # the keys of sft_weights


class PipelineError(RuntimeError):
    """A problem the pipeline reports as one message (no traceback): bad config, refused folder, failed stage."""


# ---------------------------------------------------------------------------------------------- config


def load_pipeline_config(path: str | None, overrides=()) -> PipelineConfig:
    """YAML file + key=value overrides -> PipelineConfig; every key's type and range checked (llama_posttrain/train/config.py),
    then the values types cannot check; errors name the file (or the override) and the key."""
    raw, source = {}, {}
    if path:
        raw = _read_yaml(Path(path)) or {}
        if not isinstance(raw, dict):
            raise PipelineError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
        source = dict.fromkeys(raw, str(path))
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise PipelineError(f"override {item!r} must look like key=value")
        try:
            raw[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise PipelineError(f"override {item!r}: not valid YAML: {e}") from None
        source[key] = f"override {item!r}"
    try:
        cfg = from_flat_dict(PipelineConfig, raw, source)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    if "configs" in source:  # the user's files: relative to where the pipeline starts, as every path given to it
        cfg.configs = {kind: absolute(file) for kind, file in cfg.configs.items()}
    _check_values(cfg, source)
    _check_from_stage(cfg, source)
    return cfg


def run_folder(cfg: PipelineConfig) -> Path:
    """<root>/<name>, absolute (root: relative to where the pipeline starts): what the jobs are given."""
    return Path(absolute(cfg.root)) / cfg.name


def _check_values(cfg: PipelineConfig, source: dict[str, str]) -> None:
    """What the types do not say: a folder name, one stage config file per training script, the variants'
    stages, the task and its settings, a starting checkpoint or a corpus to pre-train on."""

    def where(key: str) -> str:
        return f"{source.get(key, 'default')}: {key}"

    if not cfg.name or "/" in cfg.name:
        raise PipelineError(f"{where('name')}: must be a non-empty folder name, got {cfg.name!r}")
    if not 0 < cfg.vllm_gpu_memory_utilization <= 1:
        key = "vllm_gpu_memory_utilization"
        raise PipelineError(f"{where(key)}: must be in (0, 1], got {cfg.vllm_gpu_memory_utilization}")
    if cfg.sample_compile and cfg.engine != "native":
        raise PipelineError(f"{where('sample_compile')}: the native engine's option (engine: {cfg.engine})")
    if cfg.sample_compile_mode != "default" and not cfg.sample_compile:
        raise PipelineError(
            f"{where('sample_compile_mode')}: {cfg.sample_compile_mode} is the mode of sample_compile, which is off: "
            "set sample_compile: true too, or remove it"
        )
    unknown = sorted(set(cfg.sft_weights) - set(SFT_SOURCES))
    if unknown:
        raise PipelineError(
            f"{where('sft_weights')}: unknown source(s) {', '.join(unknown)} (known: {', '.join(SFT_SOURCES)})"
        )
    for source_name, weight in cfg.sft_weights.items():
        if not (math.isfinite(weight) and weight >= 0):
            raise PipelineError(f"{where('sft_weights')}.{source_name}: a weight must be finite and >= 0, got {weight}")
    try:
        Cleaning.of(cfg.cleaning, where("cleaning"))
    except ValueError as e:
        raise PipelineError(str(e)) from None
    for kind in set(STAGE_KINDS) - set(cfg.configs):
        raise PipelineError(f"{where('configs')}: no config file for {kind!r} (give one for each of {STAGE_KINDS})")
    for kind, file in cfg.configs.items():
        if kind not in STAGE_KINDS:
            raise PipelineError(f"{where('configs')}.{kind}: not a training stage (one of {', '.join(STAGE_KINDS)})")
        if not (ROOT / file).is_file():
            raise PipelineError(f"{where('configs')}.{kind}: {ROOT / file} is not a file")
    if set(cfg.variants) - {"pretrain", *STAGE_KINDS}:
        stages = ", ".join(["pretrain", *STAGE_KINDS])
        raise PipelineError(f"{where('variants')}: stages are {stages}; got {sorted(cfg.variants)}")
    task = task_from_config(cfg.task, cfg.task_args, source)
    if cfg.base is not None and not Path(cfg.base).is_dir():
        raise PipelineError(f"{where('base')}: {cfg.base} is not a checkpoint folder")
    if cfg.safety_rm is not None and not Path(cfg.safety_rm).is_dir():
        raise PipelineError(f"{where('safety_rm')}: {cfg.safety_rm} is not a checkpoint folder")
    if cfg.annotator == "verifier" and not hasattr(task, "verify"):
        raise PipelineError(f"{where('annotator')}: task {cfg.task!r} has no verifier: use rm or human")
    if cfg.base is None and not hasattr(task, "pretrain_corpus"):
        raise PipelineError(
            f"{where('task')}: task {cfg.task!r} has no pre-training corpus (pretrain_corpus): "
            "give `base: <checkpoint folder>` to start from"
        )


def _check_from_stage(cfg: PipelineConfig, source: dict[str, str]) -> None:
    """from_stage names a stage of the recipe (round_<k>/<stage>, k <= rounds)."""
    if cfg.from_stage is None or cfg.from_stage in stage_names(cfg.rounds):
        return
    names = stage_names(min(cfg.rounds, 1))
    more = f", ... round_{cfg.rounds}/dpo" if cfg.rounds > 1 else ""
    raise PipelineError(
        f"{source.get('from_stage', 'default')}: from_stage: {cfg.from_stage!r} is not a stage of this config's "
        f"{cfg.rounds} round(s) (round_<k>/<stage>: {', '.join(names)}{more})"
    )


def task_from_config(task: str, args: dict, source: dict[str, str] | None = None):
    """The config's task (data/tasks), made with its task_args: a dataclass task's arguments are checked
    like the config's keys. Errors name the file or override that set the task or its arguments. (The jobs'
    task, named by their flags: llama_posttrain/jobs/sampling.py task_from_flags.)"""
    source = source or {}
    try:
        factory = task_factory(task)
    except ValueError as e:
        raise PipelineError(f"{source.get('task', 'default')}: task: {e}") from None
    where = f"{source.get('task_args', source.get('task', 'default'))}: task_args"
    if dataclasses.is_dataclass(factory):
        try:
            return from_flat_dict(factory, args, where)
        except ValueError as e:
            raise PipelineError(str(e)) from None  # it names `where` and the argument
    try:
        return load_task(task, args)
    except ValueError as e:
        raise PipelineError(f"{where}: {e}") from None


def _read_yaml(path):
    try:
        return read_yaml(path)
    except ValueError as e:
        raise PipelineError(str(e)) from None
