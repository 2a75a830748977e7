"""Model averaging (Llama 3: average the models of runs with different data or hyperparameters).

    python train/average.py --out runs/avg CKPT_A CKPT_B CKPT_C [--weights 0.5 0.25 0.25]

Checkpoints must be native (`python -m llama.convert` the others first), share one config and
head, and hold only finite values; anything else is refused. `--out` may be new, empty or an
earlier checkpoint (its other files are kept); any other non-empty folder is refused. The average is taken tensor by tensor (fp64 accumulation, stored
in the checkpoints' dtype), reading each tensor lazily, so memory is about one model.
`greedy_soup` (Wortsman et al., 2022) adds checkpoints best-first while a metric does not drop.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from llama.checkpoint import check_destination, open_weights, read_config, save_checkpoint, tensor_files


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


def average_checkpoints(paths: list, out, weights: list[float] | None = None) -> Path:
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("nothing to average")
    weights = [1.0 / len(paths)] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths) or abs(sum(weights) - 1.0) > 1e-6 or min(weights) < 0:
        raise ValueError(f"weights must be {len(paths)} non-negative numbers summing to 1, got {weights}")
    configs = []
    for p in paths:
        config, head, fmt = read_config(p)
        if fmt != "native":
            raise ValueError(
                f"{p} is a {fmt} checkpoint; convert it first: python -m llama.convert --from {fmt} --to native"
            )
        configs.append((config, head))
    for p, c in zip(paths[1:], configs[1:]):
        if c != configs[0]:
            raise ValueError(
                f"cannot average {paths[0]} and {p}: model configs or heads differ:\n  {configs[0]}\n  {c}"
            )
    check_destination(out)  # before reading every tensor
    indexes = [tensor_files(p) for p in paths]
    names = list(indexes[0])
    for p, idx in zip(paths[1:], indexes[1:]):
        if set(idx) != set(names):
            raise ValueError(
                f"cannot average {paths[0]} and {p}: tensor names differ ({sorted(set(idx) ^ set(names))[:5]})"
            )

    averaged = {}
    for name in names:
        acc, dtype = None, None
        for p, w, idx in zip(paths, weights, indexes):
            t = _read_finite(p, idx[name], name)  # a NaN would poison the average silently
            dtype = t.dtype
            acc = t.double() * w if acc is None else acc.add_(t.double(), alpha=w)
        averaged[name] = acc.to(dtype)
    save_checkpoint(averaged, configs[0][0], configs[0][1], out, format="native")
    return Path(out)


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", type=float, nargs="+")
    args = ap.parse_args(argv)
    try:
        out = average_checkpoints(args.checkpoints, args.out, args.weights)
    except ValueError as e:  # bad input (CheckpointError included): the message names it
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({"averaged": args.checkpoints, "weights": args.weights, "out": str(out)}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
