"""Model averaging's run (llama_posttrain/jobs/average.py, its entry point, reads the config and calls `run`):
`average_checkpoints`, tensor by tensor in fp64, the inputs' tokenizer, chat template, sampling defaults and
shared files carried over; `greedy_soup`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from llama_posttrain.jobs.configs import AverageConfig
from llama_posttrain.llama.chat import template_in_dir
from llama_posttrain.llama.checkpoint import (
    check_destination,
    generation_defaults,
    load_model,
    open_weights,
    read_config,
    save_checkpoint,
    save_model,
    tensor_files,
)
from llama_posttrain.llama.paths import check_outputs
from llama_posttrain.llama.tokenizer import Tokenizer, resolve_tokenizer, same_tokenizer, tokenizer_in_dir


def _read_finite(path: Path, file: Path, name: str) -> torch.Tensor:
    with open_weights(file) as f:
        t = f.get_tensor(name)
    finite = torch.isfinite(t)
    if not finite.all():
        n_nan = int(torch.isnan(t).sum())
        raise ValueError(
            f"{path}: tensor {name} ({file.name}) has non-finite values ({n_nan} NaN, "
            f"{int((~finite).sum()) - n_nan} inf); refusing to average it"
        )
    return t


def _native_copies(paths: list[Path], out: Path, stack) -> list[Path]:
    """Each input as a native folder: itself if native, else a copy through llama.load_model in a
    temp folder beside `out` (removed when `stack` closes)."""
    natives, work = [], None
    for i, p in enumerate(paths):
        if read_config(p)[2] == "native":
            natives.append(p)
            continue
        if work is None:
            out.absolute().parent.mkdir(parents=True, exist_ok=True)
            work = Path(
                stack.enter_context(
                    tempfile.TemporaryDirectory(prefix=f".{out.name}.inputs-", dir=out.absolute().parent)
                )
            )
        save_model(load_model(p), work / str(i))  # checked against its config as every load is
        natives.append(work / str(i))
    return natives


def common_tokenizer(paths: list[Path]) -> tuple[Tokenizer | None, str | None]:
    """-> (the tokenizer, the chat template name) that every input folder holds; (None, None) if none holds
    a tokenizer. A ValueError naming both inputs where two differ (or only one holds a tokenizer)."""
    found = []  # (path, tokenizer or None, its file, template name or None, its file)
    for p in paths:
        file = tokenizer_in_dir(p)
        tok = resolve_tokenizer(None, p, read_config(p)[0].vocab_size, verbose=False) if file is not None else None
        found.append((p, tok, file, *template_in_dir(p)))
    p0, tok0, file0, name0, tfile0 = found[0]
    for p, tok, file, name, tfile in found[1:]:
        if (tok0 is None) != (tok is None):
            has, lacks, has_file = (p0, p, file0) if tok is None else (p, p0, file)
            raise ValueError(
                f"cannot average {p0} and {p}: {has} holds a tokenizer ({has_file}) and {lacks} none, so they are "
                "not known to share one; copy the tokenizer files into it, or average folders that hold them"
            )
        if tok0 is not None and not same_tokenizer(tok0, tok):
            raise ValueError(f"cannot average {p0} and {p}: their tokenizers differ ({file0} and {file})")
        if name0 != name:
            names = [f"{n} ({f})" if n else "none (llama3 by default)" for n, f in ((name0, tfile0), (name, tfile))]
            raise ValueError(f"cannot average {p0} and {p}: their chat templates differ: {names[0]} and {names[1]}")
    if tok0 is None:
        print(f"no tokenizer in the inputs ({', '.join(map(str, paths))}): the average holds the weights only")
    return tok0, name0 if tok0 is not None else None


def common_generation_defaults(paths: list[Path]) -> Path | None:
    """-> the input whose generation_config.json's sampling defaults (do_sample, temperature, top_p, ...:
    llama.formats.hf.generation_defaults) the average keeps, as every input holds the same; None where none
    holds any. A ValueError naming both inputs where two differ (or only one holds them)."""
    found = [(p, generation_defaults(p)) for p in paths]
    (p0, d0), differ = found[0], [(p, d) for p, d in found[1:] if d != found[0][1]]
    if differ:
        p, d = differ[0]
        keys = sorted(k for k in {*d0, *d} if d0.get(k, "(none)") != d.get(k, "(none)"))
        shown = ", ".join(f"{k}: {d0.get(k, '(none)')} and {d.get(k, '(none)')}" for k in keys)
        raise ValueError(
            f"cannot average {p0} and {p}: the sampling defaults of their generation_config.json differ ({shown}); "
            "make them equal in the inputs, so that the average's are known"
        )
    return p0 if d0 else None


# Files the save writes itself (the weights, config.json, the tokenizer files), or weights and configs of the
# inputs' own formats: never copied from the inputs into the average.
_NOT_COPIED = {"config.json", "params.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json"}
_NOT_COPIED |= {"special_tokens_map.json", "chat_template.jinja", "generation_config.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".gguf", ".distcp", ".index.json")


def _other_files(folder: Path, tokenizer) -> dict[str, Path]:
    """The top-level files of an input that the average's save does not write (README.md, LICENSE,
    USE_POLICY.md, ...): name -> path. Without a tokenizer no generation_config.json is written: it is one."""
    skip = _NOT_COPIED - ({"generation_config.json"} if tokenizer is None else set())
    return {
        f.name: f
        for f in sorted(folder.iterdir())
        if f.is_file() and not f.name.startswith(".") and f.name not in skip and not f.name.endswith(_WEIGHT_SUFFIXES)
    }


def copy_shared_files(paths: list[Path], out: Path, tokenizer) -> list[str]:
    """Copy into `out` the other files (`_other_files`) that every input holds with the same content;
    those only some hold, or hold with different content, and those `out` already holds with another
    content, are not copied: each printed. -> the names copied."""
    files = [_other_files(p, tokenizer) for p in paths]
    names = sorted(set().union(*files))
    copied, skipped = [], []
    for name in names:
        held = [f[name] for f in files if name in f]
        if len(held) < len(paths):
            skipped.append(f"{name} (in {len(held)} of {len(paths)} inputs)")
        elif any(f.read_bytes() != held[0].read_bytes() for f in held[1:]):
            skipped.append(f"{name} (its content differs between the inputs)")
        elif (out / name).is_file() and (out / name).read_bytes() == held[0].read_bytes():
            continue  # there already (an earlier average into --out)
        elif (out / name).exists():
            skipped.append(f"{name} (--out holds another {name}, kept)")
        else:
            tmp = out / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                shutil.copyfile(held[0], tmp)
                os.replace(tmp, out / name)
            finally:
                tmp.unlink(missing_ok=True)
            copied.append(name)
    if copied:
        print(f"{out}: copied the inputs' {', '.join(copied)}")
    if skipped:
        print(f"{out}: {len(skipped)} file(s) of the inputs not copied: {'; '.join(skipped)}")
    return copied


def average_checkpoints(
    paths: list,
    out,
    weights: list[float] | None = None,
    format: str = "native",
    dtype: torch.dtype | None = None,
    replace_tokenizer: bool = False,
) -> Path:
    paths, out = [Path(p) for p in paths], Path(out)
    if not paths:
        raise ValueError("nothing to average")
    weights = [1.0 / len(paths)] * len(paths) if weights is None else [float(w) for w in weights]
    # each check is written to be False for NaN (NaN passes `abs(sum - 1) > 1e-6` and `min < 0`)
    valid = len(weights) == len(paths) and all(math.isfinite(w) and w >= 0 for w in weights)
    if not (valid and abs(sum(weights) - 1.0) <= 1e-6):
        raise ValueError(f"weights must be {len(paths)} finite non-negative numbers summing to 1, got {weights}")
    check_outputs({"a checkpoint averaged": [str(p) for p in paths]}, {"--out": str(out)})
    for p in paths:
        read_config(p)  # each input is a readable checkpoint, before any long work
    tokenizer, chat_template = common_tokenizer(paths)
    source = common_generation_defaults(paths) if tokenizer is not None else None
    check_destination(out, tokenizer, chat_template, format, replace_tokenizer, source=source)
    with contextlib.ExitStack() as stack:
        natives = _native_copies(paths, out, stack)
        configs = [read_config(n)[:2] for n in natives]  # as loaded (a Meta checkpoint may turn out tied)
        for p, c in zip(paths[1:], configs[1:]):
            if c != configs[0]:
                raise ValueError(
                    f"cannot average {paths[0]} and {p}: model configs or heads differ:\n  {configs[0]}\n  {c}"
                )
        indexes = [tensor_files(n) for n in natives]
        names = list(indexes[0])
        for p, idx in zip(paths[1:], indexes[1:]):
            if set(idx) != set(names):
                raise ValueError(
                    f"cannot average {paths[0]} and {p}: tensor names differ ({sorted(set(idx) ^ set(names))[:5]})"
                )
        averaged = {name: _average_tensor(name, paths, indexes, weights, dtype) for name in names}
        save_checkpoint(
            averaged, configs[0][0], configs[0][1], out, format=format, tokenizer=tokenizer,
            chat_template=chat_template, replace_tokenizer=replace_tokenizer, source=source,
        )  # fmt: skip
    copy_shared_files(paths, out, tokenizer)
    return out


def _average_tensor(name, paths, indexes, weights, dtype) -> torch.Tensor:
    acc, dtypes = None, set()
    for p, w, idx in zip(paths, weights, indexes):
        t = _read_finite(p, idx[name], name)  # a NaN would poison the average silently
        dtypes.add(t.dtype)
        acc = t.double() * w if acc is None else acc.add_(t.double(), alpha=w)
    if dtype is None and len(dtypes) > 1:
        raise ValueError(
            f"tensor {name}: the inputs store it in different dtypes ({', '.join(sorted(map(str, dtypes)))}); "
            "choose the average's with --dtype"
        )
    out = acc.to(dtype or dtypes.pop())
    finite = torch.isfinite(out)
    if not finite.all():  # the average is what ships: a non-finite value is never written
        raise ValueError(
            f"tensor {name}: the average has {int((~finite).sum())} non-finite values in {out.dtype} (weights "
            f"{weights}; a value beyond the dtype's range?): refusing to write it; choose another --dtype"
        )
    return out


def greedy_soup(paths: list, evaluate: Callable[[Path], float], out, workdir) -> tuple[Path, list[Path]]:
    """Sort by evaluate(path) (higher is better); add each next checkpoint to the uniform soup if
    the soup's metric does not drop. -> (soup path, the checkpoints in it)."""
    scored = sorted(((evaluate(Path(p)), Path(p)) for p in paths), key=lambda x: -x[0])
    best_score, members = scored[0][0], [scored[0][1]]
    for k, (_, candidate) in enumerate(scored[1:]):
        trial = average_checkpoints(members + [candidate], Path(workdir) / f"soup_trial_{k}")
        score = evaluate(trial)
        if score >= best_score:
            best_score, members = score, members + [candidate]
    return average_checkpoints(members, out), members


def run(args: AverageConfig) -> None:
    """The job (average.py `main`, its config read): the average written, one JSON line printed; bad input
    (CheckpointError included) ends the job with its message."""
    try:
        dtype = getattr(torch, args.dtype) if args.dtype else None
        with torch.no_grad():  # scoped: an in-process call leaves the caller's grad mode alone
            out = average_checkpoints(
                args.checkpoints, args.out, args.weights, args.format, dtype, replace_tokenizer=args.replace_tokenizer
            )
    except ValueError as e:  # bad input (CheckpointError included): the message names it
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({"averaged": args.checkpoints, "weights": args.weights, "out": str(out)}))
