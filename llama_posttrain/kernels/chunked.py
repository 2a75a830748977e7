"""The "torch" backend: target log-probs in pure torch, in blocks, so that it never holds [N, V] logits.

Same contract as llama_posttrain/kernels/reference.py (the naive formula). The rows go in chunks, and each
chunk's vocabulary in blocks of columns (`_blocks`): the forward keeps only the per-row log-sum-exp, made
online across the blocks (a running max and the sum of exp shifted by it, rescaled when the max grows, as
flash attention does); the backward recomputes each block's logits:
    d out_i / d logits_i = onehot(t_i) - softmax(logits_i)
so peak extra memory is one block in fp32. On the CPU a block is a few MiB (BLOCK_BYTES): the passes over it
after its matmul (max, exp, sums; the softmax and one-hot of the backward) then run in the caches instead of
streaming a 64 MiB chunk through memory several times, which took about a third of the head's time
(experiments/bench/results/mfu.md); each block's weight gradient is written once by the first row chunk (one
chunk of up to MAX_ROWS rows is the usual case), not accumulated. Elsewhere (torch's fallback on an accelerator)
one block spans the vocabulary, as chunks of rows did before. The weight gradient is in fp32, by fp32 matmuls that
follow torch's fp32 matmul setting as every other does: TF32 on CUDA where the user allows it
(torch.set_float32_matmul_precision("high")), IEEE fp32 by default. Not forced on: it would override a user's
"highest", which torch 2.11's settings cannot tell from the default; CUDA's default backend (Triton) computes
the weight gradient as one GEMM in the input dtype anyway.
stats=True: each block also gives the row max and sum and, for the entropy -sum p log p = lse - sum p * logit,
the running sum of exp(logit - max) * logit (rescaled as the exp sum is), for `TokenStats`; the log-probs and
the backward are the same operations either way.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from llama_posttrain.kernels.reference import IGNORE, TokenStats, check_shapes

BLOCK_BYTES = {"cpu": 4 * 2**20, "other": 64 * 2**20}  # fp32 logits per (rows, columns) block
MAX_ROWS = 1024  # rows per chunk on the CPU: a block of at least MIN_COLS columns stays in the caches
MIN_COLS = 512


def _blocks(n: int, vocab: int, device: torch.device, chunk_size: int | None, vocab_block: int | None):
    """(rows per chunk, vocabulary columns per block). On the CPU a block of a few MiB, so that the passes over
    it after its matmul (max, exp, sums; in the backward the softmax and the one-hot) run in the caches, not
    in memory; elsewhere one 64 MiB block across the whole vocabulary where it fits."""
    budget = BLOCK_BYTES["cpu" if device.type == "cpu" else "other"]
    rows = chunk_size or max(1, min(n, MAX_ROWS if device.type == "cpu" else budget // (4 * vocab)))
    cols = vocab_block or min(vocab, max(MIN_COLS, budget // (4 * rows)))
    return rows, cols


class _ChunkedTargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, stats, vocab_block):
        N, V = hidden.shape[0], weight.shape[0]
        rows, cols = _blocks(N, V, hidden.device, chunk_size, vocab_block)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        new = functools.partial(torch.empty, N, dtype=acc, device=hidden.device)
        target_logit, row_max, exp_sum = new(), new(), new()
        if stats:
            logit_sum, exp_logit_sum = new(), new()
        valid = targets != IGNORE
        safe = targets.clamp(min=0)
        for s in range(0, N, rows):
            r = slice(s, s + rows)
            h, t = hidden[r], safe[r]
            m = torch.full_like(target_logit[r], -math.inf)  # the running max, and below the sums shifted by it
            z, tl = torch.zeros_like(m), torch.zeros_like(m)
            if stats:
                ls, zl = torch.zeros_like(m), torch.zeros_like(m)
            for c in range(0, V, cols):
                logits = (h @ weight[c : c + cols].T).to(acc)  # (rows, cols)
                width = logits.shape[1]
                inside = (t >= c) & (t < c + width)
                tl += torch.where(inside, logits.gather(-1, (t - c).clamp(0, width - 1)[:, None]).squeeze(-1), 0.0)
                new_m = torch.maximum(m, logits.amax(-1))
                scale = torch.exp(m - new_m)  # 0 at the first block (m = -inf)
                if stats:
                    ls += logits.sum(-1)
                    p = torch.exp(logits - new_m[:, None])
                    zl = zl * scale + (p * logits).sum(-1)
                    z = z * scale + p.sum(-1)
                else:  # the block is not needed as logits any more
                    z = z * scale + logits.sub_(new_m[:, None]).exp_().sum(-1)
                m = new_m
            target_logit[r], row_max[r], exp_sum[r] = tl, m, z
            if stats:
                logit_sum[r], exp_logit_sum[r] = ls, zl
        lse = row_max + exp_sum.log()
        out = torch.where(valid, target_logit - lse, 0.0)
        ctx.save_for_backward(hidden, weight, safe, valid, lse)
        ctx.rows, ctx.cols = rows, cols
        if not stats:
            return out
        is_argmax = valid & (target_logit >= row_max)
        entropy = torch.where(valid, lse - exp_logit_sum / exp_sum, 0.0)  # lse - sum_v p_v logit_v
        logit_sum = torch.where(valid, logit_sum, 0.0)
        ctx.mark_non_differentiable(is_argmax, logit_sum, entropy)
        return out, is_argmax, logit_sum, entropy

    @staticmethod
    def backward(ctx, grad_out, *_):  # the statistics have no gradient
        hidden, weight, safe, valid, lse = ctx.saved_tensors
        rows, cols = ctx.rows, ctx.cols
        acc = lse.dtype
        N, V = hidden.shape[0], weight.shape[0]
        g = torch.where(valid, grad_out.to(acc), 0.0)
        want_h, want_w = ctx.needs_input_grad[:2]
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if want_h else None
        new_w = torch.empty if N else torch.zeros  # every row of grad_w is written by the first chunk's blocks
        grad_w = new_w(weight.shape, dtype=acc, device=weight.device) if want_w else None
        for s in range(0, N, rows):
            r = slice(s, s + rows)
            h, t, gr = hidden[r], safe[r], g[r]
            h_acc = h.to(acc)
            for c in range(0, V, cols):
                w = weight[c : c + cols]
                # d logits = g * (onehot(target) - softmax), in place in the block's logits: no temporaries
                d = (h @ w.T).to(acc)
                width = d.shape[1]
                d.sub_(lse[r, None]).exp_().mul_(-gr[:, None])
                inside = (t >= c) & (t < c + width)
                d.scatter_add_(-1, (t - c).clamp(0, width - 1)[:, None], torch.where(inside, gr, 0.0)[:, None])
                if grad_h is not None:
                    grad_h[r] += d.to(weight.dtype) @ w
                if grad_w is not None:
                    if s == 0:
                        torch.mm(d.T, h_acc, out=grad_w[c : c + width])
                    else:
                        grad_w[c : c + width].addmm_(d.T, h_acc)
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def target_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int | None = None,
    stats: bool = False,
    vocab_block: int | None = None,
) -> Tensor | TokenStats:
    """log softmax(hidden @ weight.T)[targets] in fp32 (fp64 for fp64 inputs), chunked; IGNORE gives 0.
    chunk_size: rows per chunk, vocab_block: columns per block (None: `_blocks`'s). stats=True: a TokenStats
    (llama_posttrain/kernels/reference.py)."""
    check_shapes(hidden, weight, targets)
    out = _ChunkedTargetLogprobs.apply(hidden, weight, targets, chunk_size, stats, vocab_block)
    return TokenStats(*out) if stats else out
