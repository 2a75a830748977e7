"""Reading records, and the deterministic, resumable, rank-sharded loader.

`load_examples(path, kind, ...)` reads JSONL (or Parquet, with pyarrow), validates each record,
encodes it into an `Example` and prints a report of everything skipped, dropped or truncated.

`DataLoader` yields one `Step` per optimizer step: this rank's micro-batches plus the global
counts (targets, sequences, pairs) that losses divide by, so that neither gradient accumulation
nor world size changes the loss. Every rank computes the packing of every rank (cheap) so that
all ranks run the same number of micro-batches, as FSDP requires; a rank with fewer gets empty
ones. Order: a permutation per epoch from (seed, epoch); `state_dict()` is (epoch, step).
Training drops each epoch's last partial batch; `eval_steps()` covers every example exactly once.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from data.rows import OVERLENGTH, Batch, Example, collate, encode_preference, encode_sft, pack
from data.schema import STRENGTHS, ValidationError, parse_preference, parse_sft
from llama.chat import ChatFormat

KINDS = ("sft", "rm", "dpo")


def read_records(path):
    """Yield (where, obj) from a .jsonl/.json-lines or .parquet file; where = 'file:line'."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"data file {path} is a directory; give a .jsonl or .parquet file")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, obj in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path}:{i}", obj
        return
    with open(path, "rb") as f:  # bytes, decoded per line: a bad byte is one bad record, not a crash
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start : e.start + 1].hex()
                yield where, ValidationError(f"{where}: encoding: not UTF-8 (byte 0x{bad} at byte {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, ValidationError(f"{where}: json: malformed JSON ({e.msg} at column {e.colno})")
                continue
            yield where, obj


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
) -> tuple[list[Example], Counter]:
    """Read, validate and encode a file. kind: sft | rm (responses shuffled) | dpo (best vs worst)."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
    if overlength not in OVERLENGTH:
        raise ValueError(f"overlength must be one of {OVERLENGTH}, got {overlength!r}")
    if keep_strengths is not None and (
        not isinstance(keep_strengths, (list, tuple)) or any(s not in STRENGTHS for s in keep_strengths)
    ):  # a typo would otherwise filter out every record
        raise ValueError(
            f"data.keep_strengths must be a list of known strengths ({', '.join(STRENGTHS)}), got {keep_strengths!r}"
        )
    report, examples = Counter(), []
    for index, (where, obj) in enumerate(read_records(path)):
        report["records"] += 1
        try:
            if isinstance(obj, ValidationError):
                raise obj
            record = parse_sft(obj, where) if kind == "sft" else parse_preference(obj, where)
        except ValidationError as e:
            if not skip_invalid:
                raise
            report[f"skipped invalid: {str(e).split(': ', 2)[1]}"] += 1
            continue
        if kind == "sft":
            ex = encode_sft(record, chat, max_len, overlength, report, train_on_prompt)
        else:
            if keep_strengths is not None and record.strength not in keep_strengths:
                report[f"filtered: strength {record.strength}"] += 1
                continue
            shuffle = seed * 1_000_003 + index if kind == "rm" else None
            ex = encode_preference(
                record, chat, max_len, overlength, report, shuffle, 2 if kind == "dpo" else None, one_row
            )
        if ex is not None:
            ex.uid = len(examples)
            examples.append(ex)
    report["examples"] = len(examples)
    if verbose:
        print(f"{path}: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    return examples, report


@dataclass
class Step:
    micro_batches: list[Batch]  # this rank's
    num_targets: int  # over all micro-batches of all ranks
    num_pairs: int  # ordered (better, worse) pairs
    num_best_targets: int  # targets of the best-ranked sequences (DPO: chosen tokens)


def _num_pairs(ex: Example) -> int:
    n = len(ex.seqs)
    return n * (n - 1) // 2


def _counts(exs: list[Example]) -> dict:
    """The counts a Step's losses divide by."""
    return dict(
        num_targets=sum(len(e.targets) for e in exs),
        num_pairs=sum(_num_pairs(e) for e in exs),
        num_best_targets=sum(1 for e in exs for t in e.targets if t.seq == 0),  # seq 0 is the best
    )


class DataLoader:
    def __init__(
        self,
        examples: list[Example],
        batch_size: int,
        max_len: int,
        tokens_per_microbatch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pad_id: int = 0,
        drop_last: bool = True,
    ):
        """batch_size: examples per optimizer step, over all ranks.

        drop_last=False (evaluation): the last partial batch is kept, so a set smaller than a batch,
        or than the number of ranks (those without an example run empty micro-batches), is fine."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not examples:
            raise ValueError("no examples")
        if drop_last and batch_size < world_size:
            raise ValueError(f"batch_size {batch_size} is smaller than world_size {world_size}")
        if drop_last and len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples are fewer than one batch of {batch_size}")
        self.examples, self.batch_size, self.max_len = examples, batch_size, max_len
        self.tokens_per_microbatch, self.rank, self.world_size = tokens_per_microbatch, rank, world_size
        self.seed, self.shuffle, self.pad_id, self.drop_last = seed, shuffle, pad_id, drop_last
        self.epoch, self.step = 0, 0
        self._order: tuple[int | None, list[int]] = (None, [])

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        if self._order[0] != epoch:  # one permutation per epoch, computed once
            idx = list(range(len(self.examples)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
            self._order = (epoch, idx)
        return self._order[1]

    def build_step(self, epoch: int, step: int) -> Step:
        ids = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        per_rank = [[self.examples[i] for i in ids[r :: self.world_size]] for r in range(self.world_size)]
        packed = [pack(exs, self.max_len, self.tokens_per_microbatch, self.pad_id) for exs in per_rank]
        mine = packed[self.rank]
        n_micro = max(len(p) for p in packed)
        mine += [collate([[]], self.pad_id)] * (n_micro - len(mine))  # empty: no targets, no sequences
        return Step(mine, **_counts([self.examples[i] for i in ids]))

    def eval_steps(self):
        """Every example exactly once (epoch 0's order, the last step partial). Each step carries the
        counts of the whole set, so the micro-batch losses of all steps and ranks sum to the loss of
        the whole set as one batch, whatever the batch size, world size or partial last step."""
        whole = _counts(self.examples)
        for i in range(-(-len(self.examples) // self.batch_size)):
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


def build_loaders(
    dc, kind: str, chat: ChatFormat, rank: int = 0, world_size: int = 1, verbose: bool = True, **encode_kw
):
    """Train and (optional) eval loaders for this rank from a config's data section `dc`
    (train/config.py DataSection); the load reports are printed when `verbose`."""
    kw = dict(kind=kind, chat=chat, max_len=dc.max_len, overlength=dc.overlength, skip_invalid=dc.skip_invalid)
    kw.update(keep_strengths=dc.keep_strengths, verbose=verbose, **encode_kw)
    loader_kw = dict(
        max_len=dc.max_len, tokens_per_microbatch=dc.tokens_per_microbatch, rank=rank, world_size=world_size
    )
    loader_kw["pad_id"] = chat.tokenizer.pad_id
    train_examples, _ = load_examples(dc.train, seed=dc.seed, **kw)
    if len(train_examples) < dc.batch_size:
        raise ValueError(
            f"data.train {dc.train}: {len(train_examples) or 'no'} examples (after the drops reported above), "
            f"fewer than one batch of data.batch_size={dc.batch_size}"
        )
    train = DataLoader(train_examples, dc.batch_size, seed=dc.seed, **loader_kw)
    evaluation = None
    if dc.eval:
        eval_examples, _ = load_examples(dc.eval, seed=dc.seed + 1, **kw)
        if not eval_examples:
            raise ValueError(f"data.eval {dc.eval}: no examples (after the drops reported above)")
        evaluation = DataLoader(eval_examples, dc.batch_size, shuffle=False, drop_last=False, **loader_kw)
    return train, evaluation
