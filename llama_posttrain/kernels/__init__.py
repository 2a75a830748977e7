"""The log-prob hot path: per-target log-probs without holding the [N, V] logits.

    target_logprobs(hidden [N, H], weight [V, H], targets [N]) -> [N]

is the one entry point the losses use. Every backend implements the contract of
llama_posttrain/kernels/reference.py, whose naive full-logits formula the tests compare them against.
`backend`: "torch" runs the chunked pure-torch path (llama_posttrain/kernels/chunked.py), "triton" the fused kernel
(llama_posttrain/kernels/triton_logprobs.py; on CPU tensors only under TRITON_INTERPRET=1), "auto" Triton on CUDA
and torch elsewhere. `stats=True` returns a `TokenStats` (llama_posttrain/kernels/reference.py): the same log-probs
with, per row and without a gradient, whether the target's logit is the row's max, the sum of the
row's logits and the entropy of its softmax (from the logits each backend computes anyway: no extra
pass over the vocabulary).
"""

import os

from llama_posttrain.kernels.chunked import target_logprobs as chunked_target_logprobs
from llama_posttrain.kernels.reference import IGNORE, TokenStats, naive_target_logprobs

BACKENDS = ("auto", "triton", "torch")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def target_logprobs(hidden, weight, targets, backend: str = "auto", deterministic: bool = False, stats: bool = False):
    """deterministic: Triton only, pin the tile config instead of autotuning it (results then agree
    bit for bit across processes; llama_posttrain/kernels/triton_logprobs.py). The torch path is deterministic."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernels backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        backend = "triton" if hidden.is_cuda and _triton_available() else "torch"
    if backend == "torch":
        return chunked_target_logprobs(hidden, weight, targets, stats=stats)
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("kernels backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    from llama_posttrain.kernels.triton_logprobs import target_logprobs as triton_target_logprobs

    return triton_target_logprobs(hidden, weight, targets, deterministic=deterministic, stats=stats)


__all__ = ["BACKENDS", "IGNORE", "TokenStats", "chunked_target_logprobs", "naive_target_logprobs", "target_logprobs"]
