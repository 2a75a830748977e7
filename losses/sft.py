"""Supervised fine-tuning: cross-entropy on target tokens only (the prompt is masked).

    L = -(1 / N) * sum_{t in targets} log p(y_t | y_<t)

N is the number of target tokens in the whole step: every micro-batch on every rank. Each
micro-batch adds its share, so summing the micro-batch losses (and the gradients across ranks)
gives exactly the loss of one big batch; accumulation and world size do not change it.
"""

from __future__ import annotations

from torch import Tensor

# logged metric -> (sum, denominator). "target_tokens", not "tokens": the loop counts every real token of
# the step as "tokens" (train/loop.py LOOP_SUMS), so a loss never names its own sums that way.
RATIOS = {"nll": ("nll", "target_tokens")}


def sft_loss(target_logps: Tensor, num_targets: int) -> tuple[Tensor, dict[str, Tensor]]:
    """target_logps (N_local,): log p of this micro-batch's targets; num_targets: N of the whole step."""
    nll_sum = -target_logps.sum()
    loss = nll_sum / max(num_targets, 1)
    return loss, {"nll": nll_sum.detach(), "target_tokens": target_logps.new_tensor(target_logps.numel())}
