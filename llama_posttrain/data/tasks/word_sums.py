"""Addition asked in words, for a real instruct model: answers checked by the last number in the response.

    user: "What is 37 + 48?"    assistant: "37 + 48 = 85."   (any wording; the last number counts)

    task: word_sums
    task_args: {max_digits: 2, single_digit_share: 0.5}

A real chat model answers in sentences ("The sum of 37 and 48 is 85."), so the verifier reads the last
number of the response (digits with optional sign and thousands commas; "85.0" counts as 85) and
compares it with the sum: 1.0 right, 0.0 wrong, no number at all wrong. Sums of one- and two-digit
numbers leave headroom for SmolLM2-135M-Instruct (single digits right about 65% of the time greedily,
two digits much less), so rounds can show progress.

Seed preference pairs (the reward model's first data) pair a right and a wrong answer in a few plain
phrasings; the rounds then label the policy's own samples with the verifier. There is no pre-training
corpus: the pipeline starts from `base:`, the converted real model.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from llama_posttrain.data.tasks import SeedData

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")
_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
PHRASINGS = ("{a} + {b} = {s}.", "The answer is {s}.", "{a} + {b} equals {s}.", "The sum of {a} and {b} is {s}.")


def last_number(text: str) -> float | None:
    """The last number written in `text` (None if there is none): '1,234' -> 1234, '85.0' -> 85."""
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def operands(prompt: str) -> tuple[int, int]:
    m = _QUESTION.search(prompt)
    if m is None:
        raise ValueError(f"not a word_sums question: {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def verify(prompt: str, response: str) -> float:
    a, b = operands(prompt)
    return float(last_number(response) == a + b)


@dataclass
class WordSums:
    """a + b with a, b of 1..max_digits digits; `single_digit_share` of the problems have two single digits."""

    max_digits: int = 2
    single_digit_share: float = 0.5

    def __post_init__(self):
        if self.max_digits < 1:
            raise ValueError(f"max_digits: must be >= 1, got {self.max_digits!r}")
        if not 0 <= self.single_digit_share <= 1:
            raise ValueError(f"single_digit_share: a fraction, must be in [0, 1], got {self.single_digit_share!r}")

    def problem(self, rng: random.Random) -> tuple[int, int]:
        if rng.random() < self.single_digit_share:
            return rng.randrange(10), rng.randrange(10)
        hi = 10**self.max_digits
        return rng.randrange(hi), rng.randrange(hi)

    def prompts(self, n: int, seed: int, split: str) -> list[dict]:
        rng = random.Random(seed)
        return [{"id": f"{split}{i}", "prompt": question(*self.problem(rng))} for i in range(n)]

    def verify(self, prompt: str, response: str) -> float:
        return verify(prompt, response)

    def pair(self, rng: random.Random) -> dict:
        a, b = self.problem(rng)
        wrong = a + b + rng.choice([-1, 1]) * rng.choice([1, 2, 10])
        wrong = wrong if wrong >= 0 else a + b + 1
        form = rng.choice(PHRASINGS)
        return {
            "prompt": question(a, b),
            "chosen": form.format(a=a, b=b, s=a + b),
            "rejected": form.format(a=a, b=b, s=wrong),
            "strength": "significantly_better",
        }

    def seed_data(self, pairs: int, eval_size: int, seed: int) -> SeedData:
        rng = random.Random(seed)
        train = [self.pair(rng) for _ in range(pairs)]
        held_out = [self.pair(rng) for _ in range(eval_size)]
        sft = []
        for _ in range(eval_size):
            a, b = self.problem(rng)
            reply = rng.choice(PHRASINGS).format(a=a, b=b, s=a + b)
            sft.append(
                {"messages": [{"role": "user", "content": question(a, b)}, {"role": "assistant", "content": reply}]}
            )
        return SeedData(train, held_out, sft)
