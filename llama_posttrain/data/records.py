"""Reading records from data files: JSONL, Parquet, Arrow (Hugging Face `datasets` folders).

A data path is one of
- a .jsonl file (any other suffix is read as JSON lines too), a .parquet or an .arrow file;
- a folder of .parquet shards, read in name order (what the hub holds: `data/train-0000x-of-0000n.parquet`);
- a `datasets.Dataset.save_to_disk` folder (its state.json names the .arrow files, in order);
- a glob (`data/train-*.parquet`), its matches read in name order.
Parquet and Arrow need pyarrow (optional: `pip install pyarrow`).

`read_records(path)` yields (where, record), where = 'file:line' (JSONL) or 'file:row' (1-based). A
line that is not UTF-8 or not JSON comes as a ValidationError in place of its record, so that the
caller counts it (data.skip_invalid) or stops on it; blank lines are not records. A Parquet / Arrow row
is the object it stands for: every row has every column, null where the record has no value, so a null
field is left out (in nested structs too: a message's null `tool_calls`), as a missing JSON key.

`chunks(path, size)` cuts the same records into picklable pieces for tokenizer processes (raw lines,
or an Arrow batch in IPC bytes) and `chunk_records(chunk)` turns one back into records: read_records is
the two chained, so the in-memory and the cached paths read exactly the same records.

Content fingerprints (`digests`, the sha256 of each file): a JSON lines file is hashed from the very
bytes its records are read from, as they are read; a Parquet / Arrow file (read by pyarrow, not in
order) is hashed before and after its records are read. A file whose content differs from the
digest it was given (its hash before the read) is an error naming it: it changed while it was read.
"""

from __future__ import annotations

import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from llama_posttrain.data.schema import ValidationError

GLOB_CHARS = "*?["


def data_files(path) -> list[Path]:
    """The files behind a data path, in reading order. A path that exists is read as itself, even
    with glob characters in its name (`d[1].jsonl`); only a path that does not exist is a glob. A file
    that is another one of the list under another name (a symlink, a hard link) is read once, at its first
    place, and each such name is printed."""
    return _once(path, _files(path))


def _once(path, files: list[Path]) -> list[Path]:
    seen, out = {}, []
    for file in files:
        key = _identity(file)
        if key in seen:
            print(f"data path {path}: {file} is the same file as {seen[key]} (a link): read once", flush=True)
            continue
        seen[key] = file
        out.append(file)
    return out


def _identity(file: Path):
    try:
        st = file.stat()
        return st.st_dev, st.st_ino  # a symlink and a hard link both name the same inode
    except OSError:  # missing: the reader names it
        return str(file.resolve())


def _files(path) -> list[Path]:
    text = str(path)
    if any(c in text for c in GLOB_CHARS) and not Path(text).exists():
        files = [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file()]
        if not files:
            raise FileNotFoundError(f"no data files match {text} (and no file has that name)")
        return files
    path = Path(path)
    if path.is_dir():
        if (path / "state.json").is_file():  # datasets.Dataset.save_to_disk
            return _state_files(path / "state.json")
        if (path / "dataset_dict.json").is_file():  # datasets.DatasetDict.save_to_disk: one folder per split
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise IsADirectoryError(
                f"data file {path} is a datasets DatasetDict folder; give one split's folder: "
                + ", ".join(str(path / s) for s in splits)
            )
        shards = sorted(path.glob("*.parquet"))
        if shards:
            return shards
        raise IsADirectoryError(
            f"data file {path} is a directory (no .parquet shards in it, not a datasets save_to_disk folder); "
            "give a .jsonl or .parquet file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return [path]


def _state_files(state_path: Path) -> list[Path]:
    """The .arrow files a `datasets.Dataset.save_to_disk` folder's state.json names: plain file names
    in that folder (a name outside it is refused, as a safetensors index's are)."""
    try:
        state = json.loads(state_path.read_text())
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{state_path}: not a readable datasets state.json ({e})") from None
    except (KeyError, TypeError):
        raise ValueError(f"{state_path}: _data_files: missing, or not a list of {{filename: ...}}") from None
    bad = [n for n in names if not isinstance(n, str) or not n or Path(n).name != n or n in (".", "..")]
    if bad:
        raise ValueError(f"{state_path}: _data_files: names files outside its folder: {bad[:3]}")
    if not names:
        raise ValueError(f"{state_path}: _data_files: empty (no .arrow file named)")
    return [state_path.parent / n for n in names]


def sha256_file(path) -> str:
    """The sha256 hex of a file's content."""
    h, buf = hashlib.sha256(), bytearray(1 << 18)  # one 256 KiB buffer, read into: a fresh 8 MiB block per read
    view = memoryview(buf)  # held two blocks at once (the next read before the last was freed), 12 MiB of heap
    with open(path, "rb", buffering=0) as f:  # that stayed resident
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def file_id(path) -> str:
    """A data file's name in `digests` / fingerprints: its resolved absolute path."""
    return str(Path(path).resolve())


def _changed(file, before: str, after: str) -> ValueError:
    return ValueError(
        f"{file}: the file changed while it was read (its sha256 was {before[:16]}... before, "
        f"{after[:16]}... as read); nothing was kept from it: run again once it is complete"
    )


@dataclass
class Chunk:
    """Consecutive records of one file; `first` numbers its first record over the whole data path
    (the RM response shuffle is seeded by it)."""

    path: str
    first: int
    lines: list[tuple[int, bytes]] | None = None  # JSON lines: (line number, raw bytes)
    ipc: bytes | None = None  # Parquet / Arrow: the rows as an Arrow IPC stream
    row: int = 1  # the file's row number of the first row in `ipc`


def _blank(raw: bytes) -> bool:
    """Whether a line is whitespace only, as its decoded text would say (non-ASCII lines are decoded)."""
    if raw.isascii():
        return not raw.strip()
    try:
        return not raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


def _pyarrow(path):
    try:
        import pyarrow

        return pyarrow
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow (an optional dependency): pip install pyarrow") from None


def _arrow_batches(path: Path, size: int):
    """Batches of up to `size` rows; a file pyarrow cannot read (truncated, damaged, not Arrow) is a
    ValueError naming it and the rows read before the damage."""
    pa = _pyarrow(path)
    rows = 0
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            batches = pq.ParquetFile(path).iter_batches(batch_size=size)
        else:
            source = pa.memory_map(str(path))
            is_file_format = source.read(6) == b"ARROW1"  # datasets writes the stream format; accept both
            source.seek(0)
            reader = pa.ipc.open_file(source) if is_file_format else pa.ipc.open_stream(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if is_file_format else reader
        for batch in batches:
            for start in range(0, batch.num_rows, size):
                part = batch.slice(start, size)
                yield part
                rows += part.num_rows
    except (pa.ArrowException, OSError) as e:
        what = "Parquet" if path.suffix == ".parquet" else "Arrow"
        raise ValueError(
            f"{path}: truncated or damaged {what} file, unreadable after row {rows} ({type(e).__name__}: {e})"
        ) from None


def _ipc(batch) -> bytes:
    """A batch as IPC bytes: unlike pickling, this writes only a slice's own rows."""
    pa = _pyarrow("an Arrow batch")
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def chunks(path, size: int = 1024, digests: dict[str, str] | None = None):
    """Yield Chunks of up to `size` records of a data path, in order.

    digests: {file_id(file): sha256 hex}, checked and filled as the files are read. A file already
    in it must have that content as read (else ValueError: it changed since it was hashed, or while
    it was read); the others are added once read whole (a JSON lines file hashed from the bytes read,
    a Parquet / Arrow file hashed before and after, the two compared)."""
    digests = {} if digests is None else digests
    first = 0
    for file in data_files(path):
        name = file_id(file)
        if file.suffix in (".parquet", ".arrow"):
            before = digests.get(name) or sha256_file(file)
            row = 1
            for batch in _arrow_batches(file, size):
                if batch.num_rows:
                    yield Chunk(str(file), first, ipc=_ipc(batch), row=row)
                row, first = row + batch.num_rows, first + batch.num_rows
            after = sha256_file(file)
        else:
            lines, h = [], hashlib.sha256()
            with open(file, "rb") as f:  # bytes, decoded per record: a bad byte is one bad record, not a crash
                for lineno, raw in enumerate(f, 1):
                    h.update(raw)  # every byte of the file, blank lines included
                    if _blank(raw):
                        continue
                    lines.append((lineno, raw))
                    if len(lines) == size:
                        yield Chunk(str(file), first, lines=lines)
                        first, lines = first + len(lines), []
            after = h.hexdigest()
            before = digests.get(name, after)
            if lines and before == after:  # a file that changed: not one record of its last chunk given out
                yield Chunk(str(file), first, lines=lines)
                first += len(lines)
        if before != after:
            raise _changed(file, before, after)
        digests[name] = after


def chunk_records(chunk: Chunk):
    """Yield (where, record or ValidationError) for each record of a chunk."""
    if chunk.ipc is not None:
        pa = _pyarrow(chunk.path)
        rows = pa.ipc.open_stream(chunk.ipc).read_all().to_pylist()
        for i, obj in enumerate(rows, chunk.row):
            yield f"{chunk.path}:{i}", _without_nulls(obj)
        return
    for lineno, raw in chunk.lines:
        where = f"{chunk.path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = raw[e.start : e.start + 1].hex()
            yield where, ValidationError(f"{where}: encoding: not UTF-8 (byte 0x{bad} at byte {e.start + 1})")
            continue
        try:  # without its line end, so that an error's column is the line's (not column 1 of the next line)
            obj = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            yield where, ValidationError(f"{where}: json: malformed JSON ({e.msg} at column {e.colno})")
            continue
        yield where, obj


def _without_nulls(value):
    """An Arrow row as the record it stands for: struct fields (columns, a message's keys) that are null
    left out, as the keys a JSON record does not have. Items of a list are kept, null or not."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def read_records(path, digests: dict[str, str] | None = None):
    """Yield (where, record) from a data path; where = 'file:line' or 'file:row'. digests: as for
    `chunks` (filled with each file's sha256 once it is read whole)."""
    for chunk in chunks(path, digests=digests):
        yield from chunk_records(chunk)


def train_sources(value) -> list[tuple[str, float]]:
    """data.train -> [(path, weight)]: one data path (weight 1), or a mixture given as a list of
    {path: ..., weight: ...} (weight 1 when left out; a plain path in the list is weight 1 too).
    What a weight means: llama_posttrain/data/loader.py `epoch_examples`."""
    if isinstance(value, str):
        if not value:
            raise ValueError("data.train is not set: give a data path, or a list of {path, weight}")
        return [(value, 1.0)]
    if not isinstance(value, list) or not value:
        raise ValueError(f"data.train must be a data path or a non-empty list of {{path, weight}}, got {value!r}")
    out = []
    for i, entry in enumerate(value):
        where = f"data.train[{i}]"
        entry = {"path": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a path or a mapping {{path, weight}}, got {entry!r}")
        unknown = sorted(set(entry) - {"path", "weight"})
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: path, weight)")
        path, weight = entry.get("path"), entry.get("weight", 1.0)
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where}.path: must be a data path, got {path!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ValueError(f"{where}.weight: must be a positive number, got {weight!r}")
        out.append((path, float(weight)))
    return out
