"""The real-model task (llama_posttrain/data/tasks/word_sums.py): its verifier reads the last number of a free-form
answer, and its data are reproducible and right by construction."""

import random

import pytest

from llama_posttrain.data.tasks import load_task
from llama_posttrain.data.tasks.word_sums import last_number, operands


@pytest.mark.parametrize(
    "text, number",
    [
        ("The sum of 37 and 48 is 85.", 85),
        ("37 + 48 = 85", 85),
        ("It is 12, not 13", 13),
        ("The answer is 1,234.", 1234),
        ("85.0", 85),
        ("minus: -5", -5),
        ("no number here", None),
        ("", None),
    ],
)
def test_last_number(text, number):
    assert last_number(text) == number


def test_the_verifier_checks_the_sum_whatever_the_wording():
    task = load_task("word_sums", {"max_digits": 2, "single_digit_share": 0.5})
    rng = random.Random(0)
    for record in task.prompts(200, seed=1, split="eval"):
        a, b = operands(record["prompt"])
        assert 0 <= a < 100 and 0 <= b < 100
        s, wrong = a + b, a + b + rng.choice([-1, 1, 10])
        assert task.verify(record["prompt"], f"Sure! {a} plus {b} makes {s}.") == 1.0
        assert task.verify(record["prompt"], f"{a} + {b} = {wrong}") == 0.0
        assert task.verify(record["prompt"], "I don't know.") == 0.0


def test_seed_data_pairs_are_right_and_wrong_and_reproducible():
    task = load_task("word_sums", {"max_digits": 2})
    pairs, held_out, sft = task.seed_data(100, 20, seed=3)
    assert (pairs, held_out, sft) == task.seed_data(100, 20, seed=3)
    for p in pairs + held_out:
        assert task.verify(p["prompt"], p["chosen"]) == 1.0 and task.verify(p["prompt"], p["rejected"]) == 0.0
    for r in sft:
        assert task.verify(r["messages"][0]["content"], r["messages"][1]["content"]) == 1.0
    singles = [operands(r["prompt"]) for r in task.prompts(1000, seed=0, split="x")]
    share = sum(a < 10 and b < 10 for a, b in singles) / len(singles)
    assert 0.5 <= share <= 0.6  # half by construction, plus two-digit draws that happen to be single digits


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="single_digit_share"):
        load_task("word_sums", {"single_digit_share": 2})
