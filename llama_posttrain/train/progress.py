"""How far a job has got, for whoever launched it: one small JSON file, rewritten as the job goes.

    progress.report(37, 150, "steps")      # in a job (rank 0): a no-op unless the launcher asked for it
    progress.read(path) -> {"done": 37, "total": 150, "unit": "steps", "time": ...} or None

The launcher (llama_posttrain/driver/launch.py) sets POSTTRAIN_PROGRESS to a file path in the job's environment; the
training loop reports steps, sampling and evaluation report prompts. The file is replaced atomically,
so a reader never sees half of it. Reports closer than MIN_INTERVAL_S apart are skipped (the last one
of a job is always written).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from llama_posttrain.data.io import write_json

ENV = "POSTTRAIN_PROGRESS"
MIN_INTERVAL_S = 0.5
_last = [0.0]


def report(done: int, total: int, unit: str) -> None:
    path = os.environ.get(ENV)
    if not path or os.environ.get("RANK", "0") != "0":
        return
    now = time.time()
    if done < total and now - _last[0] < MIN_INTERVAL_S:
        return
    _last[0] = now
    try:
        write_json(path, {"done": done, "total": total, "unit": unit, "time": now}, indent=None)
    except OSError:
        pass  # progress is a courtesy: never fail a job over it


def read(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def clock(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour: the progress lines' elapsed time and ETA (the launcher's and the
    training log's)."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
