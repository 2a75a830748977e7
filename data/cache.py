"""The tokenized cache: a data path's encoded examples as flat arrays on disk, memory-mapped.

Raw numpy arrays, one file per field, plus per-example offsets (the layout of Megatron's .bin/.idx),
rather than Arrow: numpy is a core dependency and pyarrow an optional one; an example is a slice of
each array (O(1), zero-copy), and packing needs only the per-example arrays, which are a few bytes
per example. A rank touches only the pages of the examples it packs; the rest stays on disk.

A cache folder `<root>/<name>-<key[:16]>/` holds
    manifest.json   written last: the key and its parts, each array's dtype and length, the load report
    <field>.bin     one little-endian array per field:
      per token      tokens int32, positions uint16 (int32 if max_len > 65535), branch uint8,
                     docs uint8 (only for preference data in separate rows, one_row=false)
      per target     target_parent uint16|int32, target_token int32, target_seq uint8, target_format bool
      per sequence   seq_score uint16|int32, seq_rank uint8
      per example    token_end, target_end, seq_end int64 (running totals), strength int8,
                     num_best int32 (targets of the best sequence: the DPO chosen tokens)
The key hashes the data files' contents, the tokenizer file, the chat format's settings (template),
the encoding code (data/records.py,
data/rows.py, data/schema.py, llama/chat.py, llama/tokenizer.py, this file, data/prepare.py) and the
EncodeOptions, so a change to any of them is a new folder. A folder appears only complete: it is
written under a temporary name and renamed into place (data/prepare.py); a folder whose manifest or
array sizes do not match is refused, never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from data.rows import EncodeOptions, Example, Seq, Target

VERSION = 1
REPO = Path(__file__).resolve().parent.parent
CODE = ["data/records.py", "data/rows.py", "data/schema.py", "data/cache.py", "data/prepare.py"]
CODE += ["llama/chat.py", "llama/tokenizer.py"]
PER_EXAMPLE = ("token_end", "target_end", "seq_end", "strength", "num_best")


def index_dtype(max_len: int):
    """Positions and in-example indices are < max_len."""
    return np.uint16 if max_len <= np.iinfo(np.uint16).max + 1 else np.int32


def fields(opts: EncodeOptions) -> dict[str, np.dtype]:
    """Field -> dtype of a cache built with these options."""
    idx = index_dtype(opts.max_len)
    out = dict(tokens=np.int32, positions=idx, branch=np.uint8)
    if opts.kind != "sft" and not opts.one_row:
        out["docs"] = np.uint8
    out.update(target_parent=idx, target_token=np.int32, target_seq=np.uint8, target_format=np.bool_)
    out.update(seq_score=idx, seq_rank=np.uint8)
    out.update(token_end=np.int64, target_end=np.int64, seq_end=np.int64, strength=np.int8, num_best=np.int32)
    return {k: np.dtype(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- the key


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path, memo_dir: Path) -> str:
    """sha256 of a file's content, remembered in memo_dir against its (path, size, mtime): a second
    start only stats the file. A file is read again whenever its size or modification time changes."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [str(path), st.st_size, st.st_mtime_ns]
    memo = Path(memo_dir) / f".digest-{hashlib.sha256(str(path).encode()).hexdigest()[:16]}.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = _sha256_file(path)
    try:
        write_json(memo, {"stamp": stamp, "sha256": digest})
    except OSError as e:  # a read-only cache folder: slower, not wrong
        print(f"note: cannot remember the digest of {path} ({e}); it is read again at every start", flush=True)
    return digest


def code_digest() -> str:
    h = hashlib.sha256()
    for name in CODE:
        h.update(name.encode() + b"\0" + (REPO / name).read_bytes())
    return h.hexdigest()


def chat_digest(chat) -> dict:
    """The tokenizer file's content and kind, and the chat format's settings (template, date, ...)."""
    path = getattr(chat.tokenizer, "path", None)
    if path is None or not Path(path).is_file():
        raise ValueError(f"the tokenized cache needs a tokenizer loaded from a file; {chat.tokenizer!r} has none")
    settings = {k: repr(v) for k, v in sorted(vars(chat).items()) if k != "tokenizer"}
    return {"tokenizer": f"{type(chat.tokenizer).__name__}:{_sha256_file(Path(path))}", "chat": settings}


def cache_key(files: list[Path], opts: EncodeOptions, chat, memo_dir: Path) -> tuple[str, dict]:
    """-> (hex key, its parts)."""
    parts = {
        "version": VERSION,
        "data": [file_digest(f, memo_dir) for f in files],
        **chat_digest(chat),
        "code": code_digest(),
        "options": opts.key(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- reading


def cache_problem(folder: Path, key: str) -> str | None:
    """Why `folder` is not a complete cache with this key (None: it is)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except FileNotFoundError:
        return "no manifest.json"
    except (OSError, ValueError) as e:
        return f"manifest.json unreadable ({e})"
    if manifest.get("key") != key:
        return f"its key {manifest.get('key')!r} is not {key!r}"
    for name, (dtype, length) in manifest["arrays"].items():
        path = folder / f"{name}.bin"
        expected = np.dtype(dtype).itemsize * length
        if not path.is_file() or path.stat().st_size != expected:
            return f"{name}.bin has {path.stat().st_size if path.is_file() else 'no'} bytes, expected {expected}"
    return None


class TokenizedData:
    """A cache folder, read-only: `lengths` and the per-example counts in memory (a few bytes per
    example), the tokens memory-mapped; `data[i]` is the same Example the in-memory path builds."""

    def __init__(self, folder, key: str | None = None):
        self.folder = Path(folder)
        manifest = json.loads((self.folder / "manifest.json").read_text())
        problem = cache_problem(self.folder, key or manifest.get("key"))
        if problem:
            raise ValueError(f"tokenized cache {self.folder} is damaged or stale: {problem}; delete the folder")
        self.report = Counter(manifest["report"])
        self.source = manifest["source"]
        self.arrays = {
            name: _map(self.folder / f"{name}.bin", np.dtype(dt), n) for name, (dt, n) in manifest["arrays"].items()
        }
        ends = {k: np.asarray(self.arrays[k]) for k in ("token_end", "target_end", "seq_end")}
        self.offsets = {k: np.concatenate([[0], v]).astype(np.int64) for k, v in ends.items()}
        self.lengths = np.diff(self.offsets["token_end"])
        self.num_targets = np.diff(self.offsets["target_end"])
        seqs = np.diff(self.offsets["seq_end"])
        self.num_pairs = seqs * (seqs - 1) // 2
        self.num_best = np.asarray(self.arrays["num_best"], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def _slice(self, name: str, offsets: str, i: int) -> list:
        o = self.offsets[offsets]
        return self.arrays[name][o[i] : o[i + 1]].tolist()

    def __getitem__(self, i: int) -> Example:
        a, tok, tgt, seq = self.arrays, "token_end", "target_end", "seq_end"
        targets = zip(*(self._slice(f"target_{f}", tgt, i) for f in ("parent", "token", "seq", "format")))
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
