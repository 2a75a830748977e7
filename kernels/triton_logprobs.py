"""Triton kernels: target log-probs without writing the [N, V] logits to memory (Cut Cross-Entropy style).

    out[i] = logits[i, t_i] - logsumexp_v logits[i, v],   logits = hidden @ weight.T

Forward: a grid of (token block, vocabulary split). Each program walks its split tile by tile,
computing a [BLOCK_N, BLOCK_V] logits tile in registers (fp32 accumulation over H) and folding it
into an online log-sum-exp (running max m, running sum s) and the target's logit when it falls in
the tile, then writes only those O(N) numbers per split. Torch combines the splits.

Backward: a grid of (token block, vocabulary block). Each program recomputes its logits tile and
forms d logits = g * (onehot(t) - softmax) in registers, then adds d @ W into dH and d^T @ H into
dW with fp32 atomics. Neither pass ever holds more than a tile of logits; dW is accumulated in fp32.

fp32 inputs use IEEE fp32 dot products (no TF32), so the result tracks torch's fp32 matmul.
Same contract as kernels/reference.py; an empty input (N == 0) launches nothing and gives empty
log-probs and zero gradients (ranks pad with empty micro-batches).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import IGNORE, check_shapes


@triton.jit
def _logits_tile(
    H, W, rn, rv, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """hidden[rn] @ weight[rv].T as a (BLOCK_N, BLOCK_V) fp32 tile, accumulated over D in BLOCK_D steps."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        h = tl.load(
            H + rn[:, None] * stride_hn + rd[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0
        )
        w = tl.load(
            W + rv[:, None] * stride_wv + rd[None, :] * stride_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0
        )
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return acc


@triton.jit
def _forward_kernel(
    H, W, T, M_OUT, S_OUT, TL_OUT,
    N, V, D, n_splits, v_per_split,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    tgt = tl.load(T + rn, mask=row_ok, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t_logit = tl.zeros([BLOCK_N], tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_end, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        col_ok = rv < v_end
        acc = _logits_tile(
            H, W, rn, rv, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd, BLOCK_N, BLOCK_V, BLOCK_D, IEEE, UPCAST
        )  # fmt: skip
        logits = tl.where(col_ok[None, :], acc, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        scale = tl.exp(m - m_new)
        p = tl.exp(logits - m_new[:, None])
        s = s * scale + tl.sum(p, axis=1)
        t_logit += tl.sum(tl.where(rv[None, :] == tgt[:, None], acc, 0.0), axis=1)
        m = m_new
    out = rn * n_splits + pid_s
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(S_OUT + out, s, mask=row_ok)
    tl.store(TL_OUT + out, t_logit, mask=row_ok)


@triton.jit
def _backward_kernel(
    H, W, T, LSE, G, DH, DW,
    N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rn < N
    col_ok = rv < V
    acc = _logits_tile(
        H, W, rn, rv, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd, BLOCK_N, BLOCK_V, BLOCK_D, IEEE, UPCAST
    )  # fmt: skip
    lse = tl.load(LSE + rn, mask=row_ok, other=0.0)
    g = tl.load(G + rn, mask=row_ok, other=0.0)  # 0 for ignored targets
    tgt = tl.load(T + rn, mask=row_ok, other=-1)
    p = tl.where(col_ok[None, :], tl.exp(acc - lse[:, None]), 0.0)
    onehot = tl.where(rv[None, :] == tgt[:, None], 1.0, 0.0)
    d_logits = g[:, None] * (onehot - p)  # (BLOCK_N, BLOCK_V), fp32
    d_in = d_logits.to(H.dtype.element_ty)  # as the MMA sees it: rounded to the input dtype
    if UPCAST:
        d_in = d_in.to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        if NEED_DH:
            w = tl.load(
                W + rv[:, None] * stride_wv + rd[None, :] * stride_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0
            )
            if UPCAST:
                w = w.to(tl.float32)
            if IEEE:
                dh = tl.dot(d_in, w, input_precision="ieee")
            else:
                dh = tl.dot(d_in, w)
            tl.atomic_add(DH + rn[:, None] * D + rd[None, :], dh, mask=row_ok[:, None] & d_ok[None, :])
        if NEED_DW:
            h = tl.load(
                H + rn[:, None] * stride_hn + rd[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0
            )
            if UPCAST:
                h = h.to(tl.float32)
            if IEEE:
                dw = tl.dot(tl.trans(d_in), h, input_precision="ieee")
            else:
                dw = tl.dot(tl.trans(d_in), h)
            tl.atomic_add(DW + rv[:, None] * D + rd[None, :], dw, mask=col_ok[:, None] & d_ok[None, :])


def _blocks(hidden: torch.Tensor) -> dict:
    if hidden.device.type == "cuda":
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, UPCAST=False)
    # The CPU interpreter: small tiles, and bf16 tiles upcast before tl.dot (the interpreter's bf16
    # dot is wrong); exact bf16 products summed in fp32, as the GPU's MMA does.
    return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, UPCAST=True)


def forward(hidden, weight, targets, v_per_split: int | None = None):
    """-> (log-probs (N,), lse (N,)), both fp32."""
    N, D = hidden.shape
    V = weight.shape[0]
    b = _blocks(hidden)
    n_blocks = triton.cdiv(N, b["BLOCK_N"])
    if v_per_split is None:  # enough programs to fill the GPU when N is small
        splits_wanted = max(1, 256 // max(1, n_blocks))
        v_per_split = triton.cdiv(triton.cdiv(V, splits_wanted), b["BLOCK_V"]) * b["BLOCK_V"]
    n_splits = triton.cdiv(V, v_per_split)
    out = torch.empty(3, N, n_splits, dtype=torch.float32, device=hidden.device)
    if N > 0:
        _forward_kernel[(n_blocks, n_splits)](
            hidden, weight, targets, out[0], out[1], out[2],
            N, V, D, n_splits, v_per_split,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            IEEE=hidden.dtype == torch.float32, **b,
        )  # fmt: skip
    m, s, t_logit = out
    big_m = m.max(dim=1).values  # (N,) the largest logit
    lse = big_m + (s * torch.exp(m - big_m[:, None])).sum(1).log()
    logp = torch.where(targets != IGNORE, t_logit.sum(1) - lse, 0.0)
    return logp, lse


def backward(hidden, weight, targets, lse, grad, need_dh=True, need_dw=True):
    N, D = hidden.shape
    V = weight.shape[0]
    b = _blocks(hidden)
    g = torch.where(targets != IGNORE, grad.float(), 0.0).contiguous()
    dh = torch.zeros(N, D, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device) if need_dw else None
    if N > 0:  # nothing to add to the zeros otherwise
        _backward_kernel[(triton.cdiv(N, b["BLOCK_N"]), triton.cdiv(V, b["BLOCK_V"]))](
            hidden, weight, targets, lse, g, dh if need_dh else g, dw if need_dw else g,
            N, V, D,
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            IEEE=hidden.dtype == torch.float32, NEED_DH=need_dh, NEED_DW=need_dw, **b,
        )  # fmt: skip
    return (dh.to(hidden.dtype) if need_dh else None), (dw.to(weight.dtype) if need_dw else None)


class TritonTargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        logp, lse = forward(hidden, weight, targets)
        ctx.save_for_backward(hidden, weight, targets, lse)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, targets, lse = ctx.saved_tensors
        dh, dw = backward(hidden, weight, targets, lse, grad_logp, *ctx.needs_input_grad[:2])
        return dh, dw, None


def target_logprobs(hidden, weight, targets):
    """log softmax(hidden @ weight.T)[targets] in fp32, fused; IGNORE gives 0 (kernels/reference.py)."""
    check_shapes(hidden, weight, targets)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    if not (hidden.requires_grad or weight.requires_grad) or not torch.is_grad_enabled():
        return forward(hidden, weight, targets)[0]  # forward only: nothing saved
    return TritonTargetLogprobs.apply(hidden, weight, targets)
