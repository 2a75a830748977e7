"""Writing files atomically: a reader (or a resumed run, or another process) never sees half a file.

Every file this project writes whole (records, results, reports, progress, manifests) goes through
`write_text`: under a temporary name of this process, then renamed into place. (Checkpoint weights
have their own, llama_posttrain/llama/checkpoint.py: a layer below this one.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path, obj, indent: int | None = 1) -> None:
    write_text(path, json.dumps(obj, indent=indent))


def write_jsonl(path, records) -> None:
    """One JSON object per line."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))
