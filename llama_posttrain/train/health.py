"""A run's health, said as it happens: skipped non-finite steps, exploding updates and losses, weights not
fit to export. llama_posttrain/train/loop.py records on the device and calls `read` only where it reads to the
host anyway (every step when the host decides the skip, the logged steps with a fused optimizer), so no
check here adds a host sync per step or per micro-batch. Rank 0 prints; every rank decides alike.

    skipped step      a step whose loss or gradient norm is not finite is skipped by the loop; one line per
                      such step, `step 7: skipped (non-finite loss and gradient norm)`, and the run's end
                      lists them all (`summary`)
    exploding update  the weights' norm |w| is read at every logged step; |w| changing by more than a factor
                      of GROWTH per step since the last reading (or turning non-finite) is an update out of all
                      proportion to the weights. Adam moves each weight by about lr per step (its first step by
                      exactly lr, the gradient's sign), so optim.lr=1e30 takes weights of 0.02 to 1e30 at once,
                      while a sound run changes |w| by well under 1% per step
    exploding loss    a logged loss above the median of the last WINDOW logged ones by more than
                      max(|median|, SPIKE * 1.4826 * MAD): more than double the median and far out of its spread
    export            `non_finite_weights` counts what export would write that is NaN or inf: the loop refuses
"""

from __future__ import annotations

import math
import statistics
import sys
from collections import deque
from pathlib import Path

import torch

from llama_posttrain.train.distributed import all_reduce_sum

GROWTH = 2.0  # |w| may change by at most this factor per step
WINDOW, MIN_HISTORY, SPIKE = 20, 5, 10.0  # the loss's running median: over WINDOW logged losses, once MIN_HISTORY


class Health:
    def __init__(self, is_main: bool, skipped_before: int = 0):
        self.is_main = is_main
        self.pending: list[tuple[int, torch.Tensor]] = []  # (step, (2,) bool on the device: loss, grad non-finite)
        self.skipped: list[tuple[int, str]] = []  # (step, what was non-finite), this process's steps
        self.skipped_before = skipped_before  # the steps skipped before a resume (the checkpoint's count)
        self.norm_at: tuple[int, float] | None = None  # (step, |w|) at the last reading
        self.losses: deque[float] = deque(maxlen=WINDOW)
        self.warnings = {"exploding update": 0, "exploding loss": 0}

    def say(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """A step's loss and grad norm (0-d, on the device): whether each was finite, kept there until `read`."""
        self.pending.append((step, torch.stack([~torch.isfinite(loss), ~torch.isfinite(grad_norm)])))

    def finite(self) -> None:
        """The host already knows every pending step was finite (the CPU optimizer's check): nothing to read."""
        self.pending = []

    def read(self) -> None:
        """The recorded steps' flags to the host (one transfer): a line per skipped step."""
        if not self.pending:
            return
        flags = torch.stack([f for _, f in self.pending]).tolist()
        for (step, _), (loss_bad, grad_bad) in zip(self.pending, flags):
            if loss_bad or grad_bad:
                what = " and ".join(n for n, bad in (("loss", loss_bad), ("gradient norm", grad_bad)) if bad)
                self.skipped.append((step, what))
                self.say(f"step {step}: skipped (non-finite {what}); the weights were not updated")
        self.pending = []

    def weights(self, step: int, norm: float, lr: float, params: list[torch.Tensor]) -> None:
        """|w| after this step's update (a logged step), against the last reading. A float32 |w| that
        overflowed (finite weights of 1e20 and up) is taken again in float64 (rare: the weights exploded)."""
        if not math.isfinite(norm):
            norm = float(weight_norm(params, torch.float64))
        if self.norm_at is not None and math.isfinite(self.norm_at[1]):
            since, before = self.norm_at
            bound = GROWTH ** max(step - since, 1)
            if not (math.isfinite(norm) and before / bound <= norm <= before * bound):
                self.warnings["exploding update"] += 1
                self.say(
                    f"warning: step {step}: the weights' norm went from {before:.4g} (step {since}) to {norm:.4g}, "
                    f"more than x{GROWTH:g} per step: the updates are exploding (this step's lr {lr:.3g}: optim.lr)"
                )
        self.norm_at = (step, norm)

    def loss(self, step: int, value: float) -> None:
        """A logged step's loss, against the running median of those before it."""
        if not math.isfinite(value):
            return  # a skipped step: `read` says so
        if len(self.losses) >= MIN_HISTORY:
            median = statistics.median(self.losses)
            mad = statistics.median(abs(x - median) for x in self.losses)
            if value - median > max(abs(median), SPIKE * 1.4826 * mad):
                self.warnings["exploding loss"] += 1
                self.say(
                    f"warning: step {step}: loss {value:.4g} against a median of {median:.4g} over the last "
                    f"{len(self.losses)} logged steps: the loss is exploding"
                )
        self.losses.append(value)

    def summary(self) -> None:
        """The run's end: the skipped steps and the warnings, if any."""
        total = self.skipped_before + len(self.skipped)
        if total:
            steps = ", ".join(f"step {s} ({what})" for s, what in self.skipped)
            before = f"{self.skipped_before} before the resume" if self.skipped_before else ""
            listed = "; ".join(x for x in (steps, before) if x)
            self.say(f"skipped {total} non-finite steps (train.max_bad_steps in a row stop the run): {listed}")
        for name, n in self.warnings.items():
            if n:
                self.say(f"{n} {name} warning(s): see the lines above")


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p  # a DTensor: this rank's shard


def weight_norm(params: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """|w| of the trained weights, every rank's shards, on the device (0-d; one all-reduce under FSDP, no host
    sync); dtype: computed in it (each tensor cast first)."""
    trained = [p.detach() if dtype is None else p.detach().to(dtype) for p in params if p.requires_grad]
    norm = torch.nn.utils.get_total_norm(trained)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def non_finite_weights(model: torch.nn.Module, device) -> int:
    """The NaN / inf values among the model's weights, every rank's shards counted (one collective)."""
    local = torch.stack([(~torch.isfinite(_local(p))).sum() for p in model.parameters()]).sum()
    return int(all_reduce_sum({"n": local}, device)["n"])


def check_exportable(model: torch.nn.Module, d, run_dir: Path, step: int) -> None:
    """Exit (status 1, an `error:` line from rank 0) if any weight is NaN or inf: nothing is exported, and
    no final checkpoint is written (it could push a finite one out, train.keep_last); those there are kept."""
    bad = non_finite_weights(model, d.device)
    if bad:
        if d.is_main:
            print(
                f"error: {run_dir}: {bad} weights are NaN or inf after step {step}: the model is not exported; "
                f"the checkpoints in {run_dir / 'checkpoints'} are kept",
                file=sys.stderr,
                flush=True,
            )
        raise SystemExit(1)
