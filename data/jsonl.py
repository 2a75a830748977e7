"""Writing JSONL files atomically: a reader (or a resumed run) never sees half a file."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path, records) -> None:
    """One JSON object per line, written under a temporary name and then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
