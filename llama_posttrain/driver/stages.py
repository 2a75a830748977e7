"""The recipe's stages by name and in order (round_0/data, ..., round_<k>/dpo), and the keys the pipeline, the
recipe and the memory plan agree on: the training scripts (STAGE_KINDS), the stage config keys the pipeline sets
for every stage run (STAGE_SETS), the keys that name files (PATH_KEYS, made absolute as the jobs need them) and
the sampling keys a redo may change (REDO_KEYS); and the two ways a stage stops (StageError, WaitingForLabels).
Below the config (pipeline_config.py), the jobs (stage_jobs.py) and the recipe (recipe.py), which all read it."""

from __future__ import annotations

import os

STAGE_KINDS = ("rm", "sft", "dpo")  # the training scripts; "pretrain" runs sft.py
FIRST_STAGES, ROUND_STAGES = ("data", "pretrain"), ("rm", "rs", "sft", "pref", "dpo")  # round 0's, each round's


def stage_names(rounds: int) -> list[str]:
    """Every stage of `rounds` rounds in the order `Recipe.run` does them: round_0/data, ..., round_<k>/dpo."""
    return [f"round_0/{s}" for s in FIRST_STAGES] + [
        f"round_{k}/{s}" for k in range(1, rounds + 1) for s in ROUND_STAGES
    ]


def stage_place(name: str) -> tuple[int, int] | None:
    """round_<k>/<stage> -> (k, its place in the round), the order of the stages; None if it names no stage."""
    head, _, stage = name.partition("/")
    k = head.removeprefix("round_")
    if not k.isdigit() or str(int(k)) != k:
        return None
    stages = FIRST_STAGES if int(k) == 0 else ROUND_STAGES
    return (int(k), stages.index(stage)) if stage in stages else None


# Stage config keys the pipeline sets for every stage run: their values in the stage config files are
# never used, so a change of them (a stage config's own run folder) changes no result.
# logging.group / job_type / name: the stage run's place on the dashboard (wandb: the pipeline run's group,
# the stage, round_k/stage/variant_v).
STAGE_SETS = ("train.run_dir", "logging.progress", "logging.group", "logging.job_type", "logging.name")
# The training configs' keys that name files or folders: a stage override's relative path is made absolute
# (relative to where the pipeline started), and so is one a stage config file names (Recipe.file_paths). tests/
# check the list is whole.
PATH_KEYS = (
    "model.checkpoint",
    "model.tokenizer",
    "data.train",
    "data.eval",
    "data.cache_dir",
    "dpo.reference_checkpoint",
    "train.run_dir",
)
# The sampling keys: they change only what the rs and pref stages draw, so they may change for a redo of the
# stages from a named one on (the pipeline's from_stage; max_new_tokens is the evaluations' budget too: the stages
# before it keep their evaluations).
REDO_KEYS = (
    "max_new_tokens",
    "temperature",
    "k",
    "cleaning",
    "sample_batch_size",
    "sample_compile",
    "sample_nproc",
    "engine",
    "vllm_gpu_memory_utilization",
    "vllm_max_model_len",
)


def absolute(path) -> str:
    """A path as the jobs need it: relative to the directory the pipeline started in (the driver's), absolute."""
    return os.path.abspath(os.path.expanduser(str(path)))


def absolute_paths(overrides: dict) -> dict:
    """A stage's overrides with the PATH_KEYS values absolute (data.train: a path, a list, [{path, weight}])."""

    def fix(value):
        if isinstance(value, str):
            return absolute(value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            return {**value, "path": absolute(value["path"])}
        return value

    return {k: fix(v) if k in PATH_KEYS and v is not None else v for k, v in overrides.items()}


class StageError(RuntimeError):
    """A stage cannot go on: printed as one message (the pipeline's PipelineError)."""


class WaitingForLabels(RuntimeError):
    """The human annotator's sets are written; the pipeline stops until their labels are there."""
