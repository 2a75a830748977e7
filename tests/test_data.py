"""Records -> examples -> rows: validation errors, counted skips, the row layout, the loader."""

import json
from collections import Counter

import pytest
import torch

from llama_posttrain.data.loader import DataLoader, load_examples
from llama_posttrain.data.rows import encode_preference, pack
from llama_posttrain.data.schema import PreferenceRecord, ValidationError
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer

CHAT = ChatFormat(load_tokenizer())  # byte-level: one token per byte, easy to count


def write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_errors_name_file_line_and_field(tmp_path):
    cases = [
        ('{"prompt": "hi", "chosen": "a", ', "json: malformed JSON"),
        ({"prompt": "hi", "chosen": "a"}, "rejected: missing"),
        ({"chosen": "a", "rejected": "b"}, "prompt: missing"),
        ({"prompt": "hi", "chosen": "  ", "rejected": "b"}, "chosen: empty response"),
        ({"prompt": "hi", "responses": ["a"]}, "responses: must be a list of at least 2"),
        (
            {"prompt": [{"role": "user", "content": 3}], "chosen": "a", "rejected": "b"},
            r"prompt\[0\]\.content: must be",
        ),
        ({"prompt": "hi", "chosen": "a", "rejected": "b", "strength": "meh"}, "strength: must be one of"),
    ]
    for record, message in cases:
        p = write(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
        with pytest.raises(ValidationError, match=rf"d\.jsonl:2: {message}"):
            load_examples(p, "rm", CHAT, max_len=256, verbose=False)
    p = write(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValidationError, match=r"d\.jsonl:1: messages: no non-empty assistant message"):
        load_examples(p, "sft", CHAT, max_len=256, verbose=False)
    p = write(tmp_path, [{"messages": [{"role": "robot", "content": "hi"}]}])
    with pytest.raises(ValidationError, match=r"d\.jsonl:1: messages\[0\]\.role: must be one of"):
        load_examples(p, "sft", CHAT, max_len=256, verbose=False)


def test_skip_invalid_counts_everything(tmp_path, capsys):
    lines = [
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "strength": "better"},
        "not json",
        {"prompt": "p2", "chosen": "same", "rejected": "same"},  # identical: no pair left
        {"prompt": "p3", "responses": ["x", "y", "x"]},  # one duplicate dropped, 2 remain
        {"prompt": "p4", "chosen": "a", "rejected": ""},
        {"prompt": "q" * 300, "chosen": "a", "rejected": "b"},  # prompt longer than max_len
        {"prompt": "p5", "chosen": "c" * 100, "rejected": "d" * 40},  # truncated
        {"prompt": "p6", "chosen": "c", "rejected": "d", "strength": "slightly_better"},
    ]
    p = write(tmp_path, lines)
    examples, report = load_examples(p, "rm", CHAT, max_len=128, skip_invalid=True, keep_strengths=None)
    out = capsys.readouterr().out
    assert "skipped invalid: json 1" in out and "skipped invalid: rejected 1" in out
    assert report["records"] == 8 and report["examples"] == 4
    assert report["dropped: fewer than 2 distinct responses"] == 1
    assert report["dropped responses: identical to a better one"] == 2
    assert report["dropped: prompt too long for max_len"] == 1
    assert report["truncated: over max_len"] == 1
    assert all(len(e) <= 128 for e in examples)
    # Llama 3 keeps only significantly_better / better
    examples, report = load_examples(
        p, "rm", CHAT, max_len=128, skip_invalid=True, keep_strengths=("significantly_better", "better"), verbose=False
    )
    assert report["examples"] == 1 and report["filtered: strength slightly_better"] == 1
    _, report = load_examples(p, "rm", CHAT, max_len=128, overlength="drop", skip_invalid=True, verbose=False)
    assert report["dropped: over max_len"] == 1


def test_truncation_keeps_terminator_and_cuts_longest_first():
    rec = PreferenceRecord(
        [{"role": "user", "content": "p"}], [[{"role": "assistant", "content": c}] for c in ("a" * 50, "b" * 5)]
    )
    ex = encode_preference(rec, CHAT, 40, "truncate", Counter())
    prompt_len = len(CHAT.encode_dialog(rec.prompt, add_generation_prompt=True))
    assert len(ex) == 40
    tok = CHAT.tokenizer
    branch = torch.tensor(ex.branch)
    long_resp = [t for t, b in zip(ex.tokens, ex.branch) if b == 1]
    short_resp = [t for t, b in zip(ex.tokens, ex.branch) if b == 2]
    assert short_resp == tok.encode("b" * 5) + [tok.eot_id]  # untouched
    assert long_resp[-1] == tok.eot_id and len(long_resp) == 40 - prompt_len - 6
    assert (branch == 0).sum() == prompt_len


def test_reward_row_layout():
    """[prompt][r_a][r_b][r_c]: positions continue the prompt, targets point at the hidden states that predict them."""
    responses = [[{"role": "assistant", "content": c}] for c in ("4", "five", "22")]
    rec = PreferenceRecord([{"role": "user", "content": "2+2?"}], responses)
    prompt = CHAT.encode_dialog(rec.prompt, add_generation_prompt=True).tokens
    P, orders = len(prompt), set()
    for seed in range(20):
        ex = encode_preference(rec, CHAT, 256, "truncate", Counter(), shuffle_seed=seed)
        assert ex.tokens[:P] == prompt and ex.branch[:P] == [0] * P
        for k, (end, rank) in enumerate(ex.seqs):  # sequence k is the k-th best response
            assert rank == k
            idx = [i for i, b in enumerate(ex.branch) if b == ex.branch[end]]
            assert [ex.tokens[i] for i in idx] == CHAT.tokenizer.encode(responses[k][0]["content"]) + [
                CHAT.tokenizer.eot_id
            ]
            assert [ex.positions[i] for i in idx] == list(range(P, P + len(idx)))
            assert end == idx[-1]
            ts = [t for t in ex.targets if t.seq == k]
            assert [t.token for t in ts] == [ex.tokens[i] for i in idx]
            assert [t.hidden_index for t in ts] == [P - 1] + idx[:-1]  # the prompt's last token predicts the first
            assert [t.is_format for t in ts] == [False] * (len(idx) - 1) + [True]  # the terminator is formatting
        orders.add(tuple(ex.branch[end] for end, _ in ex.seqs))
    assert len(orders) == 6  # every order of 3 responses occurs across seeds


def test_pack_and_loader_resume(tmp_path):
    lines = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * (i % 7 + 1)}]}
        for i in range(40)
    ]
    examples, _ = load_examples(write(tmp_path, lines), "sft", CHAT, max_len=64, verbose=False)
    batches = pack(examples[:10], max_len=64, tokens_per_microbatch=128)
    for b in batches:
        assert b.tokens.shape[0] <= 2 and b.tokens.shape[1] <= 64
        flat = b.tokens.flatten()
        assert torch.equal(flat[b.target_hidden_index + 1], b.target_token)  # SFT: the previous token's
    assert sum(b.num_targets for b in batches) == sum(len(e.targets) for e in examples[:10])

    def run(world, rank, steps, state=None):
        dl = DataLoader(
            examples, batch_size=8, max_len=64, tokens_per_microbatch=128, rank=rank, world_size=world, seed=3
        )
        if state:
            dl.load_state_dict(state)
        it = iter(dl)
        return [next(it) for _ in range(steps)], dl

    full, _ = run(1, 0, 12)  # crosses an epoch boundary (5 steps per epoch)
    first, dl = run(1, 0, 7)
    resumed, _ = run(1, 0, 5, dl.state_dict())
    for a, b in zip(full, first + resumed):
        assert [torch.equal(x.tokens, y.tokens) for x, y in zip(a.micro_batches, b.micro_batches)] == [True] * len(
            a.micro_batches
        )
    # two ranks split each step's examples; both run the same number of micro-batches
    r0, _ = run(2, 0, 3)
    r1, _ = run(2, 1, 3)
    for s_full, s0, s1 in zip(full, r0, r1):
        assert len(s0.micro_batches) == len(s1.micro_batches)
        assert s0.num_targets == s1.num_targets == s_full.num_targets
        got = sum(b.num_targets for b in s0.micro_batches + s1.micro_batches)
        assert got == s_full.num_targets


def test_parquet_reads_like_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"prompt": f"p{i}", "chosen": "yes" * (i + 1), "rejected": "no"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    a, _ = load_examples(tmp_path / "d.parquet", "dpo", CHAT, max_len=128, verbose=False)
    b, _ = load_examples(write(tmp_path, records), "dpo", CHAT, max_len=128, verbose=False)
    assert [e.tokens for e in a] == [e.tokens for e in b]


def _conv(*turns):
    """("user", "hi"), ("assistant", "a") ... -> messages"""
    return [{"role": r, "content": c} for r, c in turns]


def test_trl_implicit_prompt_splits_at_the_longest_common_prefix(tmp_path):
    sys_u = [("system", "be brief"), ("user", "2+2?")]
    records = [
        {"chosen": _conv(*sys_u, ("assistant", "4")), "rejected": _conv(*sys_u, ("assistant", "5"))},
        {  # multi-turn: the shared first answer and second question are the prompt
            "chosen": _conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "good")),
            "rejected": _conv(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "bad"), ("user", "?")),
        },
        {  # a shared assistant turn at the end of the common prefix belongs to both responses
            "chosen": _conv(("user", "q"), ("assistant", "x"), ("assistant", "y")),
            "rejected": _conv(("user", "q"), ("assistant", "x"), ("assistant", "z")),
        },
        {  # UltraFeedback: a text prompt beside whole conversations, scores decide (rejected scored higher)
            "prompt": "q2",
            "chosen": _conv(("user", "q2"), ("assistant", "low")),
            "rejected": _conv(("user", "q2"), ("assistant", "high")),
            "score_chosen": 2.0,
            "score_rejected": 7,
        },
    ]
    implicit, _ = load_examples(write(tmp_path, records), "dpo", CHAT, max_len=256, verbose=False)
    explicit = [
        {"prompt": _conv(*sys_u), "chosen": "4", "rejected": "5"},
        {
            "prompt": _conv(("user", "a"), ("assistant", "b"), ("user", "c")),
            "chosen": "good",
            "rejected": _conv(("assistant", "bad"), ("user", "?")),
        },
        {
            "prompt": "q",
            "chosen": _conv(("assistant", "x"), ("assistant", "y")),
            "rejected": _conv(("assistant", "x"), ("assistant", "z")),
        },
        {"prompt": "q2", "chosen": "high", "rejected": "low"},
    ]
    expected, _ = load_examples(write(tmp_path, explicit, "e.jsonl"), "dpo", CHAT, max_len=256, verbose=False)
    assert [e.tokens for e in implicit] == [e.tokens for e in expected]
    assert [e.targets for e in implicit] == [e.targets for e in expected]


def test_scores_order_responses_and_ties_are_dropped_and_counted(tmp_path):
    lines = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 8, "score_rejected": 3},
        {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 3, "score_rejected": 8.5},
        {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 5, "score_rejected": 5.0},
    ]
    examples, report = load_examples(write(tmp_path, lines), "dpo", CHAT, max_len=64, verbose=False)
    assert report["dropped: tied scores"] == 1 and report["examples"] == 2
    best = [[t for t, b in zip(e.tokens, e.branch) if b == e.branch[e.seqs[0][0]]] for e in examples]
    tok = CHAT.tokenizer
    assert best == [tok.encode("a") + [tok.eot_id], tok.encode("b") + [tok.eot_id]]


def test_implicit_prompt_and_score_errors_name_file_line_and_field(tmp_path):
    u, a = ("user", "q"), ("assistant", "x")
    cases = [
        (
            {"chosen": _conv(("user", "q1"), a), "rejected": _conv(("user", "q2"), a)},
            r"chosen/rejected: no shared prompt",
        ),
        (
            {"chosen": _conv(u, a, ("user", "more"), a), "rejected": _conv(u, a, ("user", "other"), a)},
            r"chosen\[2\]: the conversations differ at a user turn",
        ),
        ({"chosen": _conv(u, a), "rejected": _conv(u, a, ("user", "?"), ("assistant", "y"))}, "chosen: ends inside"),
        ({"chosen": _conv(u), "rejected": _conv(u)}, "chosen/rejected: identical conversations"),
        ({"chosen": _conv(u, a), "rejected": "y"}, "rejected: must be a whole conversation"),
        ({"chosen": _conv(u, a), "rejected": _conv(u, ("assistant", "y")), "prompt": "other"}, "prompt: differs"),
        ({"chosen": "a", "rejected": "b"}, "prompt: missing"),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1},
            r"score_rejected: must be a finite number",
        ),
        (
            {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": "9", "score_rejected": 1},
            "score_chosen: must",
        ),
        (
            {"prompt": "p", "responses": ["a", "b"], "score_chosen": 1, "score_rejected": 2},
            "score_chosen: scores order",
        ),
    ]
    for record, message in cases:
        p = write(tmp_path, [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])
        with pytest.raises(ValidationError, match=rf"d\.jsonl:2: {message}"):
            load_examples(p, "dpo", CHAT, max_len=256, verbose=False)
