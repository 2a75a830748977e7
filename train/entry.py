"""What every training entry point does around the loop: `setup` before it, `main_guard` around it.

    cfg = parse_args(SFTConfig, argv, __doc__)
    s = setup(cfg, kind="sft", head="lm", train_on_prompt=not cfg.sft.mask_prompt)
    -> s.d (process group), s.chat, s.train_loader, s.eval_loader, s.model, s.resume_from

Order matters for failing early: the config is parsed and checked, the run folder is locked and
checked against it (train/run_folder.py `claim`), the tokenizer is checked against the model's
vocabulary, the data is loaded and checked against the run's record of it; only then are weights read.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from data.loader import DataLoader, build_loaders
from llama.chat import ChatFormat, resolve_chat_template
from train import run_folder, run_lock
from train.config import Config
from train.distributed import Dist, build_model, init_distributed, model_tokenizer


@dataclass
class Setup:
    cfg: Config
    d: Dist
    chat: ChatFormat
    train_loader: DataLoader
    eval_loader: DataLoader | None
    model: object  # the FSDP-sharded Transformer being trained
    resume_from: Path | None  # the checkpoint to resume from; None: a fresh start


def setup(cfg: Config, kind: str, head: str, **encode_kw) -> Setup:
    """Process group, run folder, chat format, loaders, model: everything `loop.run` needs.
    encode_kw: passed to data.loader.load_examples (e.g. train_on_prompt, one_row)."""
    d = init_distributed()
    resume_from = run_folder.claim(cfg, d.rank, d.world_size)
    m, t = cfg.model, cfg.train
    tokenizer = model_tokenizer(m.checkpoint, m.preset, m.tokenizer)
    chat = ChatFormat(tokenizer, resolve_chat_template(m.chat_template, m.checkpoint))
    run_folder.check_exports(cfg, chat, d.rank, d.world_size)
    train_loader, eval_loader = build_loaders(cfg.data, kind, chat, d.rank, d.world_size, d.is_main, **encode_kw)
    data = {"train": train_loader.fingerprints, "eval": eval_loader.fingerprints if eval_loader else {}}
    run_folder.check_data(cfg, data, resume_from is None, d.rank, d.world_size)
    layout = {"shard_degree": t.shard_degree, "cpu_offload": t.cpu_offload}
    model = build_model(
        d, m.checkpoint, m.preset, head, t.seed, t.mixed_precision, t.activation_checkpointing, t.compile, **layout
    )  # fmt: skip
    return Setup(cfg, d, chat, train_loader, eval_loader, model, resume_from)


def main_guard(fn):
    """Run an entry point and end it cleanly on every rank.

    On success (or a signal-stop, which every rank agreed on) all ranks meet at a barrier before
    the process group is destroyed, so no rank tears down its gloo/NCCL connections while a peer
    still has work in flight on them; then stdio is flushed. On an exception the group is left
    alone: destroying it while other ranks wait in a collective can hang, and torchrun stops them.

    The run folder's lock (train/run_lock.py) is released on the way out, however it ends.

    A ValueError or OSError raised before training starts (`loop.run` not reached: a bad key, data
    file, batch size, checkpoint; every rank reads the same and fails alike) is printed once, as
    `error: ...`, by local rank 0 (once per node: a file missing on one node is still reported; see
    `_report_once`), and every rank exits with status 2, without tracebacks. A full disk at any time
    is reported the same way (status 1). Other errors raised later keep their tracebacks.
    """
    from train.loop import _Phase, _Stop

    _Phase.training = False
    try:
        result = fn()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _report_once(e)
            raise SystemExit(1) from None
        if _Phase.training:
            raise
        _report_once(e)
        raise SystemExit(2) from None
    except ValueError as e:
        if _Phase.training:
            raise
        _report_once(e)
        raise SystemExit(2) from None
    except SystemExit as e:
        if e.code not in (None, 0) and not _Stop.signal:
            raise
        _teardown()
        raise
    finally:
        run_lock.release_all()
    _teardown()
    return result


# How long a rank other than local rank 0 waits before printing the error it failed with.
OTHER_RANKS_WAIT_S = 3.0


def _report_once(e: Exception) -> None:
    """Local rank 0 prints the error at once. Another rank waits first: when every rank failed alike
    (the usual case), torchrun stops it within ~0.1 s of rank 0's exit, so the error is printed once;
    if it is still running, rank 0 did not fail this way, and it prints its own error."""
    rank = os.environ.get("LOCAL_RANK", "0")
    if rank != "0":
        time.sleep(OTHER_RANKS_WAIT_S)
    who = "" if rank == "0" else f" (rank {os.environ.get('RANK', '?')})"
    print(f"error{who}: {e}", file=sys.stderr, flush=True)


def _teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
