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
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data.loader import DataLoader, Step
from train import checkpointing
from train.config import Config, save_config, to_dict
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


def evaluate(task: Task, loader: DataLoader, model, d: Dist) -> dict:
    """Every eval example once. The steps carry the whole set's counts, so the summed micro-batch
    losses are the loss of the whole set as one batch; `examples` counts what was evaluated."""
    was_training = model.training
    model.eval()
    sums = defaultdict(float)
    with torch.no_grad():
        for step in loader.eval_steps():
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


class _Stop:
    requested = False


def run(cfg: Config, d: Dist, model, task: Task, train_loader: DataLoader, eval_loader: DataLoader | None) -> dict:
    run_dir = Path(cfg.train.run_dir)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, cfg.train.steps))

    start, bad_in_a_row, skipped = 0, 0, 0
    ckpts = checkpointing.list_checkpoints(run_dir) if cfg.train.resume == "auto" else []
    if ckpts:
        extra = checkpointing.load(ckpts[-1], model, optimizer, d.rank)
        start, skipped = extra["step"], extra["skipped"]
        scheduler.load_state_dict(extra["scheduler"])
        train_loader.load_state_dict(extra["loader"])
        if d.is_main:
            print(f"resumed from {ckpts[-1]} (step {start})", flush=True)
    logger = Logger(run_dir, cfg.logging, to_dict(cfg), d.is_main, cfg.train.steps, resume_step=start)

    def save(step):
        extra = {
            "step": step,
            "skipped": skipped,
            "scheduler": scheduler.state_dict(),
            "loader": train_loader.state_dict(),
        }
        checkpointing.save(run_dir, step, model, optimizer, extra, d.rank, cfg.train.keep_last)

    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(_Stop, "requested", True))
    if eval_loader is not None and start == 0:
        logger.log(0, evaluate(task, eval_loader, model, d))  # the starting point
    model.train()
    batches = iter(train_loader)
    metrics, step = {}, start
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            s: Step = next(batches)
            t0 = time.perf_counter()
            sums, loss_sum, tokens = defaultdict(float), 0.0, 0
            for mb in s.micro_batches:
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
            reduced = all_reduce_sum(
                {**sums, "loss": loss_sum, "tokens": tokens, "stop": float(_Stop.requested)}, d.device
            )
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
                logger.log(step, evaluate(task, eval_loader, model, d))
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.steps:
                save(step)
            if reduced["stop"]:
                save(step)
                if d.is_main:
                    print(f"\nSIGTERM: saved step {step}, exiting", flush=True)
                return metrics
        if eval_loader is not None and not (cfg.train.eval_every and step % cfg.train.eval_every == 0):
            final_eval = evaluate(task, eval_loader, model, d)
            logger.log(cfg.train.steps, final_eval)
            metrics.update(final_eval)
        save(cfg.train.steps)
        checkpointing.export(model, run_dir / "model", d.rank, hf=cfg.train.export_hf)
    finally:
        signal.signal(signal.SIGTERM, previous)
        logger.finish()
    return metrics


def parse_args(config_cls, argv=None):
    """`--config FILE section.key=value ...` -> config instance."""
    import argparse

    from train.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", help="YAML file")
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args(argv)
    return load_config(config_cls, args.config, args.overrides)


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
    """Run an entry point; tear the process group down even on errors."""
    try:
        return fn()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
