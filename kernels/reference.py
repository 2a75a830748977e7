"""The contract every log-prob backend implements, and the naive formula that defines it.

    target_logprobs(hidden [N, H], weight [V, H], targets [N]) -> [N]
    out[i] = log softmax(hidden[i] @ weight.T)[targets[i]]      (0 where targets[i] == IGNORE)

in fp32 (fp64 for fp64 inputs). `naive_target_logprobs` writes the formula out and materializes the
[N, V] logits: it is what tests and benchmarks compare the backends against, not a training path.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE = -100


def check_shapes(hidden: Tensor, weight: Tensor, targets: Tensor) -> None:
    """The one shape check of every backend: hidden (N, H), weight (V, H), targets (N,)."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be (N,) with N = {hidden.shape[0]}")


def naive_target_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor) -> Tensor:
    """The formula as written (full [N, V] logits, autograd's backward)."""
    check_shapes(hidden, weight, targets)
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32))
    valid = targets != IGNORE
    out = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    return torch.where(valid, out, 0.0)
