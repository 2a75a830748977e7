"""The training loop shared by rm.py, sft.py and dpo.py.

An entry point builds the model(s), the data and a `Task` (the loss of one micro-batch, and how to
turn summed metrics into logged ones), then calls `run`. Per optimizer step:

    for each micro-batch of this rank: loss = task.loss(batch, step); loss.backward()
    (losses are divided by the step's global counts, so the gradients just add up)
    clip the global grad norm; skip the update if the loss or the norm is not finite
    AdamW step, LR schedule step; log; eval / checkpoint every N steps; on SIGTERM save and exit
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data.loader import DataLoader, Step
from train import checkpointing
from train.config import Config, to_dict
from train.distributed import Dist, all_reduce_sum
from train.logger import Logger

# bf16 dense peak FLOP/s by device name, for MFU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


@dataclass
class Task:
    loss: Callable  # (batch, step) -> (loss tensor, {metric: sum over this micro-batch})
    summarize: Callable  # {metric: sum over a step, all ranks} -> {metric: value to log}


def lr_lambda(cfg, total_steps: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def flops_per_token(model, seq_len: float) -> float:
    """6 N (matmul params, embedding lookup excluded) + 12 L d T for attention (PaLM appendix B)."""
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if "tok_embeddings" not in name)
    if c.tie_embeddings:
        n += c.vocab_size * c.dim
    return 6 * n + 12 * c.n_layers * c.dim * seq_len


def _norm(x) -> float:
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)


class _Stop:
    """SIGTERM (a scheduler, torchrun forwarding it) or SIGINT (Ctrl-C): finish the micro-batch,
    save, exit. torchrun kills workers `--shutdown-timeout` seconds (default 30) after forwarding
    the signal, so the flag is checked between micro-batches, not only between steps."""

    signal: int | None = None

    @classmethod
    def handler(cls, signum, frame):
        if cls.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop without saving
            raise KeyboardInterrupt
        cls.signal = signum

    @classmethod
    def agreed(cls, device) -> bool:
        """Whether any rank was signalled (a collective: every rank must call it at the same point)."""
        return all_reduce_sum({"stop": float(cls.signal is not None)}, device)["stop"] > 0


def evaluate(task: Task, loader: DataLoader, model, d: Dist) -> dict | None:
    """Every eval example once. The steps carry the whole set's counts, so the summed micro-batch
    losses are the loss of the whole set as one batch; `examples` counts what was evaluated.
    None: a signal arrived (checked between eval steps), the caller saves and exits."""
    was_training = model.training
    model.eval()
    sums = defaultdict(float)
    with torch.no_grad():
        for step in loader.eval_steps():
            if _Stop.agreed(d.device):
                model.train(was_training)
                return None
            for mb in step.micro_batches:
                loss, m = task.loss(mb.to(d.device), step)
                sums["loss"] += float(loss)
                sums["examples"] += mb.group_uid.numel()
                for k, v in m.items():
                    sums[k] += float(v)
    reduced = all_reduce_sum(dict(sums), d.device)
    model.train(was_training)
    out = {"loss": reduced["loss"], "examples": int(reduced["examples"]), **task.summarize(reduced)}
    return {f"eval/{k}": v for k, v in out.items()}


def run(cfg: Config, d: Dist, model, task: Task, train_loader: DataLoader, eval_loader: DataLoader | None) -> dict:
    resume_from = checkpointing.prepare_run_dir(cfg, d.rank, d.world_size)
    run_dir = Path(cfg.train.run_dir)
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, cfg.train.steps))

    start, bad_in_a_row, skipped = 0, 0, 0
    if resume_from is not None:
        extra = checkpointing.load(resume_from, model, optimizer, d.rank)
        start, skipped = extra["step"], extra["skipped"]
        scheduler.load_state_dict(extra["scheduler"])
        train_loader.load_state_dict(extra["loader"])
        if d.is_main:
            print(f"resumed from {resume_from} (step {start})", flush=True)
    logger = Logger(
        run_dir, cfg.logging, to_dict(cfg), d.is_main, cfg.train.steps, resume_step=start if resume_from else None
    )

    def save(step, loader_state):
        extra = {"step": step, "skipped": skipped, "scheduler": scheduler.state_dict(), "loader": loader_state}
        checkpointing.save(run_dir, step, model, optimizer, extra, d.rank, cfg.train.keep_last)

    def stop(step, loader_state):
        """Save the last finished step (unless it is saved already) and exit 128 + signal."""
        name = signal.Signals(_Stop.signal or signal.SIGTERM).name
        if step > start and not (run_dir / "checkpoints" / f"step_{step:08d}").is_dir():
            save(step, loader_state)
        if d.is_main:
            print(f"\n{name}: saved step {step}; rerun the same command to resume", flush=True)
        raise SystemExit(128 + (_Stop.signal or signal.SIGTERM))

    previous = {s: signal.signal(s, _Stop.handler) for s in (signal.SIGTERM, signal.SIGINT)}
    batches = iter(train_loader)
    metrics, step, loader_state = {}, start, train_loader.state_dict()
    try:
        if eval_loader is not None and start == 0:
            logger.log(0, evaluate(task, eval_loader, model, d) or stop(0, loader_state))  # the starting point
        model.train()
        for step in range(start + 1, cfg.train.steps + 1):
            done_state = loader_state  # the loader's position after step - 1: what a stop saves
            s: Step = next(batches)
            loader_state = train_loader.state_dict()
            t0 = time.perf_counter()
            sums, loss_sum, tokens = defaultdict(float), 0.0, 0
            for mb in s.micro_batches:
                if _Stop.agreed(d.device):  # drop this step's gradients, keep the last finished step
                    optimizer.zero_grad(set_to_none=True)
                    stop(step - 1, done_state)
                mb = mb.to(d.device)
                loss, m = task.loss(mb, s)
                # losses are divided by the step's global counts, so rank gradients must be summed;
                # FSDP averages them over ranks, which the world_size factor undoes
                (loss * d.world_size).backward()
                loss_sum += float(loss.detach())
                tokens += int((mb.doc_ids >= 0).sum())
                for k, v in m.items():
                    sums[k] += float(v)
            clip = o.grad_clip if o.grad_clip > 0 else float("inf")
            grad_norm = _norm(torch.nn.utils.clip_grad_norm_(params, clip))
            reduced = all_reduce_sum({**sums, "loss": loss_sum, "tokens": tokens}, d.device)
            if math.isfinite(reduced["loss"]) and math.isfinite(grad_norm):
                optimizer.step()
                bad_in_a_row = 0
            else:
                bad_in_a_row, skipped = bad_in_a_row + 1, skipped + 1
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    raise RuntimeError(f"step {step}: {bad_in_a_row} steps in a row with a non-finite loss or gradient")
            optimizer.zero_grad(set_to_none=True)
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            dt = time.perf_counter() - t0
            metrics = {
                "loss": reduced["loss"],
                **task.summarize(reduced),
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens": int(reduced["tokens"]),
                "tokens_per_s": reduced["tokens"] / dt,
                "peak_memory_gib": peak_memory_gib(d.device),
                "skipped_steps": skipped,
            }
            if d.device.type == "cuda":
                peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name()), None)
                seq = reduced["tokens"] / max(1, sum(int(mb.tokens.shape[0]) for mb in s.micro_batches) * d.world_size)
                if peak:
                    metrics["mfu"] = reduced["tokens"] * flops_per_token(model, seq) / dt / (peak * d.world_size)
            if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
                logger.log(step, metrics)
            if eval_loader is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                logger.log(step, evaluate(task, eval_loader, model, d) or stop(step, loader_state))
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                save(step, loader_state)
            if _Stop.agreed(d.device):
                stop(step, loader_state)
        if eval_loader is not None and not (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            final_eval = evaluate(task, eval_loader, model, d) or stop(step, loader_state)
            logger.log(cfg.train.steps, final_eval)
            metrics.update(final_eval)
        save(cfg.train.steps, loader_state)
        checkpointing.export(model, run_dir / "model", d.rank, hf=cfg.train.export_hf)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        logger.finish()
    return metrics


def build_loaders(cfg: Config, kind: str, chat, d: Dist, **encode_kw):
    """Train and (optional) eval loaders for this rank; the load report is printed by rank 0."""
    from data.loader import load_examples

    dc = cfg.data
    kw = dict(kind=kind, chat=chat, max_len=dc.max_len, overlength=dc.overlength, skip_invalid=dc.skip_invalid)
    kw.update(keep_strengths=dc.keep_strengths, verbose=d.is_main, **encode_kw)
    loader_kw = dict(
        max_len=dc.max_len, tokens_per_microbatch=dc.tokens_per_microbatch, rank=d.rank, world_size=d.world_size
    )
    loader_kw["pad_id"] = chat.tokenizer.pad_id
    train_examples, _ = load_examples(dc.train, seed=dc.seed, **kw)
    if len(train_examples) < dc.batch_size:
        raise ValueError(
            f"data.train {dc.train}: {len(train_examples) or 'no'} examples (after the drops reported above), "
            f"fewer than one batch of data.batch_size={dc.batch_size}"
        )
    train = DataLoader(train_examples, dc.batch_size, seed=dc.seed, **loader_kw)
    evaluation = None
    if dc.eval:
        eval_examples, _ = load_examples(dc.eval, seed=dc.seed + 1, **kw)
        if not eval_examples:
            raise ValueError(f"data.eval {dc.eval}: no examples (after the drops reported above)")
        evaluation = DataLoader(eval_examples, dc.batch_size, shuffle=False, drop_last=False, **loader_kw)
    return train, evaluation


def main_guard(fn):
    """Run an entry point and end it cleanly on every rank.

    On success (or a signal-stop, which every rank agreed on) all ranks meet at a barrier before
    the process group is destroyed, so no rank tears down its gloo/NCCL connections while a peer
    still has work in flight on them; then stdio is flushed. On an exception the group is left
    alone: destroying it while other ranks wait in a collective can hang, and torchrun stops them.
    """
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
