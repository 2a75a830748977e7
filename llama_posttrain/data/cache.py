"""The tokenized cache: a data path's encoded examples as flat arrays on disk, read a slice at a time.

Raw numpy arrays, one file per field, plus per-example offsets (the layout of Megatron's .bin/.idx),
rather than Arrow: numpy is a core dependency and pyarrow an optional one; an example is a slice of
each array (O(1), one pread per field), and packing needs only the per-example arrays, which are a
few bytes per example. A rank reads only the examples it packs. The files are read with pread, not
memory-mapped: a mapped page stays in the process's resident set once touched, so a pass over the
data would end with the whole cache resident; read, a page lives only in the kernel's page cache
(shared, reclaimable) and the process holds the few examples of its step.

A cache folder `<root>/<name>-<key[:16]>/` holds
    manifest.json   written last: the key and its parts, the data files it was built from, each
                    array's dtype and length, the load report, the sha256 of checksums.bin, and its
                    own sha256 (of the rest of it)
    checksums.bin   a crc32 of every 64 KiB block of every array file (uint32, 1/16384 of the cache)
    <field>.bin     one little-endian array per field:
      per token      tokens uint16 (uint32 if the vocabulary has more than 65536 ids, as Llama 3's 128256),
                     positions uint16 (int32 if max_len > 65535), branch uint8,
                     docs uint8 (only for preference data in separate rows, one_row=false)
      per target     target_hidden_index uint16|int32, target_token as tokens, target_seq uint8, target_format bool
      per sequence   seq_score uint16|int32, seq_rank uint8
      per example    token_end, target_end, seq_end int64 (running totals), strength int8,
                     num_chosen_targets int32 (targets of the best sequence, rank 0: DPO's chosen tokens)
The key hashes the data files' contents (read whole at every start, sha256: no size/mtime shortcut,
which an edit that keeps both would fool), the tokenizer file, the chat format's settings (template),
the encoding code (llama_posttrain/data/records.py, llama_posttrain/data/rows.py, llama_posttrain/data/schema.py, llama_posttrain/llama/chat.py, llama_posttrain/llama/tokenizer.py,
this file, llama_posttrain/data/prepare.py) and the EncodeOptions, so a change to any of them is a new folder. A build
checks that the data it tokenized is the data the key hashed (llama_posttrain/data/records.py `chunks`), else it
fails and writes nothing. A folder appears only complete: it is written under a temporary name and
renamed into place (llama_posttrain/data/prepare.py).

What is verified, and when:
- at every open (`cache_problem`, `TokenizedData`: every rank, every start): the manifest (readable,
  every key present, its own sha256), its key against the key computed from the data and code, every
  array file's size, checksums.bin's sha256, and every block of the per-example arrays (read whole
  into memory anyway: ~30 bytes per example);
- lazily, by the process that reads them: the blocks of the per-token, per-target and per-sequence
  arrays an example spans, the first time one of its examples is read (`data[i]`), before any value
  is used. A rank reads only its share of each step, so it checks only that; over an epoch a rank
  checks about every block once (crc32, ~2 GB/s on one core).
- not verified: blocks no example of this process has read yet (nothing was trained on them), and
  a block changed on disk after this process checked it (the cache is never written once renamed
  into place). `TokenizedData.verify()` (`python -m llama_posttrain.data.prepare ... --verify`) checks every block.
A mismatch is a ValueError naming the folder, file and byte range: delete the folder to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from llama_posttrain.data.records import file_id, sha256_file
from llama_posttrain.data.rows import EncodeOptions, Example, Seq, Target

VERSION = 4  # 3: target_parent -> target_hidden_index, num_best -> num_chosen_targets; 4: token ids uint16|uint32
PACKAGE = Path(__file__).resolve().parents[1]  # llama_posttrain/: CODE names are relative to it
CODE = ["data/records.py", "data/rows.py", "data/schema.py", "data/cache.py", "data/prepare.py"]
CODE += ["llama/chat.py", "llama/tokenizer.py"]
PER_EXAMPLE = ("token_end", "target_end", "seq_end", "strength", "num_chosen_targets")
REQUIRED = ("tokens", "positions", "branch", "target_hidden_index", "target_token", "target_seq", "target_format")
REQUIRED += ("seq_score", "seq_rank", *PER_EXAMPLE)
BLOCK_BYTES = 1 << 16  # one crc32 per 64 KiB of an array file
CHECKSUMS = "checksums.bin"


def index_dtype(max_len: int):
    """Positions and in-example indices are < max_len."""
    return np.uint16 if max_len <= np.iinfo(np.uint16).max + 1 else np.int32


def token_dtype(vocab_size: int):
    """Token ids are < vocab_size: 2 bytes up to 65536 ids (the byte tokenizer's 512), else 4 (Llama 3's 128256)."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def fields(opts: EncodeOptions, vocab_size: int) -> dict[str, np.dtype]:
    """Field -> dtype of a cache built with these options and a tokenizer of `vocab_size` ids."""
    idx, tok = index_dtype(opts.max_len), token_dtype(vocab_size)
    out = dict(tokens=tok, positions=idx, branch=np.uint8)
    if opts.kind != "sft" and not opts.one_row:
        out["docs"] = np.uint8
    out.update(target_hidden_index=idx, target_token=tok, target_seq=np.uint8, target_format=np.bool_)
    out.update(seq_score=idx, seq_rank=np.uint8)
    out.update(token_end=np.int64, target_end=np.int64, seq_end=np.int64, strength=np.int8, num_chosen_targets=np.int32)
    return {k: np.dtype(v) for k, v in out.items()}


class BlockSums:
    """crc32 of every BLOCK_BYTES block of a byte stream written piece by piece."""

    def __init__(self):
        self.sums: list[int] = []
        self.pending = b""

    def update(self, data: bytes) -> None:
        data = self.pending + data if self.pending else data
        view, whole = memoryview(data), len(data) - len(data) % BLOCK_BYTES
        self.sums += [zlib.crc32(view[i : i + BLOCK_BYTES]) for i in range(0, whole, BLOCK_BYTES)]
        self.pending = bytes(view[whole:])

    def finish(self) -> list[int]:
        if self.pending:
            self.sums.append(zlib.crc32(self.pending))
            self.pending = b""
        return self.sums


# ----------------------------------------------------------------------------- the key


def code_digest() -> str:
    h = hashlib.sha256()
    for name in CODE:
        h.update(name.encode() + b"\0" + (PACKAGE / name).read_bytes())
    return h.hexdigest()


def chat_digest(chat) -> dict:
    """The tokenizer file's content and kind, and the chat format's settings (template, date, ...)."""
    path = getattr(chat.tokenizer, "path", None)
    if path is None or not Path(path).is_file():
        raise ValueError(f"the tokenized cache needs a tokenizer loaded from a file; {chat.tokenizer!r} has none")
    settings = {k: repr(v) for k, v in sorted(vars(chat).items()) if k != "tokenizer"}
    return {"tokenizer": f"{type(chat.tokenizer).__name__}:{sha256_file(Path(path))}", "chat": settings}


def cache_key(files: list[Path], opts: EncodeOptions, chat) -> tuple[str, dict]:
    """-> (hex key, its parts); parts["data"]: each file's content sha256, in the order of `files`,
    read whole now (the data fingerprints: `fingerprints(files, parts)`)."""
    parts = {
        "version": VERSION,
        "data": [sha256_file(f) for f in files],
        **chat_digest(chat),
        "code": code_digest(),
        "options": opts.key(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def fingerprints(files: list[Path], parts: dict) -> dict[str, str]:
    """{resolved absolute path: content sha256} of the data files a key hashed."""
    return {file_id(f): digest for f, digest in zip(files, parts["data"])}


# ----------------------------------------------------------------------------- reading


class CacheDamaged(ValueError):
    pass


def manifest_digest(manifest: dict) -> str:
    """sha256 of a manifest without its own `manifest_sha256`."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _expect(manifest: dict, name: str, kind: type):
    if name not in manifest:
        raise CacheDamaged(f"manifest.json lacks {name!r}")
    if not isinstance(manifest[name], kind):
        raise CacheDamaged(f"manifest.json: {name!r} is not a {kind.__name__}")
    return manifest[name]


def read_manifest(folder: Path, key: str | None = None) -> tuple[dict, np.ndarray]:
    """-> (manifest, checksums) of a complete cache with this key (None: any key); else CacheDamaged
    saying why. Checks what every open checks (see the module docstring), not the array blocks."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        raise CacheDamaged("no manifest.json") from None
    except (OSError, ValueError) as e:
        raise CacheDamaged(f"manifest.json unreadable ({e})") from None
    if not isinstance(manifest, dict):
        raise CacheDamaged("manifest.json is not a JSON object")
    if _expect(manifest, "version", int) != VERSION:
        raise CacheDamaged(f"manifest.json: version {manifest['version']}, this code reads version {VERSION}")
    for name, kind in (("key", str), ("parts", dict), ("source", str), ("files", list), ("report", dict)):
        _expect(manifest, name, kind)
    arrays, blocks = _expect(manifest, "arrays", dict), _expect(manifest, "blocks", dict)
    _expect(manifest, "block_bytes", int), _expect(manifest, "checksums_sha256", str)
    if _expect(manifest, "manifest_sha256", str) != manifest_digest(manifest):
        raise CacheDamaged("manifest.json does not match its own checksum (edited or damaged)")
    if key is not None and manifest["key"] != key:
        raise CacheDamaged(f"its key {manifest['key']!r} is not {key!r}")
    if manifest["block_bytes"] != BLOCK_BYTES:
        raise CacheDamaged(f"manifest.json: block_bytes {manifest['block_bytes']}, expected {BLOCK_BYTES}")
    missing = [name for name in REQUIRED if name not in arrays]
    if missing:
        raise CacheDamaged(f"manifest.json: arrays lacks {', '.join(missing)}")
    path = folder / CHECKSUMS
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CacheDamaged(f"{CHECKSUMS} unreadable ({e.strerror or e})") from None
    if hashlib.sha256(raw).hexdigest() != manifest["checksums_sha256"]:
        raise CacheDamaged(f"{CHECKSUMS} does not match the sha256 in manifest.json")
    checksums = np.frombuffer(raw, dtype="<u4")
    for name, entry in arrays.items():
        try:
            dtype, length = np.dtype(entry[0]), int(entry[1])
            first, count = map(int, blocks[name])
        except (KeyError, TypeError, ValueError, IndexError):
            raise CacheDamaged(f"manifest.json: arrays / blocks entry of {name!r} missing or malformed") from None
        path = folder / f"{name}.bin"
        expected = dtype.itemsize * length
        size = path.stat().st_size if path.is_file() else None
        if size != expected:
            raise CacheDamaged(f"{name}.bin has {'no' if size is None else size} bytes, expected {expected}")
        if count != -(-expected // BLOCK_BYTES) or first < 0 or first + count > len(checksums):
            raise CacheDamaged(f"manifest.json: blocks of {name} do not match its size")
    return manifest, checksums


def cache_problem(folder: Path, key: str) -> str | None:
    """Why `folder` is not a complete cache with this key (None: it is)."""
    try:
        read_manifest(folder, key)
    except CacheDamaged as e:
        return str(e)
    return None


def report_line(data) -> str:
    """A cache's load report as the loader prints it."""
    return f"{data.source}: " + ", ".join(f"{k} {v}" for k, v in data.report.items()) + f" [{data.folder}]"


class TokenizedData:
    """A cache folder, read-only: `lengths` and the per-example counts in memory (a few bytes per
    example), the other arrays read from their files a slice at a time (pread); `data[i]` is the same
    Example the in-memory path builds, its blocks checked against their crc32 the first time this
    process reads them.

    fingerprints: {data file: content sha256} of the data it was built from (by default the paths
    recorded at build; the loader passes the files as found now)."""

    def __init__(self, folder, key: str | None = None, fingerprints: dict[str, str] | None = None):
        self.folder = Path(folder)
        try:
            manifest, checksums = read_manifest(self.folder, key)
        except CacheDamaged as e:
            raise CacheDamaged(f"tokenized cache {self.folder} is damaged or stale: {e}; delete the folder") from None
        self.report = Counter(manifest["report"])
        self.source = manifest["source"]
        self.fingerprints = fingerprints or dict(zip(manifest["files"], manifest["parts"].get("data", [])))
        self.dtypes, self.sizes, self._sums, self._ok, self._fds = {}, {}, {}, {}, {}
        # the files stay open (as a mapping did): a folder deleted or replaced meanwhile is read as it was opened
        weakref.finalize(self, _close, self._fds)
        for name, (dt, n) in manifest["arrays"].items():
            self.dtypes[name], self.sizes[name] = np.dtype(dt).newbyteorder("<"), int(n)
            self._fds[name] = os.open(self.folder / f"{name}.bin", os.O_RDONLY)
            first, count = manifest["blocks"][name]
            self._sums[name] = checksums[first : first + count]
            self._ok[name] = np.zeros(count, dtype=bool)
        ends = {k: self._read(k, 0, self.sizes[k]) for k in ("token_end", "target_end", "seq_end")}
        self.offsets = {k: np.concatenate([[0], v]).astype(np.int64, copy=False) for k, v in ends.items()}
        # the counts in 4 bytes (an example's tokens <= max_len, its pairs < 255**2), summed into int64
        # by the loader: with the offsets, 41 bytes per example
        self.lengths = np.diff(self.offsets["token_end"]).astype(np.int32)
        self.num_targets = np.diff(self.offsets["target_end"]).astype(np.int32)
        seqs = np.diff(self.offsets["seq_end"]).astype(np.int32)
        self.num_pairs = seqs * (seqs - 1) // 2
        self.num_chosen_targets = self._read("num_chosen_targets", 0, self.sizes["num_chosen_targets"])  # int32
        self.strength = self._read("strength", 0, self.sizes["strength"])

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) of an array, read from its file; the blocks they span that this
        process has not checked yet are read whole and checked against their crc32 first."""
        dtype = self.dtypes[name]
        lo, hi = start * dtype.itemsize, stop * dtype.itemsize
        if hi <= lo:
            return np.empty(0, dtype)
        first, last = lo // BLOCK_BYTES, (hi - 1) // BLOCK_BYTES + 1
        ok = self._ok[name]
        if ok[first:last].all():
            return np.frombuffer(self._pread(name, lo, hi), dtype)
        base = first * BLOCK_BYTES
        raw = memoryview(self._pread(name, base, min(last * BLOCK_BYTES, self.sizes[name] * dtype.itemsize)))
        for b in range(first, last):
            if ok[b]:
                continue
            block = raw[(b - first) * BLOCK_BYTES : (b - first + 1) * BLOCK_BYTES]
            if zlib.crc32(block) != int(self._sums[name][b]):
                raise CacheDamaged(
                    f"tokenized cache {self.folder} is damaged: {name}.bin bytes {b * BLOCK_BYTES}.."
                    f"{b * BLOCK_BYTES + len(block)} do not match their checksum in {CHECKSUMS}; delete the folder "
                    "to rebuild it"
                )
            ok[b] = True
        return np.frombuffer(raw[lo - base : hi - base], dtype)

    def _pread(self, name: str, lo: int, hi: int) -> bytes:
        raw = os.pread(self._fds[name], hi - lo, lo)
        if len(raw) != hi - lo:  # its size was checked at open: it shrank since
            raise CacheDamaged(
                f"tokenized cache {self.folder} is damaged: {name}.bin ends at byte {lo + len(raw)}, "
                f"bytes {lo}..{hi} were expected; delete the folder to rebuild it"
            )
        return raw

    def verify(self) -> None:
        """Check every block of every array (CacheDamaged on the first mismatch), 16 MiB at a time."""
        for name, n in self.sizes.items():
            step = max(1, (BLOCK_BYTES << 8) // self.dtypes[name].itemsize)
            for start in range(0, n, step):
                self._read(name, start, min(n, start + step))

    def __len__(self) -> int:
        return len(self.lengths)

    def _slice(self, name: str, offsets: str, i: int) -> list:
        o = self.offsets[offsets]
        return self._read(name, int(o[i]), int(o[i + 1])).tolist()

    def __getitem__(self, i: int) -> Example:
        tok, tgt, seq = "token_end", "target_end", "seq_end"
        targets = zip(*(self._slice(f"target_{f}", tgt, i) for f in ("hidden_index", "token", "seq", "format")))
        seqs = zip(self._slice("seq_score", seq, i), self._slice("seq_rank", seq, i))
        return Example(
            tokens=self._slice("tokens", tok, i),
            positions=self._slice("positions", tok, i),
            branch=self._slice("branch", tok, i),
            targets=list(map(Target._make, targets)),
            seqs=list(map(Seq._make, seqs)),
            strength=int(self.strength[i]),
            uid=i,
            docs=self._slice("docs", tok, i) if "docs" in self.dtypes else None,
        )


def _close(fds: dict[str, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()
