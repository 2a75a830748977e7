"""The one check every command line makes before it writes: no output is one of its inputs.

`sample.py --prompts X --out-sft X` would replace the prompts with the samples; `average.py --out A A B`
one of the averaged models with the average. Every CLI (llama_posttrain/jobs/sample.py, evaluate.py,
average.py, prepare_data.py, llama_posttrain/llama/convert.py) hands its inputs and outputs, by option,
to `check_outputs` before any work: an output that is an input (the same file, however it is named: a
relative path, a symlink, a hard link), is a file an input folder holds (a model folder's config.json), or
is another output is refused, naming both options. A new file or folder inside an input folder is not
refused: writing it changes nothing the command reads (a model folder beside a run's checkpoints).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

GLOB_CHARS = "*?["


def _expand(path: str) -> list[str]:
    """A path as the files it stands for: a glob that names no file itself is its matches."""
    if any(c in path for c in GLOB_CHARS) and not os.path.exists(path):
        return sorted(glob.glob(path)) or [path]
    return [path]


def _same(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:  # a hard link (or a bind mount) has another name: compare the files themselves
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet: not the same file
        return False


def _held_by(path: str, folder: str) -> bool:
    """Whether `path` is an existing file inside the folder `folder`."""
    if not (os.path.isfile(path) and os.path.isdir(folder)):
        return False
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder))


def check_outputs(inputs: dict, outputs: dict) -> None:
    """inputs, outputs: {option as the user gave it ("--prompts"): path, list of paths or None (not given)}.
    ValueError naming both options where an output is an input, is a file an input folder holds, or is the
    same path as another output."""
    given_in = [(flag, p) for flag, v in inputs.items() for p in _paths(v)]
    given_out = [(flag, p) for flag, v in outputs.items() for p in _paths(v)]
    for i, (flag, out) in enumerate(given_out):
        for in_flag, value in given_in:
            for inp in _expand(value):
                if _same(out, inp):
                    raise ValueError(
                        f"{flag} {out} is the same path as {in_flag} {value}: writing it would destroy the input; "
                        "give another output path"
                    )
                if _held_by(out, inp):
                    raise ValueError(
                        f"{flag} {out} is a file of {in_flag} {value}, a folder this command reads: writing it would "
                        "replace part of the input; give another output path"
                    )
        for other_flag, other in given_out[:i]:
            if _same(out, other):
                raise ValueError(
                    f"{flag} {out} is the same path as {other_flag} {other}: one would overwrite the other"
                )


def _paths(value) -> list[str]:
    if value is None:
        return []
    return [str(p) for p in value] if isinstance(value, (list, tuple)) else [str(value)]
