"""The cpu-llama3-vocab pipeline's own files, in TRL's shapes (llama_posttrain/data/tasks/files.py reads them):

data/prompt_pool.jsonl     {"prompt": [{"role": "system", ...}, {"role": "user", ...}]}: TRL prompt-only
data/eval_prompts.jsonl    the same shape, held out
(prefs_train.jsonl / prefs_eval.jsonl: TRL implicit-prompt preferences with scores, already here;
 experiments/quickstart/data/sft_{train,eval}.jsonl: TRL conversational SFT dialogs)

python experiments/cpu-llama3-vocab/make_pipeline_data.py   # deterministic: rewrites the same files
"""

import json
import random
from pathlib import Path

from llama_posttrain.data.tasks.arithmetic import problem

HERE = Path(__file__).parent / "data"
SYSTEM = {"role": "system", "content": "Answer with the sum only."}  # as in prefs_train.jsonl


def prompts(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [SYSTEM, {"role": "user", "content": problem(rng, 2)[0]}]} for _ in range(n)]


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    write(HERE / "prompt_pool.jsonl", prompts(480, seed=11))
    write(HERE / "eval_prompts.jsonl", prompts(64, seed=12))
    print(f"wrote {HERE / 'prompt_pool.jsonl'} (480 prompts) and {HERE / 'eval_prompts.jsonl'} (64)")
