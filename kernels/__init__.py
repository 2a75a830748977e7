"""Kernels for the log-prob hot path, each beside its pure-torch reference of the same signature.

`target_logprobs(hidden [N, H], weight [V, H], targets [N]) -> [N]` is the one entry point the
losses use; `backend` picks the implementation (the Triton kernel is the kernels issue's work;
until then every backend runs the chunked torch reference).
"""

from kernels.reference import IGNORE, naive_target_logprobs
from kernels.reference import target_logprobs as torch_target_logprobs

BACKENDS = ("auto", "triton", "torch")


def target_logprobs(hidden, weight, targets, backend: str = "auto"):
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernels backend {backend!r}; expected one of {BACKENDS}")
    if backend == "triton":
        raise NotImplementedError("the Triton target_logprobs kernel is not written yet; use kernels: torch")
    return torch_target_logprobs(hidden, weight, targets)


__all__ = ["BACKENDS", "IGNORE", "naive_target_logprobs", "target_logprobs", "torch_target_logprobs"]
