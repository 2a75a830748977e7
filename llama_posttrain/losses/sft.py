"""Supervised fine-tuning: cross-entropy on target tokens only (the prompt is masked).

    L = -(1 / N) * sum_{t in targets} log p(y_t | y_<t)

N is the number of target tokens in the whole step: every micro-batch on every rank. Each
micro-batch adds its share, so summing the micro-batch losses (and the gradients across ranks)
gives exactly the loss of one big batch; accumulation and world size do not change it.

Logged beside it (no gradient), with TRL 1.16 SFTTrainer's meanings: `token_accuracy` (TRL's
mean_token_accuracy), the fraction of target tokens whose logit is the largest of the vocabulary (a tie
with the max counts), and `entropy`, the mean over the target tokens of the entropy of the model's
predictive distribution (kernels `TokenStats`).
"""

from __future__ import annotations

from torch import Tensor

# logged metric -> (sum, denominator). "target_tokens", not "tokens": the loop counts every real token of
# the step as "tokens" (llama_posttrain/train/loop.py LOOP_SUMS), so a loss never names its own sums that way.
RATIOS = {
    "nll": ("nll", "target_tokens"),
    "token_accuracy": ("argmax_tokens", "target_tokens"),
    "entropy": ("entropy", "target_tokens"),
}


def sft_loss(
    target_logps: Tensor, num_targets: int, target_is_argmax: Tensor | None = None, target_entropy: Tensor | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """target_logps (N_local,): log p of this micro-batch's targets; num_targets: N of the whole step;
    target_is_argmax (N_local,) bool: the target's logit is its row's max (None: no token_accuracy sum);
    target_entropy (N_local,): the entropy of each target's predictive distribution (None: no entropy sum)."""
    nll_sum = -target_logps.sum()
    loss = nll_sum / max(num_targets, 1)
    sums = {"nll": nll_sum.detach(), "target_tokens": target_logps.new_full((), target_logps.numel())}  # no H2D copy
    if target_is_argmax is not None:
        sums["argmax_tokens"] = target_is_argmax.sum().to(target_logps.dtype)
    if target_entropy is not None:
        sums["entropy"] = target_entropy.detach().sum()
    return loss, sums
