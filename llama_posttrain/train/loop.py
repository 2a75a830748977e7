"""The training loop shared by rm.py, sft.py and dpo.py.

An entry point builds the model(s) and an `Objective` (the loss of one micro-batch and the ratios
it logs), then calls `run`. Per optimizer step:

    for each micro-batch of this rank: loss, sums = objective.loss(batch, step); loss.backward()
        (losses are divided by the step's global counts, so the rank gradients are summed)
    clip the global grad norm; skip the update if the loss or the norm is not finite (said: train/health.py)
    AdamW step, LR schedule step
    one all-reduce of the step's sums, on the device (read to the host on logged steps) -> logged ratios
    eval / checkpoint every N steps
    SIGTERM / SIGINT: polled between micro-batches and after the update (lifecycle.StopPoll, a CPU group);
        found mid-step, the step is dropped; after the update, it is saved; then the run exits
"""

from __future__ import annotations

import math
import resource
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llama_posttrain.data.loader import DataLoader, Step
from llama_posttrain.train import health, progress, train_state
from llama_posttrain.train.config import Config, to_dict
from llama_posttrain.train.distributed import Dist, all_reduce_sum, gather_lists, param_dtype, reduce_on_device
from llama_posttrain.train.flops import peak_flops, step_flops
from llama_posttrain.train.lifecycle import StopPoll, StopRequested, StopSignal, stop_requested, training, write_result
from llama_posttrain.train.logger import Logger
from llama_posttrain.train.run_setup import Setup


@dataclass
class Objective:
    loss: Callable  # (batch, step) -> (loss tensor, {name: on-device sum over this micro-batch})
    ratios: dict[str, tuple[str, str]]  # logged metric -> (sum, denominator), divided once per logged step
    derive: Callable | None = None  # {metric: value} -> {metric: value}: metrics that are not ratios
    reference_forward: bool = False  # a frozen model's forward per micro-batch too (DPO's live reference): MFU
    # {sum name: "max" | "min"}: those of the loss's sums are combined by max / min over micro-batches and
    # ranks (not summed) and logged under their own name; +-inf (a micro-batch with nothing) is not logged
    extrema: dict[str, str] = field(default_factory=dict)
    # eval only: names of 1-D tensors the loss returns beside its sums (the RM's rewards per pair);
    # `evaluate_objective` returns them as lists of every micro-batch and rank (on rank 0), which the logger draws
    # as histograms
    collect: tuple[str, ...] = ()


def summarize(objective: Objective, sums: dict[str, float]) -> dict[str, float]:
    """Step (or eval set) sums over all micro-batches and ranks -> logged metrics. A ratio whose
    denominator is 0 (e.g. no pairs of some strength) is not logged."""
    out = {name: sums[num] / sums[den] for name, (num, den) in objective.ratios.items() if sums.get(den)}
    out |= {name: sums[name] for name in objective.extrema if name in sums and math.isfinite(sums[name])}
    return objective.derive(out) if objective.derive else out


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


def sync_clock(device) -> None:
    """Wait for the device's queued work (CUDA only) before the step clock is read."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def throughput(reduced: dict, dt: float, world_size: int) -> dict:
    """A step's token counts and rates: `tokens` counts every real token the step ran (pads excluded),
    `target_tokens` (a loss that has them: SFT) the tokens the loss is taken over."""
    out = {}
    for name in ("tokens", "target_tokens"):
        if name in reduced:
            out |= {
                name: int(reduced[name]),
                f"{name}_per_s": reduced[name] / dt,
                f"{name}_per_s_per_gpu": reduced[name] / dt / world_size,
            }
    return out


def _full(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP's grad norm), on the device: no host sync."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


# The loop's own sums, beside a loss's: a loss naming one of its sums so would overwrite the loop's count
# (SFT's target count once replaced "tokens", the real tokens of the step).
LOOP_SUMS = ("loss", "tokens", "flops", "examples")


def _add(acc: dict, loss, sums: dict, mb, extrema: dict[str, str] | None = None, **own) -> None:
    """Accumulate a micro-batch's loss, real tokens (pads excluded), the loss's sums and the loop's
    `own` counts on the device, in fp64 (no host sync); the names in `extrema` by max / min."""
    clash = sorted(set(sums) & set(LOOP_SUMS))
    if clash:
        raise ValueError(f"the loss's sums {clash} would overwrite the loop's own {LOOP_SUMS}: rename them")
    extrema = extrema or {}
    for k, v in {"loss": loss.detach(), "tokens": (mb.doc_ids >= 0).sum(), **own, **sums}.items():
        v = v.double()
        if k not in acc:
            acc[k] = v
        elif k in extrema:
            acc[k] = torch.maximum(acc[k], v) if extrema[k] == "max" else torch.minimum(acc[k], v)
        else:
            acc[k] = acc[k] + v


def evaluate_objective(objective: Objective, loader: DataLoader, model, d: Dist) -> dict | None:
    """Every eval example once. The steps carry the whole set's counts, so the summed micro-batch
    losses are the loss of the whole set as one batch; `examples` counts what was evaluated.
    Raises StopRequested if a signal arrived (checked between eval steps). Objective.collect: lists on rank 0."""
    was_training = model.training
    model.eval()
    acc, parts = {}, {name: [] for name in objective.collect}
    with torch.no_grad():
        for step in loader.eval_steps():
            if stop_requested(d.device):
                model.train(was_training)
                raise StopRequested
            for mb in step.micro_batches:
                mb = mb.to(d.device)
                loss, sums = objective.loss(mb, step)
                for name in objective.collect:
                    parts[name].append(sums.pop(name))
                _add(acc, loss, sums, mb, objective.extrema, examples=mb.group_uid.new_full((), mb.group_uid.numel()))
    reduced = all_reduce_sum(acc, d.device, objective.extrema)
    model.train(was_training)
    out = {"loss": reduced["loss"], "examples": int(reduced["examples"]), **summarize(objective, reduced)}
    return {f"eval/{k}": v for k, v in (out | gather_lists(parts, d)).items()}


@dataclass
class Trainer:
    """One run's moving parts; `run` drives them. Each method is one thing the loop does."""

    cfg: Config
    d: Dist
    model: torch.nn.Module
    objective: Objective
    train_loader: DataLoader
    eval_loader: DataLoader | None
    eval_objective: Objective
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    start: int = 0  # the step resumed from
    # Non-finite steps: skipped so far, in a row now, the most in a row so far. 0-d int64 tensors on the device
    # that decides a skip (the fused AdamW's device; the CPU for the for-each one), read to the host on timed steps
    # on CUDA, every step elsewhere (no sync to save).
    skipped: torch.Tensor = field(init=False)
    bad_in_a_row: torch.Tensor = field(init=False)
    worst: torch.Tensor = field(init=False)
    signalled: bool = False  # some rank was signalled during the last step: save it and exit

    def __post_init__(self):
        o = self.cfg.optim
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused by default: one kernel per parameter group, no parameter-sized temporaries (on the CPU the
        # for-each AdamW makes two per 128k x d embedding matrix at the step: the process's peak memory);
        # not with cpu_offload, whose parameters live off the device that decides a skip
        self.fused = (not self.cfg.train.cpu_offload) if o.fused is None else o.fused
        self.optimizer = torch.optim.AdamW(
            params,
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            fused=True if self.fused else None,  # None: torch's default (foreach)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(o, self.cfg.train.steps))
        self.run_dir = Path(self.cfg.train.run_dir)
        self.health = health.Health(self.d.is_main)  # skipped steps and explosions, said
        counters = self.d.device if self.fused else torch.device("cpu")
        self.read_every_step = not self.fused or self.d.device.type != "cuda"
        self.skipped, self.bad_in_a_row, self.worst = (
            torch.zeros((), dtype=torch.long, device=counters) for _ in range(3)
        )
        self.stops = StopPoll()  # the signal flag between micro-batches, off the device

    def resume(self, checkpoint: Path | None) -> None:
        if checkpoint is None:
            return
        extra = train_state.load(checkpoint, self.model, self.optimizer, self.d.rank)
        self.start = extra["step"]
        self.skipped.fill_(extra["skipped"])
        self.health.skipped_before = extra["skipped"]
        self.scheduler.load_state_dict(extra["scheduler"])
        self.train_loader.load_state_dict(extra["loader"])
        if self.d.is_main:
            print(f"resumed from {checkpoint} (step {self.start})", flush=True)

    def train_step(self, batch: Step, step: int, timed: bool | None = None) -> dict:
        """Forward/backward every micro-batch, then clip, step (or skip a non-finite step), schedule.
        -> the step's metrics on a timed step, {} on the others (their sums stay on the device).

        Host syncs: none per micro-batch (no device collective, no `.item()`, no tensor made from a Python
        number, tests/test_host_sync.py; the signal flag is polled
        on a CPU group, `lifecycle.StopPoll`, also once after the update); per step, one all-reduce of
        the step's sums on the device, read to the host only on a timed step. The non-finite check: with a fused AdamW
        (`optim.fused`, the default) the update is skipped on the device (`found_inf`) and on CUDA the
        skip counters stay there until a timed step; with the for-each AdamW the host decides.
        timed: the step time (tokens/s, MFU) covers this step's GPU work, optimizer included: on CUDA
        a synchronize before the clock starts and before it is read; the metrics are read to the host.
        None: on the steps `run` logs (every logging.log_every and the last)."""
        if timed is None:
            timed = step % self.cfg.logging.log_every == 0 or step == self.cfg.train.steps
        if timed:
            sync_clock(self.d.device)  # the previous step's optimizer kernels are not this step's
        t0 = time.perf_counter()
        peak = peak_flops(self.d.device) if timed else None
        acc = {}
        for mb in batch.micro_batches:
            if self.stops.poll():  # some rank was signalled: this step's gradients are dropped
                self.optimizer.zero_grad(set_to_none=True)
                raise StopRequested
            mb = mb.to(self.d.device)
            loss, sums = self.objective.loss(mb, batch)
            loss.backward()  # FSDP sums the ranks' gradients (llama_posttrain/train/distributed.py)
            _add(acc, loss, sums, mb, self.objective.extrema)
        if peak:  # a CPU sort per micro-batch: only where MFU is logged
            flops = step_flops(
                self.model.config, self.model.head, batch.micro_batches, self.objective.reference_forward
            )
            acc["flops"] = torch.full((), flops, dtype=torch.float64, device=self.d.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, clip))
        reduced = reduce_on_device(acc, self.objective.extrema)  # one collective per step, no host sync
        ok = torch.isfinite(reduced["loss"]) & torch.isfinite(grad_norm)
        self.health.record(step, reduced["loss"], grad_norm)
        if self.fused:  # the update is skipped on the device where not ok; the counters stay there
            self.optimizer.found_inf = (~ok).float()
            self.optimizer.step()
            bad = (~ok).long()
        else:  # the host decides (and the counters are on the CPU)
            finite = bool(ok)
            if finite:
                self.optimizer.step()
            bad = torch.tensor(0 if finite else 1)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.skipped = self.skipped + bad
        self.bad_in_a_row = (self.bad_in_a_row + bad) * bad
        self.worst = torch.maximum(self.worst, self.bad_in_a_row)
        self.signalled = self.stops.poll()  # a signal seen after the update: this step is saved
        if self.read_every_step or timed:  # where the host reads anyway
            bad_on_host = self.fused or not finite  # without fusing, `finite` is the one read of the step
            (self.health.read if bad_on_host else self.health.finite)()  # finite on the host: no 2nd read
            if bad_on_host:  # the counters grow only on a bad step
                self.check_bad_steps(step)
        if not timed:
            return {}
        sync_clock(self.d.device)  # the optimizer step's kernels, queued after the last host sync
        dt = time.perf_counter() - t0
        norm = health.weight_norm(params).to(reduced["loss"])  # |w| after the update
        values = torch.stack([*reduced.values(), norm]).tolist()  # one read to the host
        host = dict(zip(reduced, values))
        self.health.weights(step, values[-1], lr, params)
        self.health.loss(step, host["loss"])
        host = {k: (v if math.isfinite(v) or k not in self.objective.extrema else None) for k, v in host.items()}
        metrics = {
            "loss": host["loss"],
            **summarize(self.objective, host),
            "grad_norm": float(grad_norm),
            "lr": lr,
            **throughput(host, dt, self.d.world_size),
            "peak_memory_gib": peak_memory_gib(self.d.device),
            "skipped_steps": int(self.skipped),
        }
        if peak:  # model FLOPs of all ranks over the step time, against every rank's bf16 peak
            metrics["mfu"] = host["flops"] / dt / (peak * self.d.world_size)
        return metrics

    def check_bad_steps(self, step: int) -> None:
        """Stop after train.max_bad_steps non-finite steps in a row (with the fused optimizer: the most
        in a row since the last check, read at timed steps)."""
        worst = int(self.worst)
        if worst >= self.cfg.train.max_bad_steps:
            raise RuntimeError(f"step {step}: {worst} steps in a row with a non-finite loss or gradient")

    def eval_metrics(self) -> dict:
        return evaluate_objective(self.eval_objective, self.eval_loader, self.model, self.d)

    def save(self, step: int, loader_state: dict) -> None:
        extra = {
            "step": step,
            "skipped": int(self.skipped),
            "scheduler": self.scheduler.state_dict(),
            "loader": loader_state,
        }
        train_state.save(self.run_dir, step, self.model, self.optimizer, extra, self.d.rank, self.cfg.train.keep_last)

    def stop(self, step: int, loader_state: dict):
        """Save the last finished step (unless it is saved already) and exit with 128 + the signal."""
        signum = StopSignal.received or signal.SIGTERM
        if step > self.start and not (self.run_dir / "checkpoints" / f"step_{step:08d}").is_dir():
            self.save(step, loader_state)
        if self.d.is_main:
            write_result(self.run_dir, step, signum)
            print(f"\n{signal.Signals(signum).name}: saved step {step}; rerun the same command to resume", flush=True)
        raise SystemExit(128 + signum)


def run(setup: Setup, objective: Objective, eval_objective: Objective | None = None) -> dict:
    """Train `cfg.train.steps` steps of `setup.model` from `setup.resume_from` (None: a fresh start);
    -> the last metrics. eval_objective: the eval set's loss, if not `objective`'s (DPO's precomputed reference
    table of the eval set). A signal (llama_posttrain/train/lifecycle.py) saves the last finished step and exits."""
    cfg, d, model = setup.cfg, setup.d, setup.model
    train_loader, eval_loader = setup.train_loader, setup.eval_loader
    t = Trainer(cfg, d, model, objective, train_loader, eval_loader, eval_objective or objective)
    t.resume(setup.resume_from)
    params = list(model.parameters())
    t.health.weights(t.start, float(health.weight_norm(params)), cfg.optim.lr, params)  # |w| at the start
    fresh = setup.resume_from is None
    logger = Logger(t.run_dir, cfg.logging, to_dict(cfg), d.is_main, cfg.train.steps, None if fresh else t.start)
    every = cfg.train
    batches, metrics = iter(train_loader), {}
    finished, finished_at = t.start, train_loader.state_dict()  # the last finished step, the loader after it
    with training():
        try:
            if eval_loader is not None and fresh:
                logger.log(0, t.eval_metrics())  # the starting point
            model.train()
            for step in range(t.start + 1, cfg.train.steps + 1):
                batch = next(batches)
                metrics = t.train_step(batch, step)
                finished, finished_at = step, train_loader.state_dict()
                if step % cfg.logging.log_every == 0 or step == cfg.train.steps:
                    logger.log(
                        step, metrics, epoch=train_loader.epoch + train_loader.step / train_loader.steps_per_epoch
                    )
                progress.report(step, cfg.train.steps, "steps")
                if eval_loader is not None and every.eval_every and step % every.eval_every == 0:
                    logger.log(step, t.eval_metrics())
                if every.save_every and step % every.save_every == 0 and step < cfg.train.steps:
                    t.save(step, finished_at)
                if t.signalled:  # seen after the update: the step finished, so it is saved
                    raise StopRequested
            t.stops.close()
            done_before = t.start == cfg.train.steps  # a rerun of a finished run (or one killed while exporting)
            if done_before and d.is_main:
                print(
                    f"{t.run_dir}: trained to step {t.start} before; nothing to train, exporting the model", flush=True
                )
            evaluated = every.eval_every and finished % every.eval_every == 0
            if eval_loader is not None and not done_before and not evaluated:
                final_eval = t.eval_metrics()
                logger.log(cfg.train.steps, final_eval)
                metrics.update(final_eval)
            t.health.read()
            t.health.summary()
            health.check_exportable(model, d, t.run_dir, finished)  # before the final checkpoint too (keep_last)
            if not done_before:  # the final checkpoint, unless it is the one resumed from
                t.save(cfg.train.steps, finished_at)
            hf_dtype = param_dtype(cfg.train.mixed_precision, d.device)
            source = cfg.model.checkpoint  # the export keeps its generation defaults (temperature, top_p, ...)
            train_state.export(model, t.run_dir / "model", d.rank, cfg.train.export_hf, setup.chat, hf_dtype, source)
            if d.is_main:
                write_result(t.run_dir, cfg.train.steps, None)
        except StopRequested:
            t.stops.close()  # every rank is here (they polled alike): no peer leaves the last poll open
            t.stop(finished, finished_at)
        finally:
            logger.finish()
    return metrics
