"""The Llama 3 transformer, written out: RMSNorm, RoPE with llama3 scaling, GQA, SwiGLU.

Parameter names follow Meta's reference (`tok_embeddings`, `layers.N.attention.wq`,
`feed_forward.w1`, `attention_norm`, `ffn_norm`, `norm`, `output`) so checkpoints map 1:1.
The model holds no distribution code; FSDP and activation checkpointing are applied from `train/`.

Attention follows the row structure: per token a position, a `doc` id and a `branch` id.
Token i attends token j iff j <= i, doc_i == doc_j and (branch_j == 0 or branch_j == branch_i);
a pad (doc PAD_DOC) attends only itself.
Plain causal rows (no ids given) take SDPA's causal kernel; structured rows use a FlexAttention
block mask on CUDA and, elsewhere, one SDPA per batch of documents gathered from the rows (segments.py;
a dense boolean mask is the reference form), built by `attention_mask` once per micro-batch by the caller
and passed down (`mask=`); the model builds it from the ids only when none is passed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from llama_posttrain.llama.config import PAD_DOC, ModelConfig  # noqa: F401  (PAD_DOC: importable from here too)
from llama_posttrain.llama.heads import HEADS, Head, get_head
from llama_posttrain.llama.segments import Segments, attend_segments

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention: dense masks everywhere
    BlockMask = create_block_mask = flex_attention = None


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(config: ModelConfig, device=None) -> Tensor:
    """Inverse frequencies theta^(-2i/d), rescaled as in Llama 3.1 for long context. (head_dim/2,)"""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    # Wavelengths longer than the original context are slowed by `factor`, shorter ones than
    # original/high_freq_factor are kept, and the band between is interpolated smoothly.
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, interpolated, scaled)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    angles = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]  # (B, T, 1, hd/2)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) by angle pos * inv_freq[i] (Meta's layout)."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, h, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)  # (B, T, h, hd)


def check_token_range(tokens: Tensor, vocab_size: int) -> None:
    """Every id in [0, vocab_size), else ValueError naming the first bad id."""
    if tokens.numel() == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token id {lo if lo < 0 else hi} is out of range for vocab_size {vocab_size}")


# ----------------------------------------------------------------------------- masks


def structure_mask(q_doc, q_branch, q_slot, k_doc, k_branch, k_slot) -> Tensor:
    """Dense form of the attention rule. ids (B, Tq) / (B, Tk), slots (Tq,) / (Tk,) -> (B, 1, Tq, Tk)."""
    causal = k_slot[None, None, :] <= q_slot[None, :, None]
    same_doc = q_doc[:, :, None] == k_doc[:, None, :]
    branch_ok = (k_branch[:, None, :] == 0) | (k_branch[:, None, :] == q_branch[:, :, None])
    real_or_self = (q_doc[:, :, None] >= 0) | (k_slot[None, None, :] == q_slot[None, :, None])  # a pad: itself
    return (causal & same_doc & branch_ok & real_or_self)[:, None]


# torch.compile wrappers of FlexAttention's two functions, made on first use by the two functions below (not
# at import: importing torch._dynamo would cost every process ~1.6 s on the CPU here, FlexAttention or not).
_compiled_flex = _compiled_create_block_mask = None


def compiled_flex():
    """torch.compile(flex_attention), made on first use and kept. `flex_block_mask` makes it, in eager code,
    before a forward's `attend` calls it: made inside a compiled block the wrapper itself would be traced,
    costing an extra compile."""
    global _compiled_flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def compiled_create_block_mask():
    """torch.compile(create_block_mask), made on first use and kept."""
    global _compiled_create_block_mask
    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(create_block_mask)
    return _compiled_create_block_mask


def flex_block_mask(doc: Tensor, branch: Tensor):
    """FlexAttention block mask for the same rule; fully masked tiles are skipped by the kernel.
    Built by a compiled create_block_mask (eager it takes seconds and GiBs at B=8, T=4096), compiled
    with torch's dynamic default: a graph for the first shape, then one with dynamic sizes that the
    later shapes reuse. Over static shapes (B fixed, T in llama_posttrain/data/rows.py `bucket_lengths`) that is two
    compiles in all, not one per T (tests/test_static_shapes.py)."""

    def mask_mod(b, h, q, k):
        rule = (k <= q) & (doc[b, q] == doc[b, k]) & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))
        return rule & ((doc[b, q] >= 0) | (k == q))  # a pad only itself: pad tiles off the diagonal are skipped

    compiled_flex()  # made here, in eager code, for `attend`: made inside a compiled block it would be traced
    B, T = doc.shape
    return compiled_create_block_mask()(mask_mod, B, None, T, T, device=doc.device)


MASK_KINDS = ("flex", "segments", "dense")


def attention_mask(doc_ids: Tensor | None, branch_ids: Tensor | None = None, kind: str | None = None):
    """The attention mask of a micro-batch's rows from their doc and branch ids (B, T) (one of them None: all 0).

    Built once per micro-batch where its forward starts, and passed to every forward on it (the policy's
    and the DPO reference's) and so to every layer. -> None for plain causal rows (both ids None: SDPA's
    causal kernel), else by `kind` (default: "flex" on CUDA, "segments" on the CPU, else "dense"): a FlexAttention
    BlockMask, the rows' documents gathered for one SDPA per batch of them (segments.py), or a dense bool
    mask (B, 1, T, T) for SDPA over whole rows (every score computed: the reference form).
    """
    if doc_ids is None and branch_ids is None:
        return None
    like = doc_ids if doc_ids is not None else branch_ids
    doc = torch.zeros_like(like) if doc_ids is None else doc_ids
    branch = torch.zeros_like(like) if branch_ids is None else branch_ids
    if kind is None:  # segments read the ids on the host: on the CPU only (no device to wait for)
        kind = "flex" if like.is_cuda and create_block_mask is not None else "segments" if like.is_cpu else "dense"
    if kind == "flex":
        if create_block_mask is None:
            raise RuntimeError("kind='flex' needs FlexAttention (torch.nn.attention.flex_attention), absent here")
        return flex_block_mask(doc, branch)
    if kind == "segments":
        return Segments(doc, branch)
    if kind != "dense":
        raise ValueError(f"attention mask kind {kind!r}: one of {', '.join(MASK_KINDS)}")
    slots = torch.arange(like.shape[1], device=like.device)
    return structure_mask(doc, branch, slots, doc, branch, slots)


def attend(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """q (B, nh, Tq, hd), k/v (B, nkv, Tk, hd), mask None (causal) | bool (B, 1, Tq, Tk) | BlockMask | Segments."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return compiled_flex()(q, k, v, block_mask=mask, enable_gqa=True)
    if isinstance(mask, Segments):
        return attend_segments(q, k, v, mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    # GQA without copying k/v: query head h uses kv head g = h // r, so the r query heads of group g
    # become one longer query axis (r t) against that kv head, each copy with the same mask rows.
    r = q.shape[1] // k.shape[1]
    q = rearrange(q, "b (g r) t d -> b g (r t) d", r=r)
    mask = repeat(mask, "b 1 t s -> b 1 (r t) s", r=r)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(y, "b g (r t) d -> b (g r) t d", r=r)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Static per-layer key/value buffers plus each slot's doc and branch id, for decoding.

    Slots are filled left to right; all rows advance together (`length`). Padding is expressed
    with ids: a pad slot gets doc PAD_DOC, which no real token has, so nothing real attends to it.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        shape = (config.n_layers, batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.doc = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.branch = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.length = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k/v (B, nkv, T, hd) at the next T slots; return all filled slots."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def repeat_interleave(self, n: int) -> KVCache:
        """Fan each row out to n consecutive rows (prefill once, sample n continuations)."""
        out = KVCache.__new__(KVCache)
        out.k, out.v = self.k.repeat_interleave(n, dim=1), self.v.repeat_interleave(n, dim=1)
        out.doc, out.branch = self.doc.repeat_interleave(n, dim=0), self.branch.repeat_interleave(n, dim=0)
        out.length = self.length
        return out

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (indices) of the batch, e.g. to drop finished samples."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.doc, self.branch = self.doc[rows], self.branch[rows]


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, S, hd)
        y = attend(q, k, v, mask)  # (B, nh, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # gate
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, config.ffn_dim, bias=False)  # up

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0) -> Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------- model


class Transformer(nn.Module):
    """Llama 3 trunk with a swappable head (llama_posttrain/llama/heads.py): "lm" (logits, tied or untied) or
    "reward" (a scalar). `head` is its name, as checkpoints record it; `head_spec` the Head."""

    # The attention_mask kind its callers build (None: the device's default). Blocks compiled on the CPU want
    # "dense": one static mask per shape, where segments would make a graph per micro-batch's documents.
    attention_kind: str | None = None

    def __init__(self, config: ModelConfig, head: str | Head = "lm"):
        super().__init__()
        self.config = config
        # On the meta device (a model to load weights into, or to shard) no values are drawn: nn.Embedding's own
        # normal_ there runs a Python meta kernel that imports torch._dynamo, ~1 s of every process's start.
        meta = torch.empty(0).is_meta
        weight = torch.empty(config.vocab_size, config.dim) if meta else None
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, _weight=weight)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head, self.head_spec = None, None
        self.set_head(head)
        self.init_weights()

    def set_head(self, head: str | Head) -> None:
        """Swap the head (a name of HEADS or a Head): the old one's module goes, the new one's is made on the
        trunk's device and dtype (and initialised, unless on the meta device or in the constructor)."""
        spec = get_head(head)
        if self.head_spec is not None and self.head_spec.module(self) is not None:
            delattr(self, self.head_spec.attr)
        ref = self.tok_embeddings.weight
        module = spec.build(self.config, device=ref.device, dtype=ref.dtype)
        if module is not None:
            setattr(self, spec.attr, module)
        if self.head is not None and ref.device.type != "meta":
            spec.init_weights(self)
        self.head, self.head_spec = spec.name, spec

    def init_weights(self) -> None:
        """Normal(0, 0.02) weights, residual projections scaled by 1/sqrt(2 * n_layers), unit norms; the head's
        as the head says (llama_posttrain/llama/heads.py). On the meta device: nothing (no values to draw)."""
        if self.tok_embeddings.weight.is_meta:
            return
        std = 0.02
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.feed_forward.w1):
                nn.init.normal_(lin.weight, std=std)
            nn.init.normal_(layer.feed_forward.w3.weight, std=std)
            for lin in (layer.attention.wo, layer.feed_forward.w2):
                nn.init.normal_(lin.weight, std=std / math.sqrt(2 * self.config.n_layers))
            nn.init.ones_(layer.attention_norm.weight)
            nn.init.ones_(layer.ffn_norm.weight)
        nn.init.ones_(self.norm.weight)
        self.head_spec.init_weights(self)

    @property
    def output_weight(self) -> Tensor:
        """The vocabulary projection (V, H), for losses that fuse it with the log-softmax."""
        return HEADS["lm"].weight(self)

    def trunk(
        self, tokens: Tensor, positions=None, doc_ids=None, branch_ids=None, cache: KVCache | None = None, mask=None
    ) -> Tensor:
        """tokens (B, T) -> final normed hidden states (B, T, dim).

        mask: `attention_mask(doc_ids, branch_ids)` of these rows, built once by the caller for every
        forward on the micro-batch; None: built here from the ids. With a KV cache the ids are written
        to it, and the mask (if not given) is the new rows' against every filled slot (dense).
        """
        B, T = tokens.shape
        if tokens.device.type == "cpu":
            # On an accelerator this check would stall every forward and decode step on a host sync:
            # there the ids are checked before they get on it (the tokenizer against vocab_size at
            # start, llama_posttrain/llama/generate.py's prompts), and the embedding's own bounds check stays.
            check_token_range(tokens, self.config.vocab_size)
        start = cache.length if cache is not None else 0
        slots = torch.arange(start, start + T, device=tokens.device)
        if positions is None:
            positions = slots[None].expand(B, T)
        if cache is not None:
            zeros = torch.zeros_like(tokens)
            cache.doc[:, start : start + T] = zeros if doc_ids is None else doc_ids
            cache.branch[:, start : start + T] = zeros if branch_ids is None else branch_ids
            if mask is None:
                kd, kb = cache.doc[:, : start + T], cache.branch[:, : start + T]
                keys = torch.arange(start + T, device=slots.device)
                mask = structure_mask(kd[:, start:], kb[:, start:], slots, kd, kb, keys)  # (B, 1, T, start + T)
        elif mask is None:
            mask = attention_mask(doc_ids, branch_ids, kind=self.attention_kind)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config, tokens.device))
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        return self.norm(h)

    def forward(
        self, tokens: Tensor, positions=None, doc_ids=None, branch_ids=None, cache=None, head_fn=None, mask=None
    ) -> Tensor:
        """LM head: logits (B, T, vocab). Reward head: rewards (B, T), one per position.

        head_fn(hidden (B, T, dim), output_weight (V, dim)) replaces the LM head's projection, so a
        loss can fuse it (e.g. project only the target positions) inside the forward, where a
        sharded model has its weights gathered. mask: see `trunk`.
        """
        h = self.trunk(tokens, positions, doc_ids, branch_ids, cache, mask)
        return self.head_spec.forward(self, h, head_fn)
