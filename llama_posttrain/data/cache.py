"""The tokenized cache: a data path's encoded examples as flat arrays on disk, memory-mapped.

Raw numpy arrays, one file per field, plus per-example offsets (the layout of Megatron's .bin/.idx),
rather than Arrow: numpy is a core dependency and pyarrow an optional one; an example is a slice of
each array (O(1), zero-copy), and packing needs only the per-example arrays, which are a few bytes
per example. A rank touches only the pages of the examples it packs; the rest stays on disk.

A cache folder `<root>/<name>-<key[:16]>/` holds
    manifest.json   written last: the key and its parts, the data files it was built from, each
                    array's dtype and length, the load report, the sha256 of checksums.bin, and its
                    own sha256 (of the rest of it)
    checksums.bin   a crc32 of every 64 KiB block of every array file (uint32, 1/16384 of the cache)
    <field>.bin     one little-endian array per field:
      per token      tokens int32, positions uint16 (int32 if max_len > 65535), branch uint8,
                     docs uint8 (only for preference data in separate rows, one_row=false)
      per target     target_hidden_index uint16|int32, target_token int32, target_seq uint8, target_format bool
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
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

from llama_posttrain.data.records import file_id, sha256_file
from llama_posttrain.data.rows import EncodeOptions, Example, Seq, Target

VERSION = 3  # 3: target_parent -> target_hidden_index, num_best -> num_chosen_targets
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


def fields(opts: EncodeOptions) -> dict[str, np.dtype]:
    """Field -> dtype of a cache built with these options."""
    idx = index_dtype(opts.max_len)
    out = dict(tokens=np.int32, positions=idx, branch=np.uint8)
    if opts.kind != "sft" and not opts.one_row:
        out["docs"] = np.uint8
    out.update(target_hidden_index=idx, target_token=np.int32, target_seq=np.uint8, target_format=np.bool_)
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
    example), the tokens memory-mapped; `data[i]` is the same Example the in-memory path builds,
    its blocks checked against their crc32 the first time this process reads them.

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
        self.arrays, self._sums, self._ok = {}, {}, {}
        for name, (dt, n) in manifest["arrays"].items():
            self.arrays[name] = _map(self.folder / f"{name}.bin", np.dtype(dt), n)
            first, count = manifest["blocks"][name]
            self._sums[name] = checksums[first : first + count]
            self._ok[name] = np.zeros(count, dtype=bool)
        for name in PER_EXAMPLE:  # read whole below: checked whole now
            self._check(name, 0, len(self.arrays[name]))
        ends = {k: np.asarray(self.arrays[k]) for k in ("token_end", "target_end", "seq_end")}
        self.offsets = {k: np.concatenate([[0], v]).astype(np.int64) for k, v in ends.items()}
        self.lengths = np.diff(self.offsets["token_end"])
        self.num_targets = np.diff(self.offsets["target_end"])
        seqs = np.diff(self.offsets["seq_end"])
        self.num_pairs = seqs * (seqs - 1) // 2
        self.num_chosen_targets = np.asarray(self.arrays["num_chosen_targets"], dtype=np.int64)

    def _check(self, name: str, start: int, stop: int) -> None:
        """Elements [start, stop) of an array: each of their blocks not checked yet against its crc32."""
        if stop <= start:
            return
        size = self.arrays[name].dtype.itemsize
        first, last = start * size // BLOCK_BYTES, ((stop * size) - 1) // BLOCK_BYTES + 1
        ok = self._ok[name]
        if ok[first:last].all():
            return
        raw = self.arrays[name].view(np.uint8)
        for b in range(first, last):
            if ok[b]:
                continue
            lo, hi = b * BLOCK_BYTES, min((b + 1) * BLOCK_BYTES, len(raw))
            if zlib.crc32(raw[lo:hi]) != int(self._sums[name][b]):
                raise CacheDamaged(
                    f"tokenized cache {self.folder} is damaged: {name}.bin bytes {lo}..{hi} do not match "
                    f"their checksum in {CHECKSUMS}; delete the folder to rebuild it"
                )
            ok[b] = True

    def verify(self) -> None:
        """Check every block of every array (CacheDamaged on the first mismatch)."""
        for name, a in self.arrays.items():
            self._check(name, 0, len(a))

    def __len__(self) -> int:
        return len(self.lengths)

    def _slice(self, name: str, offsets: str, i: int) -> list:
        o = self.offsets[offsets]
        self._check(name, int(o[i]), int(o[i + 1]))
        return self.arrays[name][o[i] : o[i + 1]].tolist()

    def __getitem__(self, i: int) -> Example:
        a, tok, tgt, seq = self.arrays, "token_end", "target_end", "seq_end"
        targets = zip(*(self._slice(f"target_{f}", tgt, i) for f in ("hidden_index", "token", "seq", "format")))
        seqs = zip(self._slice("seq_score", seq, i), self._slice("seq_rank", seq, i))
        return Example(
            tokens=self._slice("tokens", tok, i),
            positions=self._slice("positions", tok, i),
            branch=self._slice("branch", tok, i),
            targets=list(map(Target._make, targets)),
            seqs=list(map(Seq._make, seqs)),
            strength=int(a["strength"][i]),
            uid=i,
            docs=self._slice("docs", tok, i) if "docs" in a else None,
        )


def _map(path: Path, dtype: np.dtype, n: int) -> np.ndarray:
    if n == 0:  # numpy cannot map an empty file
        return np.empty(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n,))
