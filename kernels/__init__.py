"""Kernels for the log-prob hot path, each beside its pure-torch reference of the same signature.

    target_logprobs(hidden [N, H], weight [V, H], targets [N]) -> [N]

is the one entry point the losses use. `backend`: "torch" runs the chunked reference
(kernels/reference.py), "triton" the fused kernel (kernels/triton_logprobs.py; on CPU tensors
only under TRITON_INTERPRET=1), "auto" Triton on CUDA and torch elsewhere.
"""

import os

from kernels.reference import IGNORE, naive_target_logprobs
from kernels.reference import target_logprobs as torch_target_logprobs

BACKENDS = ("auto", "triton", "torch")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def target_logprobs(hidden, weight, targets, backend: str = "auto"):
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernels backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and _triton_available() else "torch"
    if backend == "torch":
        return torch_target_logprobs(hidden, weight, targets)
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    from kernels.triton_logprobs import target_logprobs as triton_target_logprobs

    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1] or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden (N, H), weight (V, H), targets (N,); got {hidden.shape}, {weight.shape}, {targets.shape}"
        )
    return triton_target_logprobs(hidden, weight, targets)


__all__ = ["BACKENDS", "IGNORE", "naive_target_logprobs", "target_logprobs", "torch_target_logprobs"]
