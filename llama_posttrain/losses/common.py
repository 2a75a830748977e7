"""Per-sequence sums of per-token values: what every loss reduces its targets with."""

from __future__ import annotations

from torch import Tensor


def sequence_sums(values: Tensor, seq: Tensor, num_seqs: int, mask: Tensor | None = None) -> Tensor:
    """Sum values (N,) into their sequences (S,), optionally only where mask (N,) is true."""
    if mask is not None:
        values = values * mask
    return values.new_zeros(num_seqs).index_add(0, seq, values)
