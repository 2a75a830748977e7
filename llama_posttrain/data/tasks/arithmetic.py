"""Multi-digit addition: a task whose answers a verifier can check exactly.

    user: "37+485="    assistant: "522"

    python -m llama_posttrain.data.tasks.arithmetic --out DIR --seed 0     # writes the quickstart files

`Arithmetic` is the task as the pipeline uses it (the interface: llama_posttrain/data/tasks/__init__.py).
Preference records pair a correct answer with a wrong one: off by a small amount (the digits that
matter most), a slipped carry, or a digit dropped. `strength` follows how wrong the rejected
answer is.
"""

from __future__ import annotations

import argparse
import random
import re
from dataclasses import dataclass
from pathlib import Path

from llama_posttrain.data.io import write_jsonl
from llama_posttrain.data.tasks import SeedData

_QUESTION = re.compile(r"^\s*(\d+)\+(\d+)=\s*$")


def problem(rng: random.Random, max_digits: int = 3) -> tuple[str, str]:
    a = rng.randrange(10 ** rng.randint(1, max_digits))
    b = rng.randrange(10 ** rng.randint(1, max_digits))
    return f"{a}+{b}=", str(a + b)


def answer(question: str) -> str:
    m = _QUESTION.match(question)
    if m is None:
        raise ValueError(f"not an addition question: {question!r}")
    return str(int(m.group(1)) + int(m.group(2)))


def verify(question: str, response: str) -> bool:
    """The response is right iff it is exactly the sum (surrounding whitespace ignored)."""
    return response.strip() == answer(question)


def wrong_answer(rng: random.Random, question: str) -> tuple[str, str]:
    """-> (a wrong answer, strength of the preference for the right one)."""
    right = int(answer(question))
    kind = rng.choice(["off_by_small", "carry", "drop_digit", "random"])
    if kind == "off_by_small":
        wrong, strength = right + rng.choice([-1, 1]) * rng.randint(1, 3), "better"
    elif kind == "carry":
        wrong, strength = right + rng.choice([-10, 10, -100, 100]), "better"
    elif kind == "drop_digit" and right >= 10:
        s = str(right)
        i = rng.randrange(len(s))
        wrong, strength = int(s[:i] + s[i + 1 :] or "0"), "significantly_better"
    else:
        wrong, strength = rng.randrange(2 * right + 20), "significantly_better"
    if wrong == right or wrong < 0:
        wrong, strength = right + 1, "better"
    return str(wrong), strength


def sft_record(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def preference_record(rng: random.Random, max_digits: int = 3) -> dict:
    q, a = problem(rng, max_digits)
    wrong, strength = wrong_answer(rng, q)
    return {"prompt": q, "chosen": a, "rejected": wrong, "strength": strength}


def noisy_corpus(n: int, seed: int, noise: float, max_digits: int = 3) -> list[dict]:
    """Pre-training dialogs whose answers are wrong with probability `noise`: an imperfect base."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, a = problem(rng, max_digits)
        if rng.random() < noise:
            a = wrong_answer(rng, q)[0]
        out.append(sft_record(q, a))
    return out


def prompts(n: int, seed: int, max_digits: int = 3, prefix: str = "p") -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{prefix}{i}", "prompt": problem(rng, max_digits)[0]} for i in range(n)]


@dataclass
class Arithmetic:
    """Addition of numbers of 1 to max_digits digits; a base pre-trained on a corpus whose answers are
    wrong with probability `noise` starts imperfect, so the rounds have something to improve."""

    max_digits: int = 2
    noise: float = 0.35  # fraction of wrong answers in the pre-training corpus

    def __post_init__(self):
        if self.max_digits < 1:
            raise ValueError(f"max_digits: must be >= 1, got {self.max_digits!r}")
        if not 0 <= self.noise <= 1:
            raise ValueError(f"noise: a fraction, must be in [0, 1], got {self.noise!r}")

    def prompts(self, n: int, seed: int, split: str) -> list[dict]:
        return prompts(n, seed, self.max_digits, split)

    def verify(self, prompt: str, response: str) -> float:
        return float(verify(prompt, response))

    def seed_data(self, pairs: int, eval_size: int, seed: int) -> SeedData:
        rng = random.Random(seed)  # one stream, drawn in this order: the sets follow from the seed
        train = [preference_record(rng, self.max_digits) for _ in range(pairs)]
        held_out = [preference_record(rng, self.max_digits) for _ in range(eval_size)]
        sft = [sft_record(*problem(rng, self.max_digits)) for _ in range(eval_size)]
        return SeedData(train, held_out, sft)

    def pretrain_corpus(self, n: int, seed: int) -> list[dict]:
        return noisy_corpus(n, seed, self.noise, self.max_digits)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--max-digits", type=int, default=2)
    args = ap.parse_args(argv)
    out = Path(args.out)
    for split, n, seed in (("train", args.train, args.seed), ("eval", args.eval, args.seed + 10_000)):
        rng = random.Random(seed)
        write_jsonl(out / f"sft_{split}.jsonl", [sft_record(*problem(rng, args.max_digits)) for _ in range(n)])
        write_jsonl(out / f"pref_{split}.jsonl", [preference_record(rng, args.max_digits) for _ in range(n)])


if __name__ == "__main__":
    main()
