"""Records -> examples -> packed rows: the one representation behind RM, SFT and DPO.

An example is a prompt (branch 0) and zero or more responses (branches 1..k) whose positions all
continue from the end of the prompt, so each response sees only the prompt and itself:
- SFT:    [dialog]                          one branch-0 segment, targets = assistant tokens
- reward: [prompt][r_a][r_b][r_c]           responses shuffled by seed, a score at each one's end
- DPO:    [prompt][chosen][rejected]        the prompt computed once for both
Targets are listed, not shifted: each one names the index of the hidden state that predicts it
(the previous token of its branch; for a response's first token, the prompt's last token).

`encode_record` is the one way from a record (llama_posttrain/data/records.py) to an Example, for the in-memory
path (llama_posttrain/data/loader.py `load_examples`) and the tokenized cache (llama_posttrain/data/prepare.py) alike.

Rows hold several examples, one doc id each (padding: PAD_DOC). A micro-batch is up to
`tokens_per_microbatch // max_len` rows, filled first-fit in order. `plan` decides that packing from
the lengths alone, so a loader can pack every rank's share without reading any tokens.

Shapes: by default a micro-batch is (rows packed, its longest row rounded up to 8). Compiled blocks
want few shapes, each compiled once (`torch.compile(dynamic=False)`): `bucket_lengths` lists the row
lengths T allowed, and `collate(..., shape=(B, T))` pads to exactly B rows of T tokens, the rows
beyond the packed ones all padding (PAD_DOC, no targets, no sequences).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from llama_posttrain.data.batch import Batch
from llama_posttrain.data.schema import (
    STRENGTHS,
    Drop,
    PreferenceRecord,
    SFTRecord,
    ValidationError,
    parse_preference,
    parse_sft,
)
from llama_posttrain.llama.chat import ChatFormat, EncodedDialog
from llama_posttrain.llama.config import PAD_DOC

KINDS = ("sft", "rm", "dpo")
OVERLENGTH = ("truncate", "drop")


class Target(NamedTuple):
    hidden_index: int  # index (in the example) of the hidden state that predicts the token
    token: int
    seq: int  # index into Example.seqs; those are sorted best first, so seq k is the k-th best
    is_format: bool  # header span or turn terminator


class Seq(NamedTuple):
    score_index: int  # index (in the example) of its final token: where its reward is read
    rank: int  # 0 = best within the example


@dataclass
class Example:
    tokens: list[int]
    positions: list[int]
    branch: list[int]
    targets: list[Target] = field(default_factory=list)
    seqs: list[Seq] = field(default_factory=list)  # sorted by rank, best first
    strength: int = -1  # index into STRENGTHS, -1 if unknown
    uid: int = -1  # index in its dataset
    docs: list[int] | None = None  # per-token sub-document, when the example spans several (separate rows)

    def __len__(self) -> int:
        return len(self.tokens)


# ----------------------------------------------------------------------------- encoding


def encode_response(chat: ChatFormat, messages: list[dict]) -> EncodedDialog:
    """A response continues a prompt that ends with the assistant header (ChatFormat.encode_response)."""
    return chat.encode_response(messages)


def _truncate(enc: EncodedDialog, n: int, terminator: int) -> EncodedDialog:
    """Keep n tokens, the last one the terminator (so the model still learns to stop)."""
    out = EncodedDialog(enc.tokens[: n - 1], enc.is_target[: n - 1], enc.is_format[: n - 1])
    out.add([terminator], target=enc.is_target[n - 1], fmt=True)
    return out


def encode_sft(
    record: SFTRecord, chat: ChatFormat, max_len: int, overlength: str, report: Counter, train_on_prompt: bool = False
):
    """A dialog (targets: assistant turns; every token with train_on_prompt) or plain text (all tokens)."""
    if record.text is not None:
        ids = chat.tokenizer.encode(record.text, bos=True, eos=True)
        enc = EncodedDialog(ids, [False] + [True] * (len(ids) - 1), [False] * len(ids))
    else:
        enc = chat.encode_dialog(record.messages)
        if train_on_prompt:
            enc.is_target = [False] + [True] * (len(enc) - 1)
    if len(enc) > max_len:
        if overlength == "drop":
            report["dropped: over max_len"] += 1
            return None
        report["truncated: over max_len"] += 1
        if enc.is_target[max_len - 1] and enc.tokens[max_len - 1] not in chat.stop_ids:
            enc = _truncate(enc, max_len, chat.eot_id)  # cut inside an assistant turn
        else:
            enc = EncodedDialog(enc.tokens[:max_len], enc.is_target[:max_len], enc.is_format[:max_len])
    targets = [Target(i - 1, t, 0, f) for i, (t, m, f) in enumerate(zip(enc.tokens, enc.is_target, enc.is_format)) if m]
    if not targets:
        report["dropped: no target left after truncation"] += 1
        return None
    n = len(enc)
    return Example(enc.tokens, list(range(n)), [0] * n, targets, [Seq(n - 1, 0)])


def _cap(lengths: list[int], budget: int) -> int:
    """Largest c with sum(min(l, c)) <= budget: cut the longest responses first."""
    c = max(lengths)
    while sum(min(n, c) for n in lengths) > budget:
        c -= 1
    return c


def encode_preference(
    record: PreferenceRecord,
    chat: ChatFormat,
    max_len: int,
    overlength: str,
    report: Counter,
    shuffle_seed: int | None = None,
    max_responses: int | None = None,
    one_row: bool = True,
):
    """-> Example [prompt][responses...], responses in shuffled order if shuffle_seed is given.

    max_responses=2 keeps the best and the worst (a DPO pair: chosen, rejected).
    """
    unique, seen = [], set()
    for r in record.responses:
        key = tuple((m["role"], m["content"].strip()) for m in r)
        if key in seen:
            report["dropped responses: identical to a better one"] += 1
            continue
        seen.add(key)
        unique.append(r)
    if len(unique) < 2:
        report["dropped: fewer than 2 distinct responses"] += 1
        return None
    if max_responses is not None and len(unique) > max_responses:
        unique = unique[: max_responses - 1] + [unique[-1]]
    prompt = chat.encode_dialog(record.prompt, add_generation_prompt=True)
    responses = [encode_response(chat, r) for r in unique]
    lengths = [len(r) for r in responses]
    if not one_row and len(prompt) * len(responses) + sum(lengths) > max_len:
        report["dropped: over max_len (separate rows)"] += 1
        return None
    if len(prompt) + sum(lengths) > max_len:
        budget = max_len - len(prompt)
        if budget < 2 * len(responses):
            report["dropped: prompt too long for max_len"] += 1
            return None
        if overlength == "drop":
            report["dropped: over max_len"] += 1
            return None
        report["truncated: over max_len"] += 1
        c = _cap(lengths, budget)
        responses = [_truncate(r, c, chat.eot_id) if len(r) > c else r for r in responses]
        if len({tuple(r.tokens) for r in responses}) < len(responses):
            report["dropped: responses identical after truncation"] += 1
            return None

    order = list(range(len(responses)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    ex = (build_group if one_row else build_separate)(prompt, responses, order)
    ex.strength = STRENGTHS.index(record.strength) if record.strength else -1
    return ex


def build_separate(prompt: EncodedDialog, responses: list[EncodedDialog], order: list[int] | None = None) -> Example:
    """The baseline the one-row layout replaces: each response after its own copy of the prompt,
    [prompt][r_a] [prompt][r_b] ..., each copy a document of its own (the same sequences and ranks)."""
    order = list(range(len(responses))) if order is None else order
    P = len(prompt)
    ex = Example([], [], [], docs=[])
    for slot, rank in enumerate(order):
        r, start = responses[rank], len(ex.tokens)
        ex.tokens += prompt.tokens + r.tokens
        ex.positions += range(P + len(r))
        ex.branch += [0] * (P + len(r))
        ex.docs += [slot] * (P + len(r))
        for j, (t, m, f) in enumerate(zip(r.tokens, r.is_target, r.is_format)):
            if m:
                ex.targets.append(Target(start + P + j - 1, t, rank, f))
        ex.seqs.append(Seq(start + P + len(r) - 1, rank))
    ex.seqs.sort(key=lambda s: s.rank)
    return ex


def build_group(prompt: EncodedDialog, responses: list[EncodedDialog], order: list[int] | None = None) -> Example:
    """[prompt][responses in `order`]: sequence k of the example is responses[k] (its rank)."""
    order = list(range(len(responses))) if order is None else order
    P = len(prompt)
    ex = Example(list(prompt.tokens), list(range(P)), [0] * P)
    for slot, rank in enumerate(order):
        r, start = responses[rank], len(ex.tokens)
        ex.tokens += r.tokens
        ex.positions += range(P, P + len(r))
        ex.branch += [slot + 1] * len(r)
        for j, (t, m, f) in enumerate(zip(r.tokens, r.is_target, r.is_format)):
            if m:
                ex.targets.append(Target(start + j - 1 if j else P - 1, t, rank, f))
        ex.seqs.append(Seq(start + len(r) - 1, rank))
    ex.seqs.sort(key=lambda s: s.rank)
    return ex


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class EncodeOptions:
    """Everything that decides how a record becomes an Example (part of the tokenized cache's key)."""

    kind: str  # sft | rm (responses shuffled) | dpo (best vs worst)
    max_len: int
    overlength: str = "truncate"
    skip_invalid: bool = False
    keep_strengths: tuple[str, ...] | None = None  # preference data: keep only these strengths
    seed: int = 0  # RM: the response shuffle
    train_on_prompt: bool = False  # SFT: every token a target
    one_row: bool = True  # preference data: [prompt][responses...] (false: a prompt copy per response)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown data kind {self.kind!r}; expected one of {KINDS}")
        if self.overlength not in OVERLENGTH:
            raise ValueError(f"overlength must be one of {OVERLENGTH}, got {self.overlength!r}")
        keep = self.keep_strengths
        if keep is not None and (not isinstance(keep, (list, tuple)) or any(s not in STRENGTHS for s in keep)):
            raise ValueError(  # a typo would otherwise filter out every record
                f"data.keep_strengths must be a list of known strengths ({', '.join(STRENGTHS)}), got {keep!r}"
            )
        if keep is not None:
            object.__setattr__(self, "keep_strengths", tuple(keep))

    def key(self) -> dict:
        """The options that change the examples (the seed only shuffles RM responses)."""
        out = {k: v for k, v in vars(self).items() if k != "seed"}
        return {**out, "seed": self.seed} if self.kind == "rm" else out


def _check_turns(record, chat: ChatFormat, where: str) -> None:
    """Turns the chat format cannot write (tool turns in the 3.1 format) are the record's error."""
    parts = {"messages": record.messages or []} if isinstance(record, SFTRecord) else {"prompt": record.prompt}
    parts |= {f"responses[{i}]": r for i, r in enumerate(getattr(record, "responses", []))}
    for fld, messages in parts.items():
        try:
            chat.check_messages(messages)
        except ValueError as e:
            raise ValidationError(f"{where}: {fld}: {e}") from None


def encode_record(obj, where: str, index: int, opts: EncodeOptions, chat: ChatFormat, report: Counter):
    """One record (or the ValidationError read in its place) -> Example, or None with the reason counted
    in `report`. index: the record's number in its data path (seeds the RM response shuffle)."""
    try:
        if isinstance(obj, ValidationError):
            raise obj
        record = parse_sft(obj, where) if opts.kind == "sft" else parse_preference(obj, where)
        _check_turns(record, chat, where)
    except ValidationError as e:
        if not opts.skip_invalid:
            raise
        report[f"skipped invalid: {str(e).split(': ', 2)[1]}"] += 1
        return None
    except Drop as e:  # well-formed, nothing to train on (e.g. tied scores)
        report[f"dropped: {e}"] += 1
        return None
    if opts.kind == "sft":
        return encode_sft(record, chat, opts.max_len, opts.overlength, report, opts.train_on_prompt)
    if getattr(record, "tied", 0):  # responses whose score tied a better one's (schema.py "scores")
        report["dropped: responses tied with another's score"] += record.tied
    if opts.keep_strengths is not None and record.strength not in opts.keep_strengths:
        report[f"filtered: strength {record.strength}"] += 1
        return None
    shuffle = opts.seed * 1_000_003 + index if opts.kind == "rm" else None
    max_responses = 2 if opts.kind == "dpo" else None
    return encode_preference(record, chat, opts.max_len, opts.overlength, report, shuffle, max_responses, opts.one_row)


# ----------------------------------------------------------------------------- packing


def rows_per_microbatch(max_len: int, tokens_per_microbatch: int) -> int:
    """The most rows `plan` puts in a micro-batch: B of the static shapes."""
    return max(1, tokens_per_microbatch // max_len)


def bucket_lengths(max_len: int, step: int) -> list[int]:
    """The row lengths T of static shapes: the multiples of `step` up to 8 * step, then doubling, below
    max_len rounded up to 8 (a full row, the last length). For step 128 and max_len 4096: 128, 256, ...,
    1024, 2048, 4096; a micro-batch is padded by at most 1/8 up to 1024 tokens, at most 2x above."""
    top = -(-max_len // 8) * 8
    out = list(range(step, min(8 * step, top - 1) + 1, step))
    while out and 2 * out[-1] < top:
        out.append(2 * out[-1])
    return out + [top]


def static_shape(longest: int, max_len: int, tokens_per_microbatch: int, step: int) -> tuple[int, int]:
    """(B, T) of a micro-batch whose longest row has `longest` tokens, under buckets of `step`: B the most
    rows `plan` packs, T the smallest of bucket_lengths(max_len, step) that holds that row."""
    T = next(t for t in bucket_lengths(max_len, step) if t >= longest)
    return rows_per_microbatch(max_len, tokens_per_microbatch), T


def plan(lengths, max_len: int, tokens_per_microbatch: int) -> list[list[list[int]]]:
    """First-fit packing from lengths alone: micro-batches -> rows -> positions in `lengths`.
    Each example goes to the first row of the current micro-batch with room, else a new row."""
    rows_per_batch = rows_per_microbatch(max_len, tokens_per_microbatch)
    batches, rows, fill = [], [], []
    for i, n in enumerate(map(int, lengths)):
        if n > max_len:
            raise ValueError(f"example of {n} tokens exceeds max_len {max_len}")
        r = next((k for k, used in enumerate(fill) if used + n <= max_len), None)
        if r is None:
            if len(rows) == rows_per_batch:
                batches.append(rows)
                rows, fill = [], []
            rows.append([])
            fill.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        fill[r] += n
    if rows:
        batches.append(rows)
    return batches


def pack(examples: list[Example], max_len: int, tokens_per_microbatch: int, pad_id: int = 0, pad_multiple: int = 8):
    """Pack examples (in order, first-fit) into rows of <= max_len, rows into micro-batches."""
    batches = plan([len(ex) for ex in examples], max_len, tokens_per_microbatch)
    return [collate([[examples[i] for i in row] for row in rows], pad_id, pad_multiple) for rows in batches]


def collate(
    rows: list[list[Example]], pad_id: int = 0, pad_multiple: int = 8, shape: tuple[int, int] | None = None
) -> Batch:
    """Rows of examples -> a Batch of shape (len(rows), longest row rounded up to pad_multiple), or
    exactly `shape` (B, T): B >= len(rows), the extra rows all padding, and T >= the longest row.
    Built as numpy arrays (int64 / bool), each a tensor when first read (Batch: torch.from_numpy, no copy):
    ~2x faster than torch.full plus a torch.tensor and a slice copy per example field, and no torch at all
    in a process that only loads data."""
    longest = max([sum(map(len, r)) for r in rows] + [1])
    B, T = shape or (len(rows), -(-longest // pad_multiple) * pad_multiple)
    if B < len(rows) or T < longest:
        raise ValueError(f"{len(rows)} rows, the longest {longest} tokens, do not fit in shape {shape}")
    tokens = np.full((B, T), pad_id, dtype=np.int64)
    positions = np.zeros((B, T), dtype=np.int64)
    doc = np.full((B, T), PAD_DOC, dtype=np.int64)
    branch = np.zeros((B, T), dtype=np.int64)
    t_hidden, t_token, t_seq, t_fmt, s_score, s_group, s_rank, g_strength, g_uid = ([] for _ in range(9))
    for b, row in enumerate(rows):
        start, next_doc = 0, 0
        for ex in row:
            n, base, seq0, group = len(ex), b * T + start, len(s_score), len(g_strength)
            tokens[b, start : start + n] = ex.tokens
            positions[b, start : start + n] = ex.positions
            branch[b, start : start + n] = ex.branch
            local = np.asarray(ex.docs, dtype=np.int64) if ex.docs is not None else np.zeros(n, dtype=np.int64)
            doc[b, start : start + n] = next_doc + local
            next_doc += int(local.max()) + 1
            for t in ex.targets:
                t_hidden.append(base + t.hidden_index)
                t_token.append(t.token)
                t_seq.append(seq0 + t.seq)
                t_fmt.append(t.is_format)
            for s in ex.seqs:
                s_score.append(base + s.score_index)
                s_group.append(group)
                s_rank.append(s.rank)
            g_strength.append(ex.strength)
            g_uid.append(ex.uid)
            start += n

    def long(x):
        return np.asarray(x, dtype=np.int64)

    return Batch(
        tokens, positions, doc, branch, long(t_hidden), long(t_token), long(t_seq), np.asarray(t_fmt, dtype=np.bool_),
        long(s_score), long(s_group), long(s_rank), long(g_strength), long(g_uid),
    )  # fmt: skip
