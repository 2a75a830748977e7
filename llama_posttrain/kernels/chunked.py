"""The "torch" backend: target log-probs in pure torch, chunked so that it never holds [N, V] logits.

Same contract as llama_posttrain/kernels/reference.py (the naive formula). The forward keeps only the per-row
log-sum-exp; the backward recomputes each chunk's logits:
    d out_i / d logits_i = onehot(t_i) - softmax(logits_i)
so peak extra memory is one [chunk, V] block in fp32. The weight gradient is accumulated in fp32, by fp32
matmuls that follow torch's fp32 matmul setting as every other does: TF32 on CUDA where the user allows it
(torch.set_float32_matmul_precision("high")), IEEE fp32 by default. Not forced on: it would override a user's
"highest", which torch 2.11's settings cannot tell from the default; CUDA's default backend (Triton) computes
the weight gradient as one GEMM in the input dtype anyway.
stats=True: each chunk's logits also give the row max and sum (two reductions of the block already
in memory) and the entropy, -sum p log p with log p = logits - lse (the block shifted in place: one
exp more), for `TokenStats`; the log-probs and the backward are the same operations either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llama_posttrain.kernels.reference import IGNORE, TokenStats, check_shapes

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk


def _chunk_rows(n: int, vocab: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, min(n, CHUNK_BYTES // (4 * vocab)))


class _ChunkedTargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, stats):
        N, V = hidden.shape[0], weight.shape[0]
        rows = _chunk_rows(N, V, chunk_size)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        out = torch.empty(N, dtype=acc, device=hidden.device)
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        if stats:
            is_argmax = torch.empty(N, dtype=torch.bool, device=hidden.device)
            logit_sum = torch.empty(N, dtype=acc, device=hidden.device)
            entropy = torch.empty(N, dtype=acc, device=hidden.device)
        valid = targets != IGNORE
        safe = targets.clamp(min=0)
        for s in range(0, N, rows):
            logits = (hidden[s : s + rows] @ weight.T).to(acc)  # (rows, V)
            lse[s : s + rows] = logits.logsumexp(-1)
            target_logit = logits.gather(-1, safe[s : s + rows, None]).squeeze(-1)  # (rows,)
            out[s : s + rows] = target_logit - lse[s : s + rows]
            if stats:
                is_argmax[s : s + rows] = target_logit >= logits.amax(-1)
                logit_sum[s : s + rows] = logits.sum(-1)
                logp = logits.sub_(lse[s : s + rows, None])  # the block is not needed as logits any more
                entropy[s : s + rows] = -(logp.exp() * logp).sum(-1)
        out = torch.where(valid, out, 0.0)
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.rows = rows
        if not stats:
            return out
        is_argmax, logit_sum = is_argmax & valid, torch.where(valid, logit_sum, 0.0)
        entropy = torch.where(valid, entropy, 0.0)
        ctx.mark_non_differentiable(is_argmax, logit_sum, entropy)
        return out, is_argmax, logit_sum, entropy

    @staticmethod
    def backward(ctx, grad_out, *_):  # the statistics have no gradient
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        rows = ctx.rows
        acc = lse.dtype
        g = torch.where(valid, grad_out.to(acc), 0.0)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], rows):
            h = hidden[s : s + rows]
            # d logits = g * (onehot(target) - softmax), in place in the chunk's logits: no (rows, V) temporaries
            d = (h @ weight.T).to(acc)
            d.sub_(lse[s : s + rows, None]).exp_().mul_(-g[s : s + rows, None])
            d.scatter_add_(-1, safe[s : s + rows, None], g[s : s + rows, None])
            if grad_h is not None:
                grad_h[s : s + rows] = (d.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(d.T, h.to(acc))
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def target_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int | None = None, stats: bool = False
) -> Tensor | TokenStats:
    """log softmax(hidden @ weight.T)[targets] in fp32 (fp64 for fp64 inputs), chunked; IGNORE gives 0.
    stats=True: a TokenStats (llama_posttrain/kernels/reference.py)."""
    check_shapes(hidden, weight, targets)
    out = _ChunkedTargetLogprobs.apply(hidden, weight, targets, chunk_size, stats)
    return TokenStats(*out) if stats else out
