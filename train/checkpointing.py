"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

    <run_dir>/checkpoints/step_00000010/      model + optimizer shards (DCP), extra_rank{r}.pt
    <run_dir>/checkpoints/step_00000010.tmp/  being written; never read, removed by the next save

Every rank writes its shards into the .tmp directory; once all are done, rank 0 renames it into
place, so a crash while writing leaves the previous checkpoint as the newest complete one.
`extra_rank{r}.pt` holds what is not a tensor of the model or optimizer: step, scheduler, data
position, RNG states (per rank), read back with weights_only=True.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from llama import save_checkpoint

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(run_dir) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(run_dir, step: int, model, optimizer, extra: dict, rank: int, keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if rank == 0:
        for stale in root.glob("*.tmp"):  # a crash mid-write left these
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({**extra, "rng": rng_state()}, tmp / f"extra_rank{rank}.pt")
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    _barrier()
    return final


def load(path, model, optimizer, rank: int) -> dict:
    """Restore model + optimizer in place; return this rank's extra state (RNG already restored)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(Path(path) / f"extra_rank{rank}.pt", weights_only=True)
    set_rng_state(extra.pop("rng"))
    return extra


def export(model, path, rank: int, hf: bool = False) -> None:
    """Gather the full weights to rank 0 and write native safetensors (and HF with hf=True)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_checkpoint(full, model.config, model.head, path, format="native")
        if hf:
            save_checkpoint(full, model.config, model.head, str(path) + "_hf", format="hf")
    _barrier()
