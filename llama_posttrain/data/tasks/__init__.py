"""Tasks with verifiable answers: what the iterative pipeline (llama_posttrain/driver/pipeline.py) trains on.

A task is named in the pipeline's config, with its own settings:

    task: arithmetic                       # a name in TASKS, or a 'package.module:factory' path
    task_args: {max_digits: 1, noise: 0.35}

The pipeline calls `factory(**task_args)` (a dataclass factory gets its arguments type-checked like
the config) and uses the object through this interface; seeds make every call reproducible.

Required:
    prompts(n, seed, split) -> list[dict]
        n prompt records {"id": str, "prompt": text or messages}: the eval set (split "eval") and
        each round's fresh prompts (splits "r1rs", "r1pref", ...: the split names the set, e.g. as
        an id prefix, so that ids never collide across sets).
    verify(prompt, response) -> float
        The verifier, the annotator of new preference pairs: the score of a response to a prompt
        (`prompt` is the text of the prompt's last message); 1.0 right, 0.0 wrong. Task accuracy is
        its mean over held-out prompts.
    seed_data(pairs, eval_size, seed) -> SeedData
        The data the recipe starts from: `pairs` preference records {"prompt", "chosen", "rejected",
        "strength"} (Llama 3's human labels, llama_posttrain/data/schema.py), and the held-out sets the stages
        evaluate on (eval_size each): preference pairs (reward model, DPO) and SFT records.
Optional:
    pretrain_corpus(n, seed) -> list[dict]
        n SFT records ({"messages": ...} or {"text": ...}) to pre-train the base model on. A task
        without one needs the config's `base: <checkpoint>` to start from.

A task of the user's own files (llama_posttrain/data/tasks/files.py) has instead:
    files() -> {"preferences": [paths], "sft": [paths], "eval_pairs"|"eval_prompts"|"eval_sft": path or None}
    prompt_pool(seed) -> list[dict]
        every prompt record of the pool in a fixed order: the rounds draw from it in order, never twice.
and no verifier (new pairs are labeled by a reward model or by people).
"""

from __future__ import annotations

import importlib
import inspect
from typing import NamedTuple

TASKS = {
    "arithmetic": "llama_posttrain.data.tasks.arithmetic:Arithmetic",
    "files": "llama_posttrain.data.tasks.files:Files",
    "word_sums": "llama_posttrain.data.tasks.word_sums:WordSums",
}  # name -> 'module:factory'


class SeedData(NamedTuple):
    pairs: list[dict]  # training preference pairs
    eval_pairs: list[dict]  # held-out preference pairs
    eval_sft: list[dict]  # held-out SFT records


def task_factory(spec: str):
    """The factory of a task: a name in TASKS or a 'package.module:factory' path. ValueError if none."""
    path = TASKS.get(spec, spec)
    module, colon, name = path.partition(":")
    if not colon or not module or not name:
        raise ValueError(f"unknown task {spec!r}: give one of {', '.join(TASKS)} or a 'package.module:factory' path")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"task {spec!r}: cannot load {path}: {e}") from None


def load_task(spec: str, args: dict | None = None):
    """The task object: task_factory(spec)(**args), its arguments checked against the factory's signature."""
    factory = task_factory(spec)
    try:
        inspect.signature(factory).bind(**(args or {}))
    except TypeError as e:
        raise ValueError(f"task {spec!r}: {e}") from None
    return factory(**(args or {}))
