"""MFU's two halves: the model FLOPs of a training step (`step_flops`: the trunk's matmuls and the attention
over the keys each query really attends, the head's, x3 for forward and backward, + a live reference's
forward) and the device's dense bf16 peak (`peak_flops`, from the datasheets). The loop (llama_posttrain/train/
loop.py) logs their ratio over the step time on logged steps; experiments/bench/mfu.py takes the same count
(`step_flops_parts`, by part) over the CPU's measured fp32 matmul rate."""

from __future__ import annotations

import torch

from llama_posttrain.llama.heads import HEADS, get_head

# Dense (no sparsity) bf16 peak FLOP/s per GPU, for MFU: NVIDIA's datasheets (their sparse figures
# halved), matched on torch.cuda.get_device_name in this order, the specific names first. H100 SXM5
# reports "NVIDIA H100 80GB HBM3"; an H100 name matching none of these (an unknown board) logs no MFU.
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100 80GB HBM3", 989e12),  # SXM5
    ("H100 SXM", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("GH200", 989e12),
    ("A100", 312e12),  # SXM4 and PCIe, 40 and 80 GB
    ("B200", 2250e12),
]
_UNKNOWN_DEVICES: set[str] = set()  # names already reported as having no known peak


def device_peak_flops(name: str) -> float | None:
    """A device name (torch.cuda.get_device_name) -> its dense bf16 peak FLOP/s, or None if unknown."""
    return next((v for k, v in PEAK_FLOPS if k in name), None)


def peak_flops(device) -> float | None:
    """The device's dense bf16 peak FLOP/s (PEAK_FLOPS by device name); None on the CPU or an unknown
    device (no MFU logged; said once per device name)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = device_peak_flops(name)
    if peak is None and name not in _UNKNOWN_DEVICES:
        _UNKNOWN_DEVICES.add(name)
        print(
            f"MFU not logged: no bf16 peak FLOP/s known for {name!r} (llama_posttrain/train/loop.py PEAK_FLOPS)",
            flush=True,
        )
    return peak


def attended_keys(doc_ids: torch.Tensor, branch_ids: torch.Tensor) -> int:
    """How many (query, key) pairs the row rule lets attend (llama_posttrain/llama/model.py): token i attends j iff
    j <= i, same doc, and branch_j == 0 or branch_j == branch_i; pads (doc < 0) attend nothing.

    Per query: the keys of (its doc, branch 0) up to it, plus, off branch 0, those of (its doc, its
    branch). Each count is a difference of two searchsorted positions in the sorted (group, slot) codes.
    """
    B, T = doc_ids.shape
    real = doc_ids >= 0
    doc, branch = doc_ids.clamp(min=0), branch_ids
    docs, branches = int(doc.max()) + 1 if doc.numel() else 1, int(branch.max()) + 1 if branch.numel() else 1
    row = torch.arange(B)[:, None]
    slot = torch.arange(T)[None, :]

    def group(b):  # a (row, doc, branch) group -> one int64 code
        return (row * docs + doc) * branches + b

    codes = torch.where(real, group(branch) * T + slot, -1).flatten().sort().values

    def upto(b):  # per query: the real keys of group (its row, its doc, b) at slots <= its own
        g = group(b) * T
        return torch.searchsorted(codes, (g + slot).flatten(), right=True) - torch.searchsorted(codes, g.flatten())

    per_query = upto(torch.zeros_like(branch)) + (branch != 0).flatten() * upto(branch)
    return int(per_query[real.flatten()].sum())


def step_flops_parts(config, head: str, micro_batches, reference_forward: bool = False) -> dict[str, int]:
    """`step_flops` by the work it counts: "trunk matmuls" (the blocks' projections), "attention" (scores and
    values over the attended pairs), "head" (the model's head), each x3 for forward and backward, and
    "reference forward" (a live DPO reference: trunk, attention and LM head, forward only; 0 without one)."""
    c, head, lm = config, get_head(head), HEADS["lm"]
    block = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.ffn_dim
    parts = dict.fromkeys(("trunk matmuls", "attention", "head", "reference forward"), 0)
    for mb in micro_batches:
        matmuls = 2 * c.n_layers * block * int((mb.doc_ids >= 0).sum())
        attention = 4 * c.n_layers * c.dim * attended_keys(mb.doc_ids, mb.branch_ids)
        positions, targets = mb.tokens.numel(), mb.target_token.numel()
        parts["trunk matmuls"] += 3 * matmuls
        parts["attention"] += 3 * attention
        parts["head"] += 3 * head.flops(c, positions, targets)
        if reference_forward:
            parts["reference forward"] += matmuls + attention + lm.flops(c, positions, targets)
    return parts


def step_flops(config, head: str, micro_batches, reference_forward: bool = False) -> float:
    """Model FLOPs of one training step over these micro-batches (what ran, not a per-token guess):
    forward + backward = 3x the forward's matmuls, where the forward is
      trunk:     2 * (block matmul params) per real token, + 4 * L * dim per attended (query, key) pair;
      the head:  its `flops` (llama_posttrain/llama/heads.py): the LM head 2 * V * dim per listed target (only
                 the target positions are projected), the reward head 2 * dim per position (all of the rows);
    plus, with a live DPO reference, its forward alone (trunk and LM head, no backward). Embedding
    lookups, norms, activation recomputation and the kernel's logit recomputation are not counted; nor
    is work on pads (their trunk matmuls) or on masked (query, key) pairs, which a dense mask computes too:
    model FLOPs, what the step needs, not what it executes (experiments/bench/mfu.py counts both)."""
    return float(sum(step_flops_parts(config, head, micro_batches, reference_forward).values()))
