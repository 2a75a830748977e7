"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

    <run_dir>/checkpoints/step_00000010/      model + optimizer shards (DCP), extra_rank{r}.pt
    <run_dir>/checkpoints/step_00000010.tmp/  being written; never read, removed by the next save

Every rank writes its shards into the .tmp directory; once all are done, rank 0 renames it into
place, so a crash while writing leaves the previous checkpoint as the newest complete one.
`extra_rank{r}.pt` holds what is not a tensor of the model or optimizer: step, scheduler, data
position, RNG states (per rank), read back with weights_only=True.

`prepare_run_dir` decides, before anything is trained, whether a run starts fresh or resumes:
a run folder holds one run. `config.yaml` is the record of what its checkpoints were trained
with: written once, at a fresh start; a resume whose config differs in anything but the keys in
`CHANGEABLE_ON_RESUME` is refused with the differing keys listed.

Trust: DCP's `.metadata` is a pickle, so resuming from a run folder someone else wrote can run
their code. Resume only your own runs; exchange models as safetensors (`<run_dir>/model`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from llama import save_checkpoint
from train.config import flatten, save_config, to_dict

_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(run_dir) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def checkpoint_problem(path: Path, world_size: int) -> str | None:
    """Why a renamed-into-place checkpoint cannot be loaded (truncated, files missing), or None.
    Every rank reads the same files, so every rank reaches the same verdict."""
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 - any failure to read it means the same: unusable
        return f".metadata unreadable ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} is truncated ({file.stat().st_size} of at least {size} bytes)"
    for r in range(world_size):
        try:
            torch.load(path / f"extra_rank{r}.pt", weights_only=True)
        except Exception as e:  # noqa: BLE001
            return f"extra_rank{r}.pt unreadable ({type(e).__name__}: {e})"
    return None


# What a resume may change: how long to train, when to eval/save/log, what to export.
CHANGEABLE_ON_RESUME = (
    "train.steps", "train.eval_every", "train.save_every", "train.keep_last", "train.resume", "train.run_dir",
    "train.max_bad_steps", "train.export_hf", "train.activation_checkpointing", "logging.*",
    "data.cache", "data.cache_dir", "data.num_workers",  # where and how the same examples are tokenized
)  # fmt: skip

RUN_FILES = ("checkpoints", "model", "model_hf", "metrics.jsonl", "config.yaml", "wandb_id")  # what a run writes


def config_changes(saved: dict, current: dict) -> tuple[dict, dict]:
    """-> (changes a resume may make, changes it may not): {"section.key": (saved, current)}."""
    old, new = flatten(saved), flatten(current)
    changed = {k: (old.get(k, "<absent>"), new.get(k, "<absent>")) for k in sorted(set(old) | set(new))}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    ok = {k: v for k, v in changed.items() if any(fnmatch.fnmatch(k, p) for p in CHANGEABLE_ON_RESUME)}
    return ok, {k: v for k, v in changed.items() if k not in ok}


def prepare_run_dir(cfg, rank: int, world_size: int) -> Path | None:
    """Check the run folder against `train.resume` and the saved config; -> the checkpoint to resume
    from (None: a fresh start). Rank 0 writes config.yaml (fresh starts only) or deletes the old run
    (`resume: restart`); every rank returns the same answer."""
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.run_dir {run_dir} is a file, not a folder")
    found = [n for n in RUN_FILES if (run_dir / n).exists()]
    mode = cfg.train.resume
    if mode == "never" and found:
        raise ValueError(
            f"train.run_dir {run_dir} holds another run ({', '.join(found)}) and train.resume=never: choose a new "
            "train.run_dir, or set train.resume=restart to delete that run and start over"
        )
    if mode == "restart":
        _barrier()  # every rank has looked before rank 0 deletes
        if rank == 0:
            for name in found:
                target = run_dir / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            if found:
                print(f"train.resume=restart: deleted the previous run's {', '.join(found)} in {run_dir}", flush=True)
        _barrier()
        found = []
    resume = None
    for ckpt in reversed(list_checkpoints(run_dir)) if mode == "auto" else []:
        problem = checkpoint_problem(ckpt, world_size)
        if problem is None:
            resume = ckpt
            break
        if rank == 0:
            print(f"WARNING: checkpoint {ckpt} is unusable: {problem}; falling back to the one before", flush=True)
    if resume is None and mode == "auto" and list_checkpoints(run_dir):
        raise ValueError(f"no usable checkpoint in {run_dir / 'checkpoints'} (see the warnings above)")
    if resume is not None:
        saved_path = run_dir / "config.yaml"
        if not saved_path.is_file():
            raise ValueError(f"{run_dir} has checkpoints but no config.yaml: not a run folder this code wrote")
        ok, refused = config_changes(yaml.safe_load(saved_path.read_text()), to_dict(cfg))
        if refused:
            lines = "\n".join(f"  {k}: {a!r} (saved) -> {b!r} (now)" for k, (a, b) in refused.items())
            raise ValueError(
                f"{run_dir} holds a run trained with a different config; resuming would mix two runs:\n{lines}\n"
                "Use the saved values, a new train.run_dir, or train.resume=restart to start over."
            )
        if rank == 0 and ok:
            print("resuming with changed " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in ok.items()), flush=True)
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    _barrier()
    return resume


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


def export(model, path, rank: int, hf: bool = False, chat=None, hf_dtype: torch.dtype | None = None) -> None:
    """Gather the full weights to rank 0 and write `path` in the native format: the fp32 master weights,
    for training on. With hf=True also `<path>_hf` in the Hugging Face format, in `hf_dtype` (the run's
    compute dtype: bf16 for a bf16 run), for transformers and vLLM. Both get the run's tokenizer and chat
    template (`chat`, a llama.chat.ChatFormat), so that they are used on their own."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        tok = {"tokenizer": chat.tokenizer, "chat_template": chat.template} if chat is not None else {}
        save_checkpoint(full, model.config, model.head, path, format="native", **tok)
        if hf:
            save_checkpoint(full, model.config, model.head, str(path) + "_hf", format="hf", dtype=hf_dtype, **tok)
    _barrier()
