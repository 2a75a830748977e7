"""Examples from data files, and the deterministic, resumable, rank-sharded loader.

Two ways to the same examples:
- `load_examples(path, kind, ...)`: read, validate and encode a file into a list of Examples in
  memory (tests, benchmarks, small sets); prints a report of everything skipped, dropped, truncated.
- the tokenized cache (llama_posttrain/data/prepare.py, llama_posttrain/data/cache.py): the same encoding done once, by rank 0 in
  parallel processes, into flat arrays that every rank reads its examples from. `build_loaders` uses it unless
  `data.cache: false`.

`DataLoader` yields one `Step` per optimizer step: this rank's micro-batches plus the global
counts (targets, sequences, pairs) that losses divide by, so that neither gradient accumulation
nor world size changes the loss. Every rank plans the packing of every rank from the example
lengths alone (llama_posttrain/data/rows.py `plan`), so that all ranks run the same number of micro-batches, as
FSDP requires (a rank with fewer gets empty ones), and then reads only its own examples' tokens.
With `shape_buckets` (static shapes, for compiled blocks) every micro-batch is (B, T): B the most rows
a micro-batch holds, T the bucket (llama_posttrain/data/rows.py `bucket_lengths`) of the longest row of that
micro-batch over all ranks, so all ranks run the same shapes in the same order and a new shape is
compiled by all of them at the same micro-batch.
Order: a permutation per epoch from (seed, epoch); `state_dict()` is (epoch, step). Training drops
each epoch's last partial batch; `eval_steps()` covers every example exactly once.

Mixtures (`data.train: [{path: a.jsonl, weight: 2}, {path: b.parquet, weight: 0.5}]`): a weight is
how many times per epoch a file's examples are seen. Each epoch takes every example of a file
floor(weight) times, plus a sample without replacement of the rest, drawn anew each epoch from
(seed, epoch, file), so that the file contributes round(weight * examples) to the epoch; the epoch is
then shuffled as a whole. Weight 1 everywhere: the files end to end, each example once per epoch.
"""

from __future__ import annotations

import random
from array import array
from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from llama_posttrain.data.cache import report_line
from llama_posttrain.data.prepare import on_rank0, prepare_config
from llama_posttrain.data.records import read_records, train_sources
from llama_posttrain.data.rows import (
    Batch,
    EncodeOptions,
    Example,
    bucket_lengths,
    collate,
    encode_record,
    plan,
    static_shape,
)
from llama_posttrain.llama.chat import ChatFormat


def load_examples(
    path,
    kind: str,
    chat: ChatFormat,
    max_len: int,
    overlength: str = "truncate",
    skip_invalid: bool = False,
    keep_strengths: tuple[str, ...] | None = None,
    seed: int = 0,
    verbose: bool = True,
    train_on_prompt: bool = False,
    one_row: bool = True,
    fingerprints: dict[str, str] | None = None,
) -> tuple[list[Example], Counter]:
    """Read, validate and encode a data path in memory. kind: sft | rm (responses shuffled) | dpo (best vs worst).
    fingerprints: filled with {data file (resolved absolute path): content sha256}, hashed as read
    (llama_posttrain/data/records.py `chunks`)."""
    opts = EncodeOptions(kind, max_len, overlength, skip_invalid, keep_strengths, seed, train_on_prompt, one_row)
    report, examples = Counter(), []
    for index, (where, obj) in enumerate(read_records(path, fingerprints)):
        report["records"] += 1
        ex = encode_record(obj, where, index, opts, chat, report)
        if ex is not None:
            ex.uid = len(examples)
            examples.append(ex)
    report["examples"] = len(examples)
    if verbose:
        print(f"{path}: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    return examples, report


# ----------------------------------------------------------------------------- datasets
# What the loader reads: `lengths`, `num_targets`, `num_pairs`, `num_chosen_targets` (one entry per example),
# len() and data[i] -> Example. TokenizedData (llama_posttrain/data/cache.py) is one; these are the others.


class InMemory:
    """A list of Examples; fingerprints: {data file: content sha256} of the files they were read from."""

    def __init__(self, examples: list[Example], fingerprints: dict[str, str] | None = None):
        self.examples, self.fingerprints = examples, dict(fingerprints or {})
        self.lengths = np.array([len(e) for e in examples], dtype=np.int64)
        self.num_targets = np.array([len(e.targets) for e in examples], dtype=np.int64)
        self.num_pairs = np.array([len(e.seqs) * (len(e.seqs) - 1) // 2 for e in examples], dtype=np.int64)
        self.num_chosen_targets = np.array([sum(t.seq == 0 for t in e.targets) for e in examples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class Concat:
    """Several datasets end to end (a mixture's files); an example's uid is its index over all of them."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])
        self.fingerprints = {k: v for p in parts for k, v in getattr(p, "fingerprints", {}).items()}
        for name in ("lengths", "num_targets", "num_pairs", "num_chosen_targets"):
            setattr(self, name, np.concatenate([getattr(p, name) for p in parts]))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> Example:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return replace(self.parts[k][i - int(self.starts[k])], uid=i)


def as_dataset(examples):
    return examples if hasattr(examples, "lengths") else InMemory(examples)


def epoch_examples(mixture: list[tuple[int, float]], seed: int, epoch: int) -> array:
    """One epoch's example indices, before shuffling: file f (its `n` examples after the previous
    files') floor(w) times, plus round(w * n) - floor(w) * n of them sampled from (seed, epoch, f).
    An array of int64 (8 bytes an index; a list held ~40, an int object and a pointer)."""
    out, start = array("q"), 0
    for f, (n, w) in enumerate(mixture):
        ids = range(start, start + n)
        extra = round(w * n) - int(w) * n
        for _ in range(int(w)):
            out.extend(ids)
        out.extend(random.Random(f"{seed}:{epoch}:{f}").sample(ids, extra))
        start += n
    return out


@dataclass
class Step:
    micro_batches: list[Batch]  # this rank's
    num_targets: int  # over all micro-batches of all ranks
    num_pairs: int  # ordered (better, worse) pairs
    num_chosen_targets: int  # targets of the best-ranked (rank 0) sequences: DPO's chosen tokens


class DataLoader:
    def __init__(
        self,
        examples,
        batch_size: int,
        max_len: int,
        tokens_per_microbatch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pad_id: int = 0,
        drop_last: bool = True,
        mixture: list[tuple[int, float]] | None = None,
        shape_buckets: int = 0,
    ):
        """examples: a list of Examples or a dataset (TokenizedData, Concat). batch_size: examples per
        optimizer step, over all ranks. mixture: (examples, weight) of each file, in order (default:
        one file, weight 1). shape_buckets: 0, each micro-batch (rows packed, its longest row rounded up
        to 8); N > 0, static shapes: (rows_per_microbatch, T), T in bucket_lengths(max_len, N).

        drop_last=False (evaluation): the last partial batch is kept, so a set smaller than a batch,
        or than the number of ranks (those without an example run empty micro-batches), is fine.

        `fingerprints: dict[str, str]`: the data files this loader reads, each as its resolved absolute
        path -> the sha256 hex of its content, taken from the dataset (its `fingerprints`; {} for a
        plain list of Examples). `build_loaders` fills it for both paths without hashing twice: with
        the cache, the hashes its key was made of (a build checks the bytes it tokenizes against
        them); in memory, the hash of the bytes the records were read from. A resumed run compares
        them to refuse changed data."""
        data = as_dataset(examples)
        mixture = mixture or [(len(data), 1.0)]
        epoch_size = sum(round(w * n) for n, w in mixture)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not len(data):
            raise ValueError("no examples")
        if sum(n for n, _ in mixture) != len(data):
            raise ValueError(f"the mixture's files hold {sum(n for n, _ in mixture)} examples, the data {len(data)}")
        if drop_last and batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than world_size {world_size}")
        if drop_last and epoch_size < batch_size:
            raise ValueError(f"{epoch_size} examples are fewer than one batch of {batch_size}")
        self.examples, self.data, self.mixture, self.epoch_size = examples, data, mixture, epoch_size
        self.fingerprints: dict[str, str] = dict(getattr(data, "fingerprints", {}))
        self.batch_size, self.max_len = batch_size, max_len
        self.tokens_per_microbatch, self.rank, self.world_size = tokens_per_microbatch, rank, world_size
        self.seed, self.shuffle, self.pad_id, self.drop_last = seed, shuffle, pad_id, drop_last
        self.shape_buckets = shape_buckets
        self.epoch, self.step = 0, 0
        self._order: tuple[int | None, np.ndarray] = (None, np.empty(0, dtype=np.int64))

    @property
    def steps_per_epoch(self) -> int:
        n = self.epoch_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:  # one permutation per epoch, computed once
            idx = epoch_examples(self.mixture, self.seed, epoch)
            if self.shuffle:  # in place: the same swaps, so the same order, as on a list
                random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
            self._order = (epoch, np.frombuffer(idx, dtype=np.int64))
        return self._order[1]

    def _counts(self, ids: np.ndarray) -> dict:
        """The counts a Step's losses divide by."""
        d = self.data
        return dict(
            num_targets=int(d.num_targets[ids].sum()),
            num_pairs=int(d.num_pairs[ids].sum()),
            num_chosen_targets=int(d.num_chosen_targets[ids].sum()),
        )

    def build_step(self, epoch: int, step: int) -> Step:
        ids = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        shares = [ids[r :: self.world_size] for r in range(self.world_size)]
        plans = [plan(self.data.lengths[s], self.max_len, self.tokens_per_microbatch) for s in shares]
        shapes = self._shapes(shares, plans)
        mine = shares[self.rank]  # only this rank's examples are read
        batches = [
            collate([[self.data[int(mine[j])] for j in row] for row in rows], self.pad_id, shape=shape)
            for rows, shape in zip(plans[self.rank], shapes)
        ]
        batches += [collate([[]], self.pad_id, shape=shape) for shape in shapes[len(batches) :]]  # no targets
        return Step(batches, **self._counts(ids))

    def _shapes(self, shares: list[np.ndarray], plans: list) -> list[tuple[int, int] | None]:
        """Per micro-batch of the step: its static (B, T), the same on every rank; None: collate's own."""
        n = max(map(len, plans))
        if not self.shape_buckets:
            return [None] * n
        longest = [1] * n  # micro-batch i's longest row over all ranks
        for share, batches in zip(shares, plans):
            for i, rows in enumerate(batches):
                longest[i] = max([longest[i]] + [int(self.data.lengths[share[row]].sum()) for row in rows])
        return [static_shape(t, self.max_len, self.tokens_per_microbatch, self.shape_buckets) for t in longest]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every (B, T) a micro-batch may have under static shapes (empty without)."""
        if not self.shape_buckets:
            return []
        return [
            static_shape(t, self.max_len, self.tokens_per_microbatch, self.shape_buckets)
            for t in bucket_lengths(self.max_len, self.shape_buckets)
        ]

    def eval_steps(self):
        """Every example exactly once (epoch 0's order, the last step partial). Each step carries the
        counts of the whole set, so the micro-batch losses of all steps and ranks sum to the loss of
        the whole set as one batch, whatever the batch size, world size or partial last step."""
        whole = self._counts(np.arange(len(self.data)))
        for i in range(-(-len(self.data) // self.batch_size)):
            yield replace(self.build_step(0, i), **whole)

    def __iter__(self):
        while True:
            if self.step >= self.steps_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
            step = self.build_step(self.epoch, self.step)
            self.step += 1
            yield step

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.epoch, self.step = state["epoch"], state["step"]


# ----------------------------------------------------------------------------- from a config


def _cached(dc, kind: str, chat: ChatFormat, rank: int, world_size: int, verbose: bool, **encode_kw):
    """Rank 0 finds or builds every cache the config needs while the other ranks wait; all read them."""
    found, eval_found = on_rank0(lambda: prepare_config(dc, kind, chat, verbose, **encode_kw), rank, world_size)
    parts = [p.open() for p in found]
    evaluation = eval_found.open() if eval_found else None
    for data in [*parts, evaluation] if evaluation else parts:
        if verbose:
            print(report_line(data))
    return parts, evaluation


def _in_memory(dc, kind: str, chat: ChatFormat, verbose: bool, **encode_kw):
    kw = dict(kind=kind, chat=chat, max_len=dc.max_len, overlength=dc.overlength, skip_invalid=dc.skip_invalid)
    kw.update(keep_strengths=dc.keep_strengths, verbose=verbose, **encode_kw)

    def one(path, seed):
        digests = {}
        return InMemory(load_examples(path, seed=seed, fingerprints=digests, **kw)[0], digests)

    parts = [one(path, dc.seed) for path, _ in train_sources(dc.train)]
    return parts, one(dc.eval, dc.seed + 1) if dc.eval else None


def build_loaders(
    dc,
    kind: str,
    chat: ChatFormat,
    rank: int = 0,
    world_size: int = 1,
    verbose: bool = True,
    shape_buckets: int = 0,
    **encode_kw,
):
    """Train and (optional) eval loaders for this rank from a config's data section `dc`
    (llama_posttrain/train/config.py DataSection); the load reports (and the static shapes) are printed when `verbose`.
    shape_buckets: DataLoader's (train.shape_buckets, resolved). encode_kw: the entry point's encoding
    options (train_on_prompt, one_row)."""
    if dc.batch_size < world_size:  # before any tokenizing
        raise ValueError(
            f"data.batch_size={dc.batch_size} is smaller than the number of ranks ({world_size}): each rank "
            "needs at least one example per step"
        )
    sources = train_sources(dc.train)
    if dc.cache:
        parts, evaluation = _cached(dc, kind, chat, rank, world_size, verbose, **encode_kw)
    else:
        parts, evaluation = _in_memory(dc, kind, chat, verbose, **encode_kw)
    mixture = [(len(p), w) for p, (_, w) in zip(parts, sources)]
    per_epoch = [round(w * n) for n, w in mixture]
    if verbose and len(sources) > 1:
        for (path, w), (n, _), k in zip(sources, mixture, per_epoch):
            print(f"data.train mixture: {path}: {n} examples x weight {w:g} = {k} per epoch ({k / sum(per_epoch):.1%})")
    if sum(per_epoch) < dc.batch_size:
        name = dc.train if isinstance(dc.train, str) else ", ".join(p for p, _ in sources)
        what = "examples" if len(sources) == 1 else "examples per epoch"
        raise ValueError(
            f"data.train {name}: {sum(per_epoch) or 'no'} {what} (after the drops reported above), "
            f"fewer than one batch of data.batch_size={dc.batch_size}"
        )
    loader_kw = dict(max_len=dc.max_len, tokens_per_microbatch=dc.tokens_per_microbatch, rank=rank)
    loader_kw.update(world_size=world_size, pad_id=chat.tokenizer.pad_id, shape_buckets=shape_buckets)
    data = parts[0] if len(parts) == 1 else Concat(parts)
    train = DataLoader(data, dc.batch_size, seed=dc.seed, mixture=mixture, **loader_kw)
    if verbose and shape_buckets:
        (B, _), lengths = train.shapes[0], [T for _, T in train.shapes]
        print(f"static shapes: micro-batches of {B} rows x T tokens, T in {lengths}", flush=True)
    if evaluation is None:
        return train, None
    if not len(evaluation):
        raise ValueError(f"data.eval {dc.eval}: no examples (after the drops reported above)")
    return train, DataLoader(evaluation, dc.batch_size, shuffle=False, drop_last=False, **loader_kw)
