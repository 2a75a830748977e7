"""Triton kernels: target log-probs without writing the [N, V] logits to memory (Cut Cross-Entropy style).

    out[i] = logits[i, t_i] - logsumexp_v logits[i, v],   logits = hidden @ weight.T

Forward: a grid of (token block, vocabulary split). Each program walks its split tile by tile,
computing a [BLOCK_N, BLOCK_V] logits tile in registers (fp32 accumulation over H) and folding it
into an online log-sum-exp (running max m, running sum s) and the target's logit when it falls in
the tile, then writes only those O(N) numbers per split, plus the largest logit of each tile (one
float per tile: the skip map of the backward). Torch combines the splits. stats=True (`TokenStats`):
the target is the argmax where its logit >= the combined running max (no extra work), and two more
per-split numbers are kept in the same pass (STATS, a constexpr: the default kernel is compiled
without them): the running sum of the logits, and the entropy's online sum w = sum_v exp(l_v - m) l_v,
rescaled with s when the running max m grows; torch combines the splits as it does s, and
entropy = lse - w / s (both at the combined max). Tile sizes, warps and
pipeline stages are autotuned on CUDA per (N bucket, V, H, dtype): N rounded up to a power of two
(at least 256), so the first N seen does not fix the tiles for every N; after a key's first call
its config is launched directly, with the grid sized for that config's BLOCK_N. A new N compiles nothing:
N is not a specialized argument (FORWARD_UNSPECIALIZED) and the outputs are 16-byte aligned whatever N, so
one binary per config and STATS serves every N (tests/test_triton_specialization.py counts them).

The forward grid: cdiv(N, BLOCK_N) token blocks x n_splits vocabulary splits, n_splits chosen from
the device's SM count (`_num_sms`) so the last wave of programs is nearly full (>= 90% of the SMs
busy where 16 splits or fewer can do it), with at least two programs per SM when N is small.

Backward, in vocabulary slabs of DL_BYTES of d logits (at least one tile wide):
    d logits = g * (onehot(t) - softmax)            Triton: recomputes each logits tile, writes [N, slab]
    dW[slab] = d logits^T @ H                       one cuBLAS matmul over all N rows (no accumulation)
    dH      += d logits @ W[slab]                   cuBLAS, accumulated over the slabs in fp32
No atomics: no two programs write the same element, so the backward is deterministic run to run.
d logits is written in the input dtype, as autograd feeds it to the matmuls of the naive formula.

Tile skipping (Cut Cross-Entropy's gradient filtering, at fp32 resolution): a (token block,
vocabulary tile) whose largest forward logit is more than 24 ln 2 below the largest logit of every
row of the block has softmax < 2^-24 x that row's largest probability everywhere, below fp32
resolution of the row's largest gradient entry. Its logits are not recomputed; its d logits is
g * onehot. Summed over V columns the dropped terms are bounded like fp32 rounding over V terms,
inside the tests' bound. `backward` returns how many tiles it skipped.

Determinism: without atomics every run with the same tile config gives bitwise the same result
(cuBLAS GEMMs are run-to-run reproducible on one GPU model and library version). The autotuner
picks the config by timing, so two processes may pick different tiles and differ in the last
bits; `deterministic=True` pins one config, so results also agree across processes and runs.

fp32 inputs use IEEE fp32 dot products (no TF32) in Triton; the cuBLAS matmuls follow torch's
TF32 setting (off by default). Same contract as llama_posttrain/kernels/reference.py; an empty input (N == 0)
launches nothing and gives empty log-probs and zero gradients (ranks pad with empty micro-batches).
Offsets into [N, H], [V, H] and d logits are int64 (N * V passes 2^31 at N = 16k, V = 128k).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llama_posttrain.kernels.reference import IGNORE, TokenStats, check_shapes

SKIP_BELOW = 24 * math.log(2)  # a logit this far below its row's max has softmax < 2^-24 of the max's
DL_BYTES = 2**30  # d logits per backward slab: N rows x (slab columns); dW needs no fp32 [V, H] buffer


def _config(bn, bv, bd, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=warps, num_stages=stages)


# Hopper and Ampere. Compiled to cubin on the CPU (triton.compile, Triton 3.9, sm_90a and sm_80,
# 16-byte aligned pointers and H, V divisible by 16 as real launches specialize), these pipeline
# their loads and ptxas reports no register spills in either kernel with bf16 inputs; 128 x 256 x 64
# and a 4-warp 128 x 128 x 64 spill and are left out. Shared memory: stages x (BLOCK_N + BLOCK_V) x
# BLOCK_D x 2 bytes, at most 128 KiB. The first config is the pinned one (deterministic=True).
GPU_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 128, 32, 8, 4),
    _config(64, 256, 64, 8, 3),
    _config(64, 256, 32, 8, 3),
    _config(128, 64, 64, 8, 3),
    _config(64, 128, 64, 4, 4),
]
# The CPU interpreter: one small config (fast tests), and bf16 tiles upcast before tl.dot (the
# interpreter's bf16 dot is wrong): exact bf16 products summed in fp32, as the GPU's MMA does.
INTERPRETER_CONFIG = _config(32, 64, 32, 1, 1)
INTERPRETER_SMS = 4  # the SM count the CPU interpreter plans its grid for (tests patch _num_sms)
MAX_SPLITS = 16  # vocabulary splits per token block, at most
_TUNED: dict = {}  # (N bucket, V, D, dtype, device index) -> the config autotuning picked

# The kernels' parameters are written in rows by role (tensors; sizes; strides; block sizes and flags) and
# each call passes them in the same rows: `# fmt: skip` keeps the rows (the formatter puts one per line).


@triton.jit
def _logits_tile(
    H, W, rn, rv, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """hidden[rn] @ weight[rv].T as a (BLOCK_N, BLOCK_V) fp32 tile, accumulated over D in BLOCK_D steps."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    h_rows = H + rn.to(tl.int64)[:, None] * stride_hn
    w_rows = W + rv.to(tl.int64)[:, None] * stride_wv
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        d_ok = rd < D
        h = tl.load(h_rows + rd[None, :] * stride_hd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_rows + rd[None, :] * stride_wd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return acc


# Triton specializes an integer argument on its value (== 1, divisible by 16) unless it is listed here, and a
# pointer on its 16-byte alignment: each new class is a new compile (autotuning: of every config). N, every
# micro-batch's own, and n_splits, which follows it, only mask rows and index the O(N) outputs: compiled
# unspecialized they give the code of N % 16 != 0, the common case anyway (sm_90a, bf16, every config against
# N % 16 == 0: registers within 2, no spills, the same pipelining; experiments/bench/kernel_compile.py). The rest
# stay specialized: D, V, the strides, v0 and v_slab align the loads of H and W and the d logits stores, and
# v_per_split's divisibility saves registers (unspecialized, two configs spill); none of them changes with N.
FORWARD_UNSPECIALIZED = ("N", "n_splits")
DLOGITS_UNSPECIALIZED = ("N",)


@triton.jit(do_not_specialize=FORWARD_UNSPECIALIZED)
def _forward_kernel(
    H, W, T, M_OUT, S_OUT, TL_OUT, SUM_OUT, W_OUT, TILE_MAX,
    N, V, D, n_splits, v_per_split, N_BUCKET,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    STATS: tl.constexpr = False,
):  # fmt: skip
    # N_BUCKET: only the autotune key (N rounded up to a power of two); the kernel does not read it
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < N
    tgt = tl.load(T + rn, mask=row_ok, other=-1).to(tl.int32)  # int32: an int64 compare per logit costs registers
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    t_logit = tl.zeros([BLOCK_N], tl.float32)
    l_sum = tl.zeros([BLOCK_N], tl.float32)  # STATS: the sum of the split's logits
    w = tl.zeros([BLOCK_N], tl.float32)  # STATS: sum exp(l - m) * l, the entropy's (at the running max m)
    v_start = pid_s * v_per_split  # a multiple of BLOCK_V: tiles line up with the backward's
    v_end = tl.minimum(v_start + v_per_split, V)
    tile_row = TILE_MAX + pid_n.to(tl.int64) * tl.cdiv(V, BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        rv = v0 + tl.arange(0, BLOCK_V)
        col_ok = rv < v_end
        acc = _logits_tile(
            H, W, rn, rv, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd, BLOCK_N, BLOCK_V, BLOCK_D, IEEE, UPCAST
        )  # fmt: skip
        logits = tl.where(col_ok[None, :], acc, float("-inf"))
        tl.store(tile_row + v0 // BLOCK_V, tl.max(tl.max(tl.where(row_ok[:, None], logits, float("-inf")), 1), 0))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        scale = tl.exp(m - m_new)
        p = tl.exp(logits - m_new[:, None])
        s = s * scale + tl.sum(p, axis=1)
        t_logit += tl.sum(tl.where(rv[None, :] == tgt[:, None], acc, 0.0), axis=1)
        if STATS:
            in_split = tl.where(col_ok[None, :], acc, 0.0)  # acc, not logits: p * -inf would be NaN
            l_sum += tl.sum(in_split, axis=1)
            w = w * scale + tl.sum(p * in_split, axis=1)
        m = m_new
    out = rn.to(tl.int64) * n_splits + pid_s
    tl.store(M_OUT + out, m, mask=row_ok)
    tl.store(S_OUT + out, s, mask=row_ok)
    tl.store(TL_OUT + out, t_logit, mask=row_ok)
    if STATS:
        tl.store(SUM_OUT + out, l_sum, mask=row_ok)
        tl.store(W_OUT + out, w, mask=row_ok)


_forward_tuned = triton.autotune(GPU_CONFIGS, key=["N_BUCKET", "V", "D"])(_forward_kernel)  # + dtypes, by Triton


def n_bucket(N: int) -> int:
    """The autotune key's N: the next power of two, at least 256 (one config per bucket)."""
    return max(256, triton.next_power_of_2(max(N, 1)))


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the device (the interpreter: INTERPRETER_SMS)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_size(N: int, V: int, block_n: int, block_v: int, sms: int) -> int:
    """v_per_split (a multiple of block_v) for a grid of cdiv(N, block_n) x n_splits programs on
    `sms` SMs: the fewest splits that give at least two programs per SM (where MAX_SPLITS can) and a
    last wave at least 90% full; else the fullest last wave found."""
    n_blocks, tiles = triton.cdiv(N, block_n), triton.cdiv(V, block_v)
    if n_blocks == 0 or tiles == 0:  # nothing is launched
        return max(1, tiles) * block_v
    most = min(MAX_SPLITS, tiles)
    best, best_fill = triton.cdiv(tiles, most) * block_v, -1.0
    for want in range(1, most + 1):
        v_per = triton.cdiv(tiles, want) * block_v
        programs = n_blocks * triton.cdiv(V, v_per)
        fill = programs / (triton.cdiv(programs, sms) * sms)
        if (programs >= 2 * sms or want == most) and fill >= 0.9:
            return v_per
        if programs >= sms and fill > best_fill + 1e-9:
            best, best_fill = v_per, fill
    return best


@triton.jit(do_not_specialize=DLOGITS_UNSPECIALIZED)
def _dlogits_kernel(
    H, W, T, LSE, ROW_MAX, G, TILE_MAX, SKIPPED, DL,
    N, V, D, v0, v_slab, stride_dl, skip_below,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """d logits of rows [pid_n block] x columns [v0 + pid_v tile] into DL (N, v_slab), input dtype."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rv = v0 + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rn < N
    col_ok = rv < v0 + v_slab
    lse = tl.load(LSE + rn, mask=row_ok, other=0.0)
    g = tl.load(G + rn, mask=row_ok, other=0.0)  # 0 for ignored targets
    tgt = tl.load(T + rn, mask=row_ok, other=-1).to(tl.int32)  # int32: an int64 compare per logit costs registers
    tile = pid_n.to(tl.int64) * tl.cdiv(V, BLOCK_V) + v0 // BLOCK_V + pid_v
    row_max = tl.load(ROW_MAX + rn, mask=row_ok, other=float("inf"))
    if tl.load(TILE_MAX + tile) < tl.min(row_max, 0) - skip_below:  # softmax < 2^-24 of every row's max
        p = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        tl.store(SKIPPED + tile, 1)
    else:
        acc = _logits_tile(
            H, W, rn, rv, row_ok, col_ok, D, stride_hn, stride_hd, stride_wv, stride_wd, BLOCK_N, BLOCK_V, BLOCK_D, IEEE, UPCAST
        )  # fmt: skip
        p = tl.where(col_ok[None, :], tl.exp(acc - lse[:, None]), 0.0)
    onehot = tl.where(rv[None, :] == tgt[:, None], 1.0, 0.0)
    d_logits = g[:, None] * (onehot - p)
    offs = rn.to(tl.int64)[:, None] * stride_dl + (rv - v0)[None, :]
    tl.store(DL + offs, d_logits.to(DL.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _launch_options(hidden: torch.Tensor, cfg: triton.Config) -> dict:
    flags = dict(IEEE=hidden.dtype == torch.float32, UPCAST=hidden.device.type != "cuda")
    return {**flags, **cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _tuned_key(hidden: torch.Tensor, V: int) -> tuple:
    N, D = hidden.shape
    return (n_bucket(N), V, D, hidden.dtype, hidden.device.index)


def _pinned_config(hidden: torch.Tensor, V: int, deterministic: bool) -> triton.Config | None:
    """The config to run with, or None: autotune (CUDA, deterministic=False, a new N bucket)."""
    if hidden.device.type != "cuda":
        return INTERPRETER_CONFIG
    return GPU_CONFIGS[0] if deterministic else _TUNED.get(_tuned_key(hidden, V))


def forward(hidden, weight, targets, v_per_split: int | None = None, deterministic: bool = False, stats=False):
    """-> (log-probs, lse, row max logit (all (N,) fp32), tile max logits (flat, fp32), the tile config);
    stats=True: the log-probs as a TokenStats."""
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = _pinned_config(hidden, V, deterministic)
    candidates = [cfg] if cfg is not None else GPU_CONFIGS
    block_n = min(c.kwargs["BLOCK_N"] for c in candidates)
    block_v = [c.kwargs["BLOCK_V"] for c in candidates]
    if v_per_split is None:  # the grid sized to the SM count (autotuning: for the smallest BLOCK_N)
        v_per_split = split_size(N, V, block_n, max(block_v), _num_sms(hidden.device))
    if v_per_split % max(block_v):
        raise ValueError(f"v_per_split {v_per_split} must be a multiple of every BLOCK_V {block_v}")
    n_splits = triton.cdiv(V, v_per_split)
    # each output starts 16-byte aligned whatever N: a pointer's alignment is specialized too (a recompile)
    outputs, per_output = 5 if stats else 3, triton.cdiv(N * n_splits, 4) * 4
    out = torch.empty(outputs, per_output, dtype=torch.float32, device=hidden.device)
    out = out[:, : N * n_splits].view(outputs, N, n_splits)
    # sized for the smallest tiles; the chosen config uses the first cdiv(N, BN) * cdiv(V, BV) entries
    tile_max = torch.empty(
        triton.cdiv(N, block_n) * triton.cdiv(V, min(block_v)), dtype=torch.float32, device=hidden.device
    )
    if N > 0:
        sums, ws = (out[3], out[4]) if stats else (out[2], out[2])  # written only with stats
        args = (
            hidden,
            weight,
            targets,
            out[0],
            out[1],
            out[2],
            sums,
            ws,
            tile_max,
            N,
            V,
            D,
            n_splits,
            v_per_split,
            n_bucket(N),
        )
        args += (hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1))
        if cfg is None:
            grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), n_splits)  # noqa: E731
            _forward_tuned[grid](*args, IEEE=hidden.dtype == torch.float32, UPCAST=False, STATS=stats)
            cfg = _TUNED[_tuned_key(hidden, V)] = _forward_tuned.best_config
        else:
            grid = (triton.cdiv(N, cfg.kwargs["BLOCK_N"]), n_splits)
            _forward_kernel[grid](*args, **_launch_options(hidden, cfg), STATS=stats)
    m, s, t_logit = out[:3]
    big_m = m.max(dim=1).values  # (N,) the largest logit
    rescale = torch.exp(m - big_m[:, None])  # (N, n_splits) each split's sums to the combined max
    s_total = (s * rescale).sum(1)
    lse = big_m + s_total.log()
    valid = targets != IGNORE
    t_logit = t_logit.sum(1)  # the target's split holds its logit, the others 0: exact
    logp = torch.where(valid, t_logit - lse, 0.0)
    if stats:
        entropy = lse - (out[4] * rescale).sum(1) / s_total
        logp = TokenStats(
            logp, valid & (t_logit >= big_m), torch.where(valid, out[3].sum(1), 0.0), torch.where(valid, entropy, 0.0)
        )
    return logp, lse, big_m, tile_max, cfg or GPU_CONFIGS[0]


def _add_matmul_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (fp32) += a @ b with the products summed in fp32 and no rounding to a's dtype on the way."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:  # cuBLAS bf16 x bf16 -> fp32 (torch's addmm wants acc in the inputs' dtype)
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:  # the CPU interpreter tests: exact bf16 products summed in fp32, as above
        acc.addmm_(a.float(), b.float())


def backward(hidden, weight, targets, lse, row_max, tile_max, cfg, grad, need_dh=True, need_dw=True, slab=None):
    """-> (dH, dW (None where not needed), number of (token block, vocabulary tile) pairs skipped)."""
    N, D = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros(N, D, dtype=torch.float32, device=hidden.device) if need_dh else None
    dw = (torch.empty_like(weight) if N > 0 else torch.zeros_like(weight)) if need_dw else None  # N > 0: all set
    block_n, block_v = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_V"]
    skipped = torch.zeros(triton.cdiv(N, block_n) * triton.cdiv(V, block_v), dtype=torch.int32, device=hidden.device)
    if N > 0:  # nothing to add to the zeros otherwise
        g = torch.where(targets != IGNORE, grad.float(), 0.0).contiguous()
        if slab is None:
            slab = max(1, DL_BYTES // (N * hidden.element_size() * block_v)) * block_v
        if slab % block_v:
            raise ValueError(f"slab {slab} must be a multiple of BLOCK_V {block_v}")
        dl = torch.empty(N, min(slab, V), dtype=hidden.dtype, device=hidden.device)
        for v0 in range(0, V, slab):
            v_slab = min(slab, V - v0)
            _dlogits_kernel[(triton.cdiv(N, block_n), triton.cdiv(v_slab, block_v))](
                hidden, weight, targets, lse, row_max, g, tile_max, skipped, dl,
                N, V, D, v0, v_slab, dl.stride(0), SKIP_BELOW,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                **_launch_options(hidden, cfg),
            )  # fmt: skip
            d = dl[:, :v_slab]
            if need_dw:  # all N rows in one matmul: the slab's dW is rounded once, like autograd's
                torch.mm(d.T, hidden, out=dw[v0 : v0 + v_slab])
            if need_dh:
                _add_matmul_fp32(dh, d, weight[v0 : v0 + v_slab])
    return (dh.to(hidden.dtype) if need_dh else None), dw, skipped.sum()


class TritonTargetLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, deterministic, stats):
        logp, lse, row_max, tile_max, cfg = forward(hidden, weight, targets, deterministic=deterministic, stats=stats)
        ctx.save_for_backward(hidden, weight, targets, lse, row_max, tile_max)
        ctx.cfg = cfg
        if stats:
            ctx.mark_non_differentiable(logp.is_argmax, logp.logit_sum, logp.entropy)
        return tuple(logp) if stats else logp

    @staticmethod
    def backward(ctx, grad_logp, *_):  # the statistics have no gradient
        hidden, weight, targets, lse, row_max, tile_max = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        dh, dw, _ = backward(hidden, weight, targets, lse, row_max, tile_max, ctx.cfg, grad_logp, need_dh, need_dw)
        return dh, dw, None, None, None


def target_logprobs(hidden, weight, targets, deterministic: bool = False, stats: bool = False):
    """log softmax(hidden @ weight.T)[targets] in fp32, fused; IGNORE gives 0 (llama_posttrain/kernels/reference.py).

    deterministic=True pins the tile config instead of autotuning it (module docstring).
    stats=True: a TokenStats (llama_posttrain/kernels/reference.py)."""
    check_shapes(hidden, weight, targets)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    if not (hidden.requires_grad or weight.requires_grad) or not torch.is_grad_enabled():
        return forward(hidden, weight, targets, deterministic=deterministic, stats=stats)[0]  # nothing saved
    out = TritonTargetLogprobs.apply(hidden, weight, targets, deterministic, stats)
    return TokenStats(*out) if stats else out
