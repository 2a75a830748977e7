"""The contract every log-prob backend implements, and the naive formula that defines it.

    target_logprobs(hidden [N, H], weight [V, H], targets [N]) -> [N]
    out[i] = log softmax(hidden[i] @ weight.T)[targets[i]]      (0 where targets[i] == IGNORE)

in fp32 (fp64 for fp64 inputs). `naive_target_logprobs` writes the formula out and materializes the
[N, V] logits: it is what tests and benchmarks compare the backends against, not a training path.

stats=True: a `TokenStats` instead, the log-probs (the same numbers, the same gradients) and three
statistics of each row's logits, without a gradient (the dashboards' token accuracy, mean logit and
entropy, TRL's `mean_token_accuracy`, `logits/*` and `entropy`):

    is_argmax[i] = logits[i, targets[i]] >= max_v logits[i, v]     a tie with the max counts as a hit
    logit_sum[i] = sum_v logits[i, v]
    entropy[i]   = -sum_v p[i, v] log p[i, v] = lse[i] - sum_v p[i, v] logits[i, v],   p = softmax(logits[i])

(False and 0 where targets[i] == IGNORE).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE = -100


class TokenStats(NamedTuple):
    logprobs: Tensor  # (N,) log p(target), fp32 (fp64 for fp64 inputs); differentiable
    is_argmax: Tensor  # (N,) bool: the target's logit is the row's largest (ties included)
    logit_sum: Tensor  # (N,) the row's logits summed over the vocabulary, in the log-probs' dtype
    entropy: Tensor  # (N,) the entropy of the row's softmax in nats, in the log-probs' dtype


def check_shapes(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    """The one shape check of every backend: hidden (N, H), weight (V, H), targets (N,)."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be (N,) with N = {hidden.shape[0]}")


def naive_target_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, stats: bool = False):
    """The formula as written (full [N, V] logits, autograd's backward)."""
    check_shapes(hidden, weight, targets)
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))
    valid = targets != IGNORE
    out = torch.where(valid, logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1), 0.0)
    if not stats:
        return out
    logits = logits.detach()
    target_logit = logits.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    is_argmax = valid & (target_logit >= logits.max(-1).values)
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    return TokenStats(out, is_argmax, torch.where(valid, logits.sum(-1), 0.0), torch.where(valid, entropy, 0.0))
