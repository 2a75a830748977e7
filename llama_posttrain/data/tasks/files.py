"""Your own data as the pipeline's task: a prompt pool, seed preference files, human SFT files, eval files.

    task: files
    task_args:
      prompts: data/prompt_pool.jsonl          # records with a "prompt" (text or messages); "id" optional
      preferences: [data/human_prefs.jsonl]    # seed preference data (human labels): TRL or this project's format
      sft: [data/human_sft.jsonl]              # human SFT dialogs, mixed into every round's SFT (sft_weights)
      eval_pairs: data/eval_prefs.jsonl        # held-out pairs: RM pair accuracy, DPO reward accuracy
      eval_prompts: data/eval_prompts.jsonl    # held-out prompts: the latest RM's mean score of each policy's samples
      eval_sft: data/eval_sft.jsonl            # held-out dialogs: NLL of each policy

Every file is read by the stage that uses it, in any format the stages read (JSONL, Parquet, a datasets
folder), and every record of every file is checked when the pipeline starts, before its first job
(llama_posttrain/driver/preflight.py).
The prompt pool is shuffled once (by the config's seed) and drawn in order: each round's
rejection sampling and preference sampling take the next prompts, so a prompt is never used twice.
There is no verifier: new pairs are labeled by the latest reward model or by people (the pipeline's
`annotator`), and the pipeline starts from `base:`, a checkpoint.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from llama_posttrain.data.records import read_records
from llama_posttrain.data.schema import ValidationError, parse_prompt


def prompt_record(obj, where: str) -> list[dict]:
    """A prompt record (the pool's, the eval prompts'; the sampling and evaluation jobs read theirs with it:
    llama_posttrain/jobs/sampling.py read_prompts): an object with a "prompt", text or messages, and no "messages"
    (the parsed prompt's key); -> the prompt's messages. ValidationError naming the line and field."""
    if isinstance(obj, ValidationError):
        raise obj
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise ValidationError(f"{where}: prompt: missing (a prompt record is an object with a 'prompt')")
    if "messages" in obj:  # it would be replaced by the parsed prompt, and lost
        raise ValidationError(f"{where}: messages: a prompt record gives its prompt as 'prompt' only")
    return parse_prompt(obj["prompt"], where)


@dataclass
class Files:
    prompts: str = ""  # the prompt pool
    preferences: list[str] = field(default_factory=list)  # seed preference files
    sft: list[str] = field(default_factory=list)  # human SFT files
    eval_pairs: str | None = None
    eval_prompts: str | None = None
    eval_sft: str | None = None

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("prompts: the prompt pool file is required")
        named = {"prompts": [self.prompts], "preferences": self.preferences, "sft": self.sft}
        named |= {k: [v] for k, v in (("eval_pairs", self.eval_pairs), ("eval_prompts", self.eval_prompts),
                                      ("eval_sft", self.eval_sft)) if v}  # fmt: skip
        for key, paths in named.items():
            for path in paths:
                if not Path(path).exists():
                    raise ValueError(f"{key}: {path} does not exist")
        if not self.preferences:
            raise ValueError("preferences: at least one seed preference file (the first reward model's data)")

    def files(self) -> dict:
        """What every round reads, as absolute paths (relative ones: to where the pipeline started)."""

        def absolute(p):
            return str(Path(p).resolve()) if p else None

        return {
            "preferences": [absolute(p) for p in self.preferences],
            "sft": [absolute(p) for p in self.sft],
            "eval_pairs": absolute(self.eval_pairs),
            "eval_prompts": absolute(self.eval_prompts),
            "eval_sft": absolute(self.eval_sft),
        }

    def prompt_pool(self, seed: int) -> list[dict]:
        """The pool's prompt records, shuffled by seed; an "id" added where a record has none."""
        pool = []
        for i, (where, obj) in enumerate(read_records(self.prompts)):
            prompt_record(obj, where)
            pool.append({"id": f"pool-{i}", **obj})
        random.Random(seed).shuffle(pool)
        return pool
