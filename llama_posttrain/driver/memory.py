"""The per-rank memory of a training step, written out from what the code allocates: the Setting it depends
on (a model's shape, the ranks and sharding, the micro-batch, the dtype, the kernels, the DPO reference), the
bytes of each category (parameters, gradients, optimizer states, gathered blocks, activations, the log-prob
chunk, a live reference's forward) and the step's peak, the largest of three moments (Estimate); what to change
so that it fits (suggest). Plain arithmetic, no torch; plan.py reads a config into a Setting and prints the
report (its docstring lists what each category counts)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GIB = 2**30
CHUNK_BYTES = 64 * 2**20  # llama_posttrain/kernels/chunked.py off the CPU: fp32 logits per block (CPU: less)
DL_BYTES = 2**30  # llama_posttrain/kernels/triton_logprobs.py: d logits per backward slab
BLOCK_V = 128  # the Triton tile width the slab is a multiple of (GPU_CONFIGS)


@dataclass(frozen=True)
class Setting:
    """Everything the estimate depends on (from a config, or written directly)."""

    model: object  # llama.config.ModelConfig
    kind: str = "sft"  # sft | rm | dpo
    nproc: int = 8
    shard_degree: int = 0  # 0 = all ranks
    cpu_offload: bool = False
    device: str = "cuda"
    compute_bytes: int = 2  # 2 = bf16, 4 = fp32
    activation_checkpointing: bool = False
    tokens_per_microbatch: int = 16384
    max_len: int = 4096
    reference: str | None = None  # "model" | "precompute" for DPO
    kernels: str = "triton"  # triton | torch
    targets: int | None = None  # log-prob targets per micro-batch; None: every token (the worst case)
    accumulating: bool = True  # gradients held from an earlier micro-batch of the step; False: one per step

    def __post_init__(
        self,
    ):  # llama_posttrain/data/rows.py plan(): rows per micro-batch, each padded to a multiple of 8
        rows, row_len = max(1, self.tokens_per_microbatch // self.max_len), -(-self.max_len // 8) * 8
        derived = dict(shards=self.shard_degree or self.nproc, rows=rows, row_len=row_len, tokens=rows * row_len)
        derived["n_targets"] = derived["tokens"] if self.targets is None else self.targets
        for name, value in derived.items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class Estimate:
    """Bytes per rank by category, and the step's peak: the largest of three moments (`phases`)."""

    params: int
    grads: int  # all of them, as at the end of the backward
    optimizer: int
    reference: int  # the frozen DPO reference's sharded copy
    gathered: int  # in the backward: blocks in flight, unsharded block grad + fp32 reduce buffer, root, LM head grad
    activations_off: int
    activations_on: int
    logprob_chunk: int
    reference_forward: int  # what the reference's forward gathers: its root and blocks, its forward chunk
    root_gathered: int  # the policy's root, gathered from its forward to the end of its backward
    root_reduce: int  # end of the backward: the root gradient's fp32 reduce-scatter input and output temp
    host: int  # CPU memory per rank (cpu_offload: the sharded state)
    activation_checkpointing: bool
    accumulating: bool

    @property
    def activations(self) -> int:
        return self.activations_on if self.activation_checkpointing else self.activations_off

    @property
    def phases(self) -> dict[str, int]:
        static = self.params + self.optimizer + self.reference
        held = self.grads if self.accumulating else 0  # from the step's earlier micro-batches
        out = {"start of a backward": static + held + self.gathered + self.activations + self.logprob_chunk}
        if self.reference_forward:
            out["reference forward"] = static + held + self.root_gathered + self.activations + self.reference_forward
        out["end of a backward (root gradient reduce)"] = static + self.grads + self.root_reduce
        return out

    @property
    def total(self) -> int:
        return max(self.phases.values())


def param_counts(m, head: str = "lm") -> dict[str, int]:
    """Parameters of one block, the root (embeddings, final norm and the head: the untied LM head's matrix),
    an fp32 head's own FSDP unit (the reward head; llama_posttrain/llama/heads.py), the total."""
    from llama_posttrain.llama.heads import get_head  # torch: not at import (--help)

    spec = get_head(head)
    own = spec.num_params(m)
    root = m.vocab_size * m.dim + m.dim + (0 if spec.fp32 else own)
    unit = own if spec.fp32 else 0
    return {"block": m.block_params, "root": root, "head": unit, "total": m.n_layers * m.block_params + root + unit}


def layer_activation_bytes(m, c: int, device: str, row_len: int) -> int:
    """Bytes autograd saves per token in one block (llama_posttrain/llama/model.py, eager). c: compute dtype bytes.
    Each RMSNorm: its input in fp32, x * rsqrt in c, its output (the next matmul's input) in c, the rsqrt;
    attention: q (rotated), k (rotated), v, the output and its copy for wo in c, fp32 log-sum-exp per head;
    on the CPU the dense mask, repeated over a KV group and made additive in c; SwiGLU: w1, w3, silu and
    product (f each) in c."""
    kv = m.n_kv_heads * m.head_dim
    norms = 2 * (4 * m.dim + 2 * c * m.dim + 4)
    attention = c * (3 * m.dim + 2 * kv) + 4 * m.n_heads
    if device == "cpu":
        attention += (m.n_heads // m.n_kv_heads) * row_len * c
    return norms + attention + 4 * c * m.ffn_dim


def activation_bytes(s: Setting, checkpointing: bool) -> int:
    """One micro-batch's activations at the start of the backward (the peak), every token a target."""
    m, c, n = s.model, s.compute_bytes, s.tokens
    layer = n * layer_activation_bytes(m, c, s.device, s.row_len)
    outside = n * (4 * 8 + 4 * m.head_dim)  # the batch's id tensors, RoPE cos/sin (fp32)
    outside += n * (4 * m.dim + c * m.dim + 4)  # final norm
    outside += n * 4 * m.dim if s.kind == "rm" else s.n_targets * (c * m.dim + 4 + 8)  # fp32 reward input | targets
    if s.device == "cpu":
        outside += s.rows * s.row_len * s.row_len  # the dense bool mask, once per forward
    kept = m.n_layers * n * c * m.dim + layer if checkpointing else m.n_layers * layer  # inputs + one recomputed
    working = n * (2 * c * m.ffn_dim + 4 * m.dim)  # a block's backward, beyond what it frees (measured on the CPU)
    return kept + working + outside


def logprob_chunk_bytes(s: Setting, backward: bool = True) -> int:
    """Working memory of the vocabulary projection (none for the reward head): its backward, or its
    forward alone (a frozen reference's). Torch (llama_posttrain/kernels/chunked.py): fp32 logits, exp temp and d per chunk,
    plus the previous chunk's d when there are several (16 or 12 bytes per logit; 8 forward), the fp32 dW
    accumulator in bf16, dH. Triton: a d logits slab, fp32 dH and its matmul temp, dH cast; O(N) forward."""
    m, c, n = s.model, s.compute_bytes, s.n_targets
    if s.kind == "rm" or n == 0:
        return 0
    if s.kernels == "torch":
        rows = max(1, min(n, CHUNK_BYTES // (4 * m.vocab_size)))
        several = 4 if n > rows else 0
        if not backward:
            return (8 + several + (c if c != 4 else 0)) * rows * m.vocab_size
        return (12 + several) * rows * m.vocab_size + (4 * m.vocab_size * m.dim if c != 4 else 0) + n * m.dim * c
    if not backward:
        return 0
    slab = max(1, DL_BYTES // (n * c * BLOCK_V)) * BLOCK_V
    return n * min(slab, m.vocab_size) * c + n * m.dim * (8 + c)


def estimate(s: Setting) -> Estimate:
    if s.nproc < 1 or s.shards > s.nproc or s.nproc % s.shards:
        raise ValueError(f"train.shard_degree={s.shard_degree} must divide the number of ranks ({s.nproc})")
    m, c = s.model, s.compute_bytes
    counts = param_counts(m, "reward" if s.kind == "rm" else "lm")
    shard = counts["total"] / s.shards
    state = {"params": 4 * shard, "grads": 4 * shard, "optimizer": 8 * shard}
    host = int(sum(state.values())) if s.cpu_offload else 0
    if s.cpu_offload:
        state = dict.fromkeys(state, 0)
    head_grad = 0 if s.kind == "rm" else c * m.vocab_size * m.dim
    gathered = (3 * c + 4) * counts["block"] + c * counts["root"] + head_grad
    reference = reference_forward = 0
    if s.kind == "dpo" and s.reference == "model":
        ref = param_counts(m, "lm")
        reference = c * ref["total"] / s.shards
        host += int(reference) if s.cpu_offload else 0
        reference = 0 if s.cpu_offload else reference
        reference_forward = c * ref["root"] + 2 * c * ref["block"] + logprob_chunk_bytes(s, backward=False)
    return Estimate(
        **{k: int(v) for k, v in state.items()},
        reference=int(reference),
        gathered=int(gathered),
        activations_off=activation_bytes(s, False),
        activations_on=activation_bytes(s, True),
        logprob_chunk=logprob_chunk_bytes(s),
        reference_forward=int(reference_forward),
        root_gathered=c * counts["root"],
        root_reduce=int(4 * counts["root"] * (1 + 1 / s.shards)),
        host=host,
        activation_checkpointing=s.activation_checkpointing,
        accumulating=s.accumulating,
    )


def fits(s: Setting, gpu_gib: float, margin: float = 0.10) -> bool:
    return estimate(s).total <= gpu_gib * GIB * (1 - margin)


def suggest(s: Setting, gpu_gib: float, margin: float = 0.10, gpus_per_node: int = 8, max_nodes: int = 128):
    """What to change so that it fits, cheapest first: more ranks/nodes, activation checkpointing, a smaller
    tokens_per_microbatch, dpo.reference=precompute, CPU offload. -> [(change, Setting)] of single changes
    that fit; if none does, one combination (the cheap ones together, then the fewest nodes)."""
    if fits(s, gpu_gib, margin):
        return []

    def first_fit(trials) -> Setting | None:
        return next((t for t in trials if fits(t, gpu_gib, margin)), None)

    def ranks(b: Setting) -> Setting | None:  # the fewest, whole nodes beyond one, sharded over all (FSDP)
        more = [*range(b.nproc + 1, gpus_per_node + 1)]
        more += [gpus_per_node * k for k in range(max(2, b.nproc // gpus_per_node + 1), max_nodes + 1)]
        return first_fit(dataclasses.replace(b, nproc=n, shard_degree=0) for n in more)

    def smaller_microbatch(b: Setting) -> Setting | None:  # halved until it fits, down to one row
        sizes = sorted({max(b.max_len, b.tokens_per_microbatch >> k) for k in range(1, 40)}, reverse=True)
        return first_fit(dataclasses.replace(b, tokens_per_microbatch=t) for t in sizes if t < b.tokens_per_microbatch)

    fsdp = dataclasses.replace(s, shard_degree=0)  # HSDP: shard over all ranks before adding nodes
    trials = [fsdp if s.shard_degree and fits(fsdp, gpu_gib, margin) else ranks(s)]
    trials += [dataclasses.replace(s, activation_checkpointing=True), smaller_microbatch(s)]
    trials += [dataclasses.replace(s, reference="precompute")] if s.kind == "dpo" else []
    trials += [dataclasses.replace(s, cpu_offload=True)] if s.device == "cuda" else []
    out = [(_describe(s, t, gpus_per_node), t) for t in trials if t is not None and t != s and fits(t, gpu_gib, margin)]
    if out:
        return out
    combined = dataclasses.replace(
        s, activation_checkpointing=True, reference="precompute" if s.kind == "dpo" else s.reference
    )
    smallest = {"tokens_per_microbatch": min(s.tokens_per_microbatch, s.max_len)}
    for change in ({}, smallest, {"cpu_offload": s.device == "cuda"}):
        combined = dataclasses.replace(combined, **change)
        trial = combined if fits(combined, gpu_gib, margin) else ranks(combined)
        if trial is not None:
            return [(_describe(s, trial, gpus_per_node) + ", together", trial)]
    return []


def _describe(s: Setting, t: Setting, gpus_per_node: int = 8) -> str:
    """The changes from s to t, as the flags and overrides that make them."""
    nodes = -(-t.nproc // gpus_per_node)
    changes = {
        f"--nproc {t.nproc} ({nodes} node{'s' * (nodes > 1)} of {gpus_per_node})": t.nproc != s.nproc,
        f"train.shard_degree={t.shard_degree}": t.shard_degree != s.shard_degree,
        "train.activation_checkpointing=true": t.activation_checkpointing != s.activation_checkpointing,
        f"data.tokens_per_microbatch={t.tokens_per_microbatch}": t.tokens_per_microbatch != s.tokens_per_microbatch,
        "dpo.reference=precompute": t.reference != s.reference,
        "train.cpu_offload=true": t.cpu_offload != s.cpu_offload,
    }
    return ", ".join(text for text, changed in changes.items() if changed)
