"""Tokenize a data path once into the cache (llama_posttrain/data/cache.py), in parallel processes. Training runs do it
themselves when a cache is missing (llama_posttrain/data/loader.py); `python -m llama_posttrain.train.prepare_data` does it ahead of a
run, from the run's config (the command line lives in train/: data/ never imports train/).

`prepare(path, opts, chat, cache_root, num_workers)` -> the cache folder, found by its key or built:
the main process cuts the data into chunks of records (llama_posttrain/data/records.py), `num_workers` processes
validate and encode them (llama_posttrain/data/rows.py `encode_record`, the same code as the in-memory path) into
flat arrays, and the main process appends those, in order, to files in a temporary folder that is
renamed into place once complete. A run killed mid-write leaves only the temporary folder, which the
next run of this host deletes; the cache is then built again. The data files are hashed for the key,
and again from the bytes tokenized (llama_posttrain/data/records.py `chunks`): a file that changed in between fails
the build, nothing written. A write that fails (a full disk) names the file and removes the folder.

Workers come from a forkserver, not fork: a training process may already hold CUDA and NCCL threads.
Each worker watches the process that started the pool and exits when it dies (kill -9 included), so
no worker, and then no forkserver (it lives while a worker holds its pipe), outlives it.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import multiprocessing
import os
import select
import shutil
import socket
import threading
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama_posttrain.data import cache
from llama_posttrain.data.io import write_json
from llama_posttrain.data.records import Chunk, chunk_records, chunks, data_files, file_id, train_sources
from llama_posttrain.data.rows import EncodeOptions, encode_record
from llama_posttrain.llama.chat import ChatFormat

CHUNK_RECORDS = 1024  # records per task sent to a worker
MAX_WORKERS = 32


def default_root(path) -> Path:
    """A `.tokenized` folder next to the data: for a caller that names no cache folder (a library call). A
    training run and prepare_data name one, a folder the run owns (llama_posttrain/train/run_folder.py `cache_dir`):
    never beside the data, whose folder may be the user's or the repository's."""
    return (Path(path).parent if Path(path).is_dir() else data_files(path)[0].parent) / ".tokenized"


def worker_count(num_workers: int) -> int:
    """data.num_workers, 0 = one per CPU core this process may use (at most MAX_WORKERS)."""
    return num_workers or min(MAX_WORKERS, len(os.sched_getaffinity(0)))


def _checked(values: list, dtype: np.dtype, what: str, where: str) -> np.ndarray:
    """values as dtype, refusing what does not fit (a silent wrap would corrupt training)."""
    a = np.asarray(values, dtype=np.int64) if dtype != np.bool_ else np.asarray(values, dtype=np.bool_)
    if a.size and dtype != np.bool_:
        info = np.iinfo(dtype)
        if a.min() < info.min or a.max() > info.max:
            raise ValueError(f"{where}: {what} out of the range the cache stores as {dtype} ({a.min()}..{a.max()})")
    return a.astype(dtype)


MAX_SEQS = 255  # sequences (responses) per example: their indices are stored as uint8


FLUSH_TOKENS = 1 << 14  # encoded tokens held as Python lists before they become the cache's compact arrays


def encode_pieces(chunk: Chunk, opts: EncodeOptions, chat: ChatFormat, report: Counter):
    """Yield a chunk of records as the cache's arrays, a piece of about FLUSH_TOKENS tokens at a time
    (the per-example ends count from the piece's start), counting into `report`. The examples' Python
    lists (~100 bytes per token) become arrays every FLUSH_TOKENS tokens, and a piece is written
    before the next is encoded: encoding holds ~2 MiB whatever the chunk's size."""
    dtypes = cache.fields(opts, chat.tokenizer.vocab_size)
    cols, ends, first = {name: [] for name in dtypes}, Counter(), 0

    def piece(stop: int) -> dict[str, np.ndarray]:  # records [first, stop) of the chunk
        where = f"{chunk.path} (records {chunk.first + first + 1}..{chunk.first + stop})"
        out = {name: _checked(cols[name], dtype, name, where) for name, dtype in dtypes.items()}
        for column in cols.values():
            column.clear()
        ends.clear()
        return out

    for i, (where, obj) in enumerate(chunk_records(chunk)):
        report["records"] += 1
        ex = encode_record(obj, where, chunk.first + i, opts, chat, report)
        if ex is None:
            continue
        if len(ex.seqs) > MAX_SEQS:
            raise ValueError(f"{where}: {len(ex.seqs)} responses; the tokenized cache holds at most {MAX_SEQS}")
        for name in ("tokens", "positions", "branch", "docs") if "docs" in cols else ("tokens", "positions", "branch"):
            cols[name] += getattr(ex, name)
        targets = dict(zip(("target_hidden_index", "target_token", "target_seq", "target_format"), zip(*ex.targets)))
        for name, column in targets.items():
            cols[name] += column
        for name, column in zip(("seq_score", "seq_rank"), zip(*ex.seqs)):
            cols[name] += column
        for name, n in (("token_end", len(ex.tokens)), ("target_end", len(ex.targets)), ("seq_end", len(ex.seqs))):
            ends[name] += n
            cols[name].append(ends[name])
        cols["strength"].append(ex.strength)
        cols["num_chosen_targets"].append(targets["target_seq"].count(0) if targets else 0)
        if len(cols["tokens"]) >= FLUSH_TOKENS:
            yield piece(i + 1)
            first = i + 1
    if cols["token_end"]:
        yield piece(report["records"])


def encode_chunk(chunk: Chunk, opts: EncodeOptions, chat: ChatFormat) -> tuple[list[dict[str, np.ndarray]], Counter]:
    """A chunk of records -> its pieces (encode_pieces) and its load report: a worker's result."""
    report = Counter()
    return list(encode_pieces(chunk, opts, chat, report)), report


_WORKER: tuple[EncodeOptions, ChatFormat] | None = None


def _exit_with(pid: int) -> None:
    """Block until process `pid` is gone, then end this process at once (a daemon thread's job)."""
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable once the process has exited
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
    else:
        while True:  # elsewhere: poll (a pid reused within the second is the only miss)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(1.0)
    os._exit(1)


def _init_worker(opts: EncodeOptions, chat: ChatFormat, parent: int) -> None:
    """A pool worker: keep the encoding settings; exit when `parent` (the process that started the
    pool, not the forkserver this worker was forked from) dies. Without this, a worker whose parent
    was killed stays blocked on the pool's queues for good, and keeps the forkserver alive."""
    global _WORKER
    _WORKER = (opts, chat)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="exit-with-parent").start()


def _work(chunk: Chunk):
    opts, chat = _WORKER
    return encode_chunk(chunk, opts, chat)


def _encoded(pieces, opts: EncodeOptions, chat: ChatFormat, workers: int):
    """Yield (its pieces, its load report) for each chunk, in order: in this process for one worker
    (the pieces a generator, the report complete once it is exhausted), else in `workers` processes
    with at most 2 chunks per worker in flight (a large file is never all in memory)."""
    if workers <= 1:
        for c in pieces:
            report = Counter()
            yield encode_pieces(c, opts, chat, report), report
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["llama_posttrain.data.prepare"])
    init = (opts, chat, os.getpid())  # pickled: the workers encode with this very tokenizer and template
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=init) as pool:
        pending = deque()
        try:
            for chunk in pieces:
                pending.append(pool.submit(_work, chunk))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


@contextmanager
def _writing(path: Path):
    """An OSError while writing the cache (Errno 28 says no path) as one naming the file written."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "the disk is full" if e.errno == errno.ENOSPC else "the disk quota is exceeded"
            raise OSError(
                e.errno,
                f"writing the tokenized cache {path}: {what} ({e.strerror}); the unfinished cache "
                "was removed: free space there, or set data.cache_dir to a folder on another disk",
            ) from None
        raise OSError(e.errno, f"writing the tokenized cache {path}: {e.strerror or e}") from None


class Writer:
    """Appends encoded chunks to the cache's files in a temporary folder, and the crc32 of each block
    to checksums.bin; `finish` renames the folder into place."""

    def __init__(self, folder: Path, dtypes: dict[str, np.dtype]):
        self.folder, self.dtypes = folder, dtypes
        self.tmp = folder.with_name(f".tmp-{folder.name}-{socket.gethostname()}-{os.getpid()}")
        self.files = {}
        try:
            with _writing(self.tmp):
                self.tmp.mkdir(parents=True)
                for name in self.dtypes:
                    self.files[name] = open(self.tmp / f"{name}.bin", "wb")
        except OSError:
            self.abort()
            raise
        self.sums = {name: cache.BlockSums() for name in self.dtypes}
        self.lengths, self.totals = Counter(), Counter()

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        for name, a in arrays.items():
            if name in ("token_end", "target_end", "seq_end"):
                a = a + self.totals[name]  # ends relative to the piece -> over the file
            data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
            with _writing(self.tmp / f"{name}.bin"):
                self.files[name].write(data)
            self.sums[name].update(data)
            self.lengths[name] += len(a)
        for name in ("token_end", "target_end", "seq_end"):
            if len(arrays[name]):
                self.totals[name] = int(arrays[name][-1]) + self.totals[name]

    def finish(self, key: str, parts: dict, source: str, files: list[Path], report: Counter) -> Path:
        for name, f in self.files.items():
            with _writing(self.tmp / f"{name}.bin"):
                f.flush()
                os.fsync(f.fileno())
                f.close()
        sums, blocks = [], {}
        for name in self.dtypes:
            mine = self.sums[name].finish()
            blocks[name] = [len(sums), len(mine)]
            sums += mine
        raw = np.asarray(sums, dtype="<u4").tobytes()
        arrays = {name: [str(dt), self.lengths[name]] for name, dt in self.dtypes.items()}
        manifest = dict(version=cache.VERSION, key=key, parts=parts, source=source, report=dict(report))
        manifest.update(files=[file_id(f) for f in files], arrays=arrays, blocks=blocks)
        manifest.update(block_bytes=cache.BLOCK_BYTES, checksums_sha256=hashlib.sha256(raw).hexdigest())
        manifest["manifest_sha256"] = cache.manifest_digest(manifest)
        with _writing(self.tmp / cache.CHECKSUMS):
            with open(self.tmp / cache.CHECKSUMS, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
        with _writing(self.tmp / "manifest.json"):
            write_json(self.tmp / "manifest.json", manifest)
        try:
            os.rename(self.tmp, self.folder)
        except OSError:  # another process finished the same cache first: keep theirs
            if cache.cache_problem(self.folder, key) is not None:
                raise
            shutil.rmtree(self.tmp)
        fd = os.open(self.folder.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.folder

    def abort(self) -> None:
        for f in self.files.values():
            try:
                f.close()  # flushes: on a full disk, fails again
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _remove_dead_temporaries(root: Path, verbose: bool) -> None:
    """Temporary folders that this host's killed runs left behind (their process is gone)."""
    host = socket.gethostname()
    for tmp in root.glob(f".tmp-*-{host}-*"):
        pid = int(tmp.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
            continue  # still being written
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        if verbose:
            print(f"removed {tmp}: a cache left unfinished by a killed run", flush=True)


def prepare(
    path,
    opts: EncodeOptions,
    chat: ChatFormat,
    cache_root=None,
    num_workers: int = 0,
    verbose: bool = True,
    fingerprints: dict[str, str] | None = None,
):
    """-> the cache folder of `path` encoded with `opts`, built now if missing.

    fingerprints: filled with {data file (resolved absolute path): content sha256}, the hashes the
    key was made of (each file read once for them; a build checks the bytes it tokenizes against them)."""
    files = data_files(path)
    root = Path(cache_root) if cache_root else default_root(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the tokenized cache folder {root} ({e}); set data.cache_dir") from None
    key, parts = cache.cache_key(files, opts, chat)
    digests = cache.fingerprints(files, parts)
    if fingerprints is not None:
        fingerprints.update(digests)
    name = Path(str(path).rstrip("/")).name.replace("*", "_").replace("?", "_")
    folder = root / f"{name}-{key[:16]}"
    problem = cache.cache_problem(folder, key)
    if problem is None:
        return folder
    if folder.exists():  # only ever renamed into place complete: something else changed it since
        raise ValueError(f"tokenized cache {folder} is damaged ({problem}); delete the folder to rebuild it")
    if not os.access(root, os.W_OK):  # a read-only folder serves caches built before, builds none
        raise OSError(f"the tokenized cache folder {root} is not writable; set data.cache_dir")
    _remove_dead_temporaries(root, verbose)
    pieces = chunks(path, CHUNK_RECORDS, digests=dict(digests))  # fails on a file changed since hashed
    head = list(itertools.islice(pieces, 2))
    workers = worker_count(num_workers) if len(head) > 1 else 1  # one chunk: not worth starting processes
    if verbose:
        print(f"{path}: tokenizing into {folder} ({workers} process{'es' if workers > 1 else ''})", flush=True)
    t0 = time.perf_counter()
    writer, report = Writer(folder, cache.fields(opts, chat.tokenizer.vocab_size)), Counter()
    try:
        for encoded, counts in _encoded(itertools.chain(head, pieces), opts, chat, workers):
            for arrays in encoded:
                writer.add(arrays)
            report.update(counts)
        report["examples"] = writer.lengths["token_end"]
        folder = writer.finish(key, parts, str(path), files, report)
    except BaseException:
        writer.abort()
        raise
    if verbose:
        tokens = writer.lengths["tokens"]
        print(f"{path}: {tokens} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def encode_options(dc, kind: str, seed: int, **encode_kw) -> EncodeOptions:
    """A config's data section (llama_posttrain/train/config.py DataSection) -> EncodeOptions; encode_kw: the entry
    point's own (train_on_prompt, one_row)."""
    return EncodeOptions(kind, dc.max_len, dc.overlength, dc.skip_invalid, dc.keep_strengths, seed, **encode_kw)


@dataclass
class Prepared:
    """A data path's cache folder and the content sha256 of each of its files (resolved path -> hex)."""

    folder: Path
    fingerprints: dict[str, str] = field(default_factory=dict)

    def open(self) -> cache.TokenizedData:
        return cache.TokenizedData(self.folder, fingerprints=self.fingerprints)


def prepare_config(dc, kind: str, chat: ChatFormat, verbose: bool = True, **encode_kw):
    """-> (a Prepared for each data.train source, for data.eval or None), built where missing. The
    eval set's RM responses are shuffled with seed + 1, as in the in-memory path."""

    def one(path, opts):
        digests = {}
        return Prepared(prepare(path, opts, chat, dc.cache_dir, dc.num_workers, verbose, digests), digests)

    train = encode_options(dc, kind, dc.seed, **encode_kw)
    parts = [one(path, train) for path, _ in train_sources(dc.train)]
    evaluation = one(dc.eval, encode_options(dc, kind, dc.seed + 1, **encode_kw)) if dc.eval else None
    return parts, evaluation


def on_rank0(fn, rank: int, world_size: int, what: str = "prepare the data"):
    """fn() on rank 0 while the other ranks wait; every rank gets its result, or raises its error.

    The wait is a broadcast on a gloo group with a one-day timeout: tokenizing a large set takes
    longer than NCCL's default collective timeout. Without a process group (tests, a plain `python`
    run) every caller runs fn itself: the caches are written atomically, so that is only slower."""
    if world_size == 1:  # (before importing torch: a process that only loads data has none)
        return fn()
    import torch.distributed as dist

    if not dist.is_initialized():
        return fn()
    from datetime import timedelta

    group = dist.new_group(backend="gloo", timeout=timedelta(days=1))
    message, error = [None], None
    if rank == 0:
        try:
            message[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 -- sent to the other ranks, then raised here
            error, message[0] = e, ("error", f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(message, src=0, group=group)
    dist.destroy_process_group(group)
    if error is not None:
        raise error
    status, value = message[0]
    if status == "error":
        raise ValueError(f"rank 0 could not {what}: {value}")
    return value
