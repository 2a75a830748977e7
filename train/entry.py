"""What every training entry point does around the loop: `setup` before it, `main_guard` around it.

    cfg = parse_args(SFTConfig, argv, __doc__)
    s = setup(cfg, kind="sft", head="lm", train_on_prompt=not cfg.sft.mask_prompt)
    -> s.d (process group), s.chat, s.train_loader, s.eval_loader, s.model, s.resume_from

Order matters for failing early: the config is parsed and checked, the run folder is checked
against it (train/train_state.py `prepare_run_dir`), the tokenizer is checked against the
model's vocabulary, the data is loaded; only then are weights read.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from data.loader import DataLoader, build_loaders
from llama.chat import ChatFormat
from train import train_state
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
    resume_from = train_state.prepare_run_dir(cfg, d.rank, d.world_size)
    m, t = cfg.model, cfg.train
    chat = ChatFormat(model_tokenizer(m.checkpoint, m.preset, m.tokenizer))
    train_loader, eval_loader = build_loaders(cfg.data, kind, chat, d.rank, d.world_size, d.is_main, **encode_kw)
    model = build_model(
        d, m.checkpoint, m.preset, head, t.seed, t.mixed_precision, t.activation_checkpointing, t.compile
    )  # fmt: skip
    return Setup(cfg, d, chat, train_loader, eval_loader, model, resume_from)


def main_guard(fn):
    """Run an entry point and end it cleanly on every rank.

    On success (or a signal-stop, which every rank agreed on) all ranks meet at a barrier before
    the process group is destroyed, so no rank tears down its gloo/NCCL connections while a peer
    still has work in flight on them; then stdio is flushed. On an exception the group is left
    alone: destroying it while other ranks wait in a collective can hang, and torchrun stops them.
    """
    from train.loop import _Stop

    try:
        result = fn()
    except SystemExit as e:
        if e.code not in (None, 0) and not _Stop.signal:
            raise
        _teardown()
        raise
    _teardown()
    return result


def _teardown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
