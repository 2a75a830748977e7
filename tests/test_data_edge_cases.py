"""Bad data and edge-sized sets: every eval example evaluated once, clear errors naming file and key,
every dropped or skipped record counted in the report."""

import json
import re

import pytest
import torch

from llama_posttrain.data.loader import DataLoader, build_loaders, load_examples
from llama_posttrain.data.schema import STRENGTHS, ValidationError
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer
from llama_posttrain.train import loop
from llama_posttrain.train.config import Config
from llama_posttrain.train.distributed import Dist

CHAT = ChatFormat(load_tokenizer())  # byte-level: one token per byte


def sft_lines(n):
    return [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i % 11 + 1)}]}
        for i in range(n)
    ]


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def dist(rank=0, world=1):
    return Dist(rank, world, rank, torch.device("cpu"), None)


def eval_loader(examples, rank, world):
    return DataLoader(
        examples, 8, max_len=64, tokens_per_microbatch=128, rank=rank, world_size=world, shuffle=False, drop_last=False
    )


@pytest.mark.parametrize("n", [1, 30, 200])
@pytest.mark.parametrize("world", [1, 2])
def test_eval_steps_cover_every_example_once(tmp_path, n, world):
    examples, _ = load_examples(write(tmp_path / "e.jsonl", sft_lines(n)), "sft", CHAT, max_len=64, verbose=False)
    assert len(examples) == n
    seen, targets = [], 0
    per_rank = [list(eval_loader(examples, r, world).eval_steps()) for r in range(world)]
    assert len(per_rank[0]) == -(-n // 8)  # the last, partial step included
    for steps in zip(*per_rank):
        assert len({len(s.micro_batches) for s in steps}) == 1  # every rank in every forward (FSDP)
        for s in steps:
            assert s.num_targets == sum(len(e.targets) for e in examples)  # the whole set's counts
            for mb in s.micro_batches:
                seen += mb.group_uid.tolist()
                targets += mb.num_targets
    assert sorted(seen) == list(range(n))  # each example exactly once over all ranks
    assert targets == sum(len(e.targets) for e in examples)


def test_evaluate_is_the_exact_loss_over_all_examples(tmp_path):
    """A loss normalized like SFT's (by the step's target count): eval/loss must be the mean over every
    target of the set, computed here from the examples directly, on 1 rank and summed over 2."""
    examples, _ = load_examples(write(tmp_path / "e.jsonl", sft_lines(30)), "sft", CHAT, max_len=64, verbose=False)
    value = {t: (t * 37 % 101) / 100 for t in range(512)}  # a per-token "nll"
    expected = sum(value[t[1]] for e in examples for t in e.targets) / sum(len(e.targets) for e in examples)

    def loss(batch, step):
        nll = sum((value[t] for t in batch.target_token.tolist()), 0.0)
        return torch.tensor(nll / step.num_targets, dtype=torch.float64), {"targets": torch.tensor(batch.num_targets)}

    objective = loop.Objective(loss, {"targets_per_example": ("targets", "examples")})
    model = torch.nn.Linear(1, 1)
    out = loop.evaluate_objective(objective, eval_loader(examples, 0, 1), model, dist())
    assert out["eval/loss"] == pytest.approx(expected, rel=1e-9)
    assert out["eval/examples"] == 30
    assert out["eval/targets_per_example"] == pytest.approx(sum(len(e.targets) for e in examples) / 30, rel=1e-12)
    # two ranks: without a process group each returns its own sums, which the all-reduce would add
    parts = [loop.evaluate_objective(objective, eval_loader(examples, r, 2), model, dist(r, 2)) for r in range(2)]
    assert sum(p["eval/loss"] for p in parts) == pytest.approx(expected, rel=1e-9)
    assert sum(p["eval/examples"] for p in parts) == 30


def config(tmp_path, train_lines, eval_lines=None, **data):
    cfg = Config()
    cfg.data.train = str(write(tmp_path / "train.jsonl", train_lines))
    if eval_lines is not None:
        cfg.data.eval = str(write(tmp_path / "eval.jsonl", eval_lines))
    cfg.data.max_len, cfg.data.batch_size, cfg.data.tokens_per_microbatch = 64, 8, 128
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_eval_set_smaller_than_ranks_is_evaluated(tmp_path):
    cfg = config(tmp_path, sft_lines(16), sft_lines(1))
    seen = []
    for rank in range(2):
        _, ev = build_loaders(cfg.data, "sft", CHAT, rank, 2)
        steps = list(ev.eval_steps())
        assert len(steps) == 1 and len(steps[0].micro_batches) == 1  # rank 1: one empty micro-batch
        seen += [u for mb in steps[0].micro_batches for u in mb.group_uid.tolist()]
    assert seen == [0]


def test_empty_eval_file_and_small_train_set_name_file_and_key(tmp_path):
    cfg = config(tmp_path, sft_lines(16), [])
    with pytest.raises(ValueError, match=rf"data\.eval {re.escape(cfg.data.eval)}: no examples"):
        build_loaders(cfg.data, "sft", CHAT)
    cfg = config(tmp_path, sft_lines(5))
    with pytest.raises(ValueError, match=rf"data\.train {re.escape(cfg.data.train)}: 5 examples .*data\.batch_size=8"):
        build_loaders(cfg.data, "sft", CHAT)
    cfg = config(tmp_path, [])
    with pytest.raises(ValueError, match=r"train\.jsonl: no examples .*data\.batch_size=8"):
        build_loaders(cfg.data, "sft", CHAT)


def test_non_utf8_bytes_name_file_and_line_and_can_be_skipped(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    good = [json.dumps(x).encode() for x in sft_lines(3)]
    p.write_bytes(b"\n".join([good[0], b'{"text": "caf\xe9"}', good[1], good[2]]) + b"\n")
    with pytest.raises(ValidationError, match=r"d\.jsonl:2: encoding: not UTF-8 \(byte 0xe9"):
        load_examples(p, "sft", CHAT, max_len=64, verbose=False)
    examples, report = load_examples(p, "sft", CHAT, max_len=64, skip_invalid=True)
    assert len(examples) == 3 and report["skipped invalid: encoding"] == 1
    assert "skipped invalid: encoding 1" in capsys.readouterr().out


def test_directory_as_data_file_says_so(tmp_path):
    with pytest.raises(IsADirectoryError, match=rf"{re.escape(str(tmp_path))} is a directory"):
        load_examples(tmp_path, "sft", CHAT, max_len=64, verbose=False)


@pytest.mark.parametrize("bad", [["better", "much_better"], "better", ["Better"]])
def test_unknown_keep_strengths_is_an_error(tmp_path, bad):
    p = write(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "strength": "better"}])
    with pytest.raises(ValueError, match=r"data\.keep_strengths .*" + ", ".join(STRENGTHS)):
        load_examples(p, "rm", CHAT, max_len=64, keep_strengths=bad, verbose=False)


def test_report_accounts_for_every_record(tmp_path, capsys):
    """records = examples + every skip, filter and drop, each printed; truncations printed too."""
    lines = [
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "strength": "better"},
        "not json",
        {"prompt": "p2", "chosen": "same", "rejected": "same", "strength": "better"},  # no distinct pair
        {"prompt": "p3", "chosen": "a", "rejected": "", "strength": "better"},  # invalid
        {"prompt": "q" * 200, "chosen": "a", "rejected": "b", "strength": "better"},  # prompt too long
        {"prompt": "p5", "chosen": "c" * 100, "rejected": "d" * 40, "strength": "better"},  # truncated
        {"prompt": "p6", "chosen": "c", "rejected": "d", "strength": "slightly_better"},  # filtered
        {"prompt": "p7", "chosen": "c", "rejected": "d"},  # no strength: filtered
    ]
    p = write(tmp_path / "d.jsonl", lines)
    p.write_bytes(p.read_bytes() + b'{"prompt": "\xff"}\n')  # not UTF-8
    for overlength in ("truncate", "drop"):
        examples, report = load_examples(
            p, "rm", CHAT, max_len=128, overlength=overlength, skip_invalid=True, keep_strengths=["better"]
        )
        printed = capsys.readouterr().out
        lost = {k: v for k, v in report.items() if k.startswith(("skipped invalid", "filtered", "dropped:"))}
        assert report["records"] == 9 == len(examples) + sum(lost.values())
        for k, v in [*lost.items(), ("examples", len(examples))]:
            assert f"{k} {v}" in printed
        assert set(lost) >= {"skipped invalid: json", "skipped invalid: rejected", "skipped invalid: encoding"}
        assert lost["filtered: strength slightly_better"] == lost["filtered: strength None"] == 1
        assert lost["dropped: prompt too long for max_len"] == lost["dropped: fewer than 2 distinct responses"] == 1
        if overlength == "truncate":
            assert report["truncated: over max_len"] == 1 and "truncated: over max_len 1" in printed
        else:
            assert lost["dropped: over max_len"] == 1
