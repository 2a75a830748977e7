"""Training checkpoints with torch.distributed.checkpoint (DCP), written atomically.

    <run_dir>/checkpoints/step_00000010/      model + optimizer shards (DCP), extra_rank{r}.pt
    <run_dir>/checkpoints/step_00000010.tmp/  being written; never read, removed by the next save

Every rank writes its shards into the .tmp directory; once all are done, rank 0 renames it into
place, so a crash while writing leaves the previous checkpoint as the newest complete one.
`extra_rank{r}.pt` holds what is not a tensor of the model or optimizer: step, scheduler, data
position, RNG states (per rank), read back with weights_only=True.

Whether a run starts fresh or resumes, and from which of these, is decided before anything is
trained, by llama_posttrain/train/run_folder.py `claim`.

Trust: DCP's `.metadata` is a pickle. It is read only once the folder is verified as a run folder
of ours (run_folder.py `claim`: its config.yaml, before any checkpoint is looked at), and then with
an unpickler that builds only the classes a DCP metadata file holds (llama/formats/dcp_metadata.py),
so a planted `.metadata` fails to load instead of running code. Still, resume only your own runs:
exchange models as safetensors (`<run_dir>/model`), which hold tensors and nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from llama_posttrain.llama import save_checkpoint
from llama_posttrain.train import run_lock

# torch.distributed.checkpoint (and the DTensor and sympy modules it loads, ~0.7 s here) is imported in the
# functions that save, load and export, not here: the evaluation and sampling jobs import the training loop's
# modules but never a checkpoint of this kind (experiments/bench/results/quickstart_time.md).

STEP_DIR = re.compile(r"^step_(\d{8})$")
_EXTRA = re.compile(r"^extra_rank(\d+)\.pt$")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(run_dir) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def saved_world_size(path: Path) -> int:
    """How many ranks wrote a checkpoint: one extra_rank{r}.pt each (0: none found)."""
    return len([p for p in Path(path).iterdir() if _EXTRA.match(p.name)])


def check_world_size(path: Path, world_size: int) -> None:
    """Refuse a checkpoint that another number of ranks wrote: each rank's data position and RNG state
    are its own, so they cannot be dealt out to another number of ranks. Not a damaged checkpoint, so no
    fallback to an older one (they were written by the same ranks)."""
    saved = saved_world_size(path)
    if saved and saved != world_size:
        raise ValueError(
            f"{path} was saved by a run on {saved} rank(s) (extra_rank0..{saved - 1}.pt) and this run has "
            f"{world_size}: a resume continues each rank's data position and RNG state, so it needs the same "
            f"number of ranks. Rerun on {saved} rank(s) (torchrun --nproc-per-node {saved}, or as many over the "
            "nodes), or start over on this many: a new train.run_dir or train.resume=restart."
        )


def checkpoint_problem(path: Path, world_size: int) -> str | None:
    """Why a renamed-into-place checkpoint cannot be loaded (truncated, files missing), or None.
    Every rank reads the same files, so every rank reaches the same verdict."""
    from llama_posttrain.llama.formats.dcp_metadata import SafeReader

    try:
        metadata = SafeReader(str(path)).read_metadata()
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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_step(path: Path) -> int:
    return int(STEP_DIR.match(Path(path).name).group(1))


def save(run_dir, step: int, model, optimizer, extra: dict, rank: int, keep_last: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if rank == 0:  # the lock deleted or replaced under this run: another may write here now (run_lock.check)
        run_lock.check(run_dir, f"checkpoint step {step}")
    with _naming_a_full_disk(tmp, f"checkpoint step {step}", partial=tmp):
        if rank == 0:
            for stale in root.glob("step_*.tmp"):  # a crash mid-write left these (other files are not ours)
                if stale.is_dir() and STEP_DIR.match(stale.name[: -len(".tmp")]):
                    shutil.rmtree(stale)
            tmp.mkdir(parents=True)
        _barrier()
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

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


_CHECKPOINTS_KEPT = (
    "the checkpoints written before are kept: free space (or move train.run_dir) and rerun the same command to resume"
)
_EXPORT_KEPT = (
    "the files there before are kept (each is written under a temporary name and renamed into place only when all "
    "are written; the partial ones were removed), and so are the checkpoints: free space and rerun the same command "
    "to export"
)


@contextlib.contextmanager
def _naming_a_full_disk(path: Path, what: str, partial: Path | None = None, kept: str = _CHECKPOINTS_KEPT):
    """A full disk (or quota) while writing `what` to `path`: an error that names both (after removing the
    `partial` write) and says what is `kept`, instead of a bare `[Errno 28] No space left on device`."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        raise OSError(
            e.errno,
            f"the disk holding {path} is full ({e.strerror}) while writing {what}; {kept}",
        ) from None


def load(path, model, optimizer, rank: int) -> dict:
    """Restore model + optimizer in place; return this rank's extra state (RNG already restored)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from llama_posttrain.llama.formats.dcp_metadata import SafeReader

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path), storage_reader=SafeReader(str(path)))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(Path(path) / f"extra_rank{rank}.pt", weights_only=True)
    set_rng_state(extra.pop("rng"))
    return extra


def export(
    model, path, rank: int, hf: bool = False, chat=None, hf_dtype: torch.dtype | None = None, source=None
) -> None:
    """Gather the full weights to rank 0 and write `path` in the native format: the fp32 master weights,
    for training on. With hf=True also `<path>_hf` in the Hugging Face format, in `hf_dtype` (the run's
    compute dtype: bf16 for a bf16 run), for transformers and vLLM. Both get the run's tokenizer and chat
    template (`chat`, a llama.chat.ChatFormat), so that they are used on their own, and the generation
    defaults (do_sample, temperature, top_p, ...) of `source`'s generation_config.json (the run's
    model.checkpoint; the native folder keeps them too, for a later stage trained from it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        run_lock.check(Path(path).parent, f"the exported model {path}")
        tok = {"tokenizer": chat.tokenizer, "chat_template": chat.template} if chat is not None else {}
        with _naming_a_full_disk(Path(path), "the exported model", kept=_EXPORT_KEPT):
            save_checkpoint(full, model.config, model.head, path, format="native", source=source, **tok)
            if hf:
                hf_path = str(path) + "_hf"
                save_checkpoint(
                    full, model.config, model.head, hf_path, format="hf", dtype=hf_dtype, source=source, **tok
                )
    _barrier()
