"""The native format, and the safetensors folder it shares with Hugging Face's.

native: `config.json` {"format": "llama-native", "head", "model": ModelConfig} + safetensors with our
(Meta) parameter names. A safetensors folder (native or HF) holds one `model.safetensors` or shards named
by `model.safetensors.index.json`; only the files the index names (or the single file) are read, so a
stray extra `*.safetensors` in the folder cannot override tensors. Every weight file written here carries
the WRITER tag in its metadata: a later save into the folder may remove such a file once its new index no
longer names it; files without the tag are never removed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llama_posttrain.llama.config import ModelConfig
from llama_posttrain.llama.formats import CheckpointError, read_json
from llama_posttrain.llama.heads import HEADS

NATIVE = "llama-native"
MAX_SHARD_BYTES = 5 * 2**30
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
WRITER = "llama-posttrain"


def config_json(config: ModelConfig, head: str) -> dict:
    return {"format": NATIVE, "head": head, "model": config.to_dict()}


def config_from_json(raw: dict, source: str) -> tuple[ModelConfig, str]:
    """A native config.json -> (config, head)."""
    head = raw.get("head", "lm")
    if head not in HEADS:
        raise CheckpointError(f"{source}: head {head!r} is not one of {sorted(HEADS)}")
    return ModelConfig.from_dict(raw["model"], source), head


# ----------------------------------------------------------------------------- reading


def index_files(index: Path) -> list[str]:
    """The file names an index's weight_map names (plain names in the same folder)."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
    if bad:
        raise CheckpointError(f"{index}: weight_map names files outside the folder: {bad[:3]}")
    return names


def weight_files(path) -> list[Path]:
    """The weight files of a safetensors checkpoint: those its index names, else `model.safetensors`.

    Any other `*.safetensors` in the folder is not read (counted and printed)."""
    path = Path(path)
    if (path / INDEX).is_file():
        files = [path / n for n in index_files(path / INDEX)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX} names weight file(s) that are missing: {', '.join(missing)}")
    elif (path / SINGLE).is_file():
        files = [path / SINGLE]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (found {', '.join(found)}: not read without an index naming them)" if found else ""
        raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}{hint}")
    ignored = sorted(p.name for p in set(path.glob("*.safetensors")) - set(files))
    if ignored:
        print(
            f"{path}: ignoring {len(ignored)} safetensors file(s) the checkpoint does not name: {', '.join(ignored)}",
            file=sys.stderr,
        )
    return files


def open_weights(file: Path, device="cpu"):
    """safe_open, with the file named if it is truncated or corrupt."""
    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def tensor_files(path) -> dict[str, Path]:
    """tensor name -> the weight file holding it. A name held by two files is an error."""
    out = {}
    for file in weight_files(path):
        with open_weights(file) as f:
            for name in f.keys():
                if name in out:
                    raise CheckpointError(f"tensor {name} is in two weight files: {out[name]} and {file}")
                out[name] = file
    return out


def read_tensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors folder, under the names stored."""
    by_file: dict[Path, list[str]] = {}
    for name, file in tensor_files(path).items():
        by_file.setdefault(file, []).append(name)
    out = {}
    for file, names in by_file.items():
        with open_weights(file, device) as f:
            for name in names:
                out[name] = f.get_tensor(name)
    return out


# ----------------------------------------------------------------------------- writing


def _nbytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of `t` once written (cast to `dtype` if floating point)."""
    return t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())


def _shard_plan(state: dict[str, torch.Tensor], max_shard_bytes: int, dtype) -> list[tuple[str, list[str]]]:
    """-> [(file name, tensor names)]: model.safetensors, or model-0000k-of-0000n.safetensors."""
    shards, size = [[]], 0
    for name, t in state.items():
        nbytes = _nbytes(t, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        return [(SINGLE, shards[0])]
    return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", names) for i, names in enumerate(shards)]


def write_files(
    directory: Path, state: dict, cfg: dict, max_shard_bytes: int, index: bool, dtype, extra: dict[str, bytes]
) -> set[str]:
    """Write the weight files (cast to `dtype` one shard at a time), the index (if sharded or `index`),
    the `extra` files and config.json into `directory`.

    Each is written under a temp name first; all are then renamed into place, config.json last.
    -> the names written."""
    plan = _shard_plan(state, max_shard_bytes, dtype)
    tag = uuid.uuid4().hex[:8]
    pending = []  # (temp path, final path)
    try:
        for file, names in plan:
            tmp = directory / f".{file}.tmp-{tag}"
            pending.append((tmp, directory / file))
            shard = {n: _cast(state[n], dtype).contiguous() for n in names}
            _save_file(shard, tmp, directory / file)
            del shard
        for file, content in extra.items():
            tmp = directory / f".{file}.tmp-{tag}"
            pending.append((tmp, directory / file))
            tmp.write_bytes(content)
        if index or len(plan) > 1:
            total = sum(_nbytes(t, dtype) for t in state.values())
            weight_map = {n: file for file, names in plan for n in names}
            tmp = directory / f".{INDEX}.tmp-{tag}"
            pending.append((tmp, directory / INDEX))
            tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        tmp = directory / f".config.json.tmp-{tag}"
        pending.append((tmp, directory / "config.json"))
        tmp.write_text(json.dumps(cfg, indent=2))
        for tmp, final in pending:
            os.replace(tmp, final)
    finally:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
    return {final.name for _, final in pending}


def _save_file(shard: dict, tmp: Path, final: Path) -> None:
    """safetensors' save_file; its I/O failure (a full disk: `SafetensorError: Error while serializing: I/O
    error: No space left on device (os error 28)`) as the OSError it is, naming the file being written.
    safetensors creates the file mode 0600 whatever the umask; it gets the mode every other file gets
    (`file_mode`: 0644 under umask 022), so that another user (a teammate, a vLLM server) can read it."""
    try:
        save_file(shard, str(tmp), metadata={"format": "pt", "writer": WRITER})
    except SafetensorError as e:
        code = re.search(r"I/O error: .*\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(final)) from None
    os.chmod(tmp, file_mode())


_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The mode open() gives a new file: 0666 less the process's umask. The umask is read from
    /proc/self/status (Linux); elsewhere by setting and restoring it, under a lock."""
    try:
        with open("/proc/self/status") as f:
            umask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    except (OSError, ValueError, IndexError):
        umask = None
    if umask is None:
        with _UMASK_LOCK:
            umask = os.umask(0o022)
            os.umask(umask)
    return 0o666 & ~umask


def written_by_us(file: Path) -> bool:
    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get("writer") == WRITER
    except (SafetensorError, OSError):
        return False


def previous_weight_files(path: Path) -> set[str]:
    """Weight file names of the checkpoint already in `path` (its index's, and model.safetensors)."""
    names = {SINGLE} if (path / SINGLE).is_file() else set()
    if (path / INDEX).is_file():
        try:
            names |= set(index_files(path / INDEX))
        except CheckpointError:
            pass  # a broken index: its files are not known to be ours, so none is removed
    return names


def is_weight_name(name: str) -> bool:
    return name in (SINGLE, INDEX) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t
