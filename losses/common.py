"""Glue from a packed micro-batch to per-target log-probs and per-sequence sums."""

from __future__ import annotations

from torch import Tensor

import kernels
from data.rows import Batch


def target_logps(hidden: Tensor, weight: Tensor, batch: Batch, backend: str = "auto") -> Tensor:
    """hidden (B, T, H) from model.trunk -> log p(target) (N,) in fp32.

    Only the N hidden states that predict a target reach the vocabulary projection.
    """
    h = hidden.flatten(0, 1)[batch.target_index]  # (N, H)
    return kernels.target_logprobs(h, weight, batch.target_token, backend=backend)


def sequence_sums(values: Tensor, seq: Tensor, num_seqs: int, mask: Tensor | None = None) -> Tensor:
    """Sum values (N,) into their sequences (S,), optionally only where mask (N,) is true."""
    if mask is not None:
        values = values * mask
    return values.new_zeros(num_seqs).index_add(0, seq, values)
