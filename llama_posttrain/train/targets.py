"""From a packed micro-batch (llama_posttrain/data/rows.py `Batch`) to the tensors the losses take.

The losses (losses/) see tensors only; this is the one place that knows the row layout: which
hidden states predict a target, which sequence each target belongs to, where rewards are read,
which sequences are chosen and rejected.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from llama_posttrain import kernels
from llama_posttrain.data.loader import DataLoader
from llama_posttrain.data.rows import Batch
from llama_posttrain.data.schema import STRENGTHS
from llama_posttrain.llama.model import attention_mask
from llama_posttrain.losses import sequence_sums


def target_logps(hidden: Tensor, weight: Tensor, batch: Batch, backend: str = "auto", stats: bool = False):
    """hidden (B, T, H) from model.trunk -> log p(target) (N,) in fp32 (stats: kernels.TokenStats).

    Only the N hidden states that predict a target reach the vocabulary projection.
    """
    h = hidden.flatten(0, 1)[batch.target_hidden_index]  # (N, H)
    return kernels.target_logprobs(h, weight, batch.target_token, backend=backend, stats=stats)


def model_logps(model, batch: Batch, backend: str = "auto", mask=None, stats: bool = False):
    """The model's log p(target) (N,) for every listed target of a micro-batch (fp32); stats=True: a
    kernels.TokenStats, with per target whether it is the argmax and its row's logit sum (no gradient).
    mask: the micro-batch's llama.model.attention_mask, built here unless given (built once by the
    caller for several models on one micro-batch: DPO's policy and reference)."""
    if mask is None:
        mask = attention_mask(batch.doc_ids, batch.branch_ids)
    return model(
        batch.tokens, batch.positions, head_fn=lambda h, w: target_logps(h, w, batch, backend, stats), mask=mask
    )


def scores(rewards: Tensor, batch: Batch) -> Tensor:
    """rewards (B, T) at every position -> (S,) one per sequence, read at its final token.

    fp32 from the reward head (llama.model.RewardHead) and kept so through the ranking loss: a
    reward rounded to bf16 (steps of 0.0078 near 1.6) hides early margins and ties best-of-K picks.
    """
    if rewards.dtype != torch.float32:
        raise TypeError(f"rewards must be fp32 (the fp32 reward head), got {rewards.dtype}")
    return rewards.flatten()[batch.seq_score_index]


def trl_tokens(batch: Batch) -> Tensor:
    """TRL's token count of a micro-batch's responses (its `num_tokens`): each response as its own row with
    its prompt, prompt + response tokens, summed. A response's last position + 1 is that length (positions
    continue from the end of the prompt). Float64, on the device (no host sync)."""
    return (batch.positions.flatten()[batch.seq_score_index] + 1).sum().double()


def strength_margins(group_strength: Tensor, table: dict[str, float]) -> Tensor:
    """(G,) strength indices (-1 unknown) -> (G,) margins by strength name (0 for unknown), fp32. Made on
    the device, a `where` per strength: a table from a Python list would be a blocking host-to-device copy."""
    out = torch.zeros(group_strength.shape, dtype=torch.float32, device=group_strength.device)
    for k, s in enumerate(STRENGTHS):
        out = torch.where(group_strength == k, table[s], out)
    return out


def dpo_pairs(batch: Batch) -> tuple[Tensor, Tensor]:
    """Sequence indices of (chosen, rejected) per group, in group order: rank 0 against rank 1 (every
    DPO group has one of each). A sort on the device by (rank, group): no `nonzero`, so no host sync."""
    num_groups = batch.group_uid.numel()
    order = torch.argsort(batch.seq_rank * num_groups + batch.seq_group, stable=True)
    return order[:num_groups], order[num_groups : 2 * num_groups]


def dpo_logps(token_logps: Tensor, batch: Batch, mask_format: bool = True) -> tuple[Tensor, Tensor]:
    """token_logps (N,) -> summed log-probs (chosen (P,), rejected (P,)), formatting tokens masked."""
    keep = ~batch.target_format if mask_format else None
    seq = sequence_sums(token_logps, batch.target_seq, len(batch.seq_rank), keep)
    chosen, rejected = dpo_pairs(batch)
    return seq[chosen], seq[rejected]


def dpo_lengths(batch: Batch, mask_format: bool = True) -> tuple[Tensor, Tensor]:
    """The token counts of dpo_logps's sums: (chosen (P,), rejected (P,)), fp32."""
    ones = torch.ones(batch.target_seq.shape, dtype=torch.float32, device=batch.target_seq.device)
    return dpo_logps(ones, batch, mask_format)


def chosen_nll(token_logps: Tensor, batch: Batch) -> tuple[Tensor, Tensor]:
    """-> (-sum log p over every token of each chosen sequence (P,), formatting tokens included;
    those token counts (P,)). Not normalized: llama_posttrain/losses/dpo.py divides."""
    chosen, _ = dpo_pairs(batch)
    n = len(batch.seq_rank)
    nll = -sequence_sums(token_logps, batch.target_seq, n)[chosen]
    count = sequence_sums(torch.ones_like(token_logps), batch.target_seq, n)[chosen]
    return nll, count


@torch.no_grad()
def reference_table(ref, loader: DataLoader, backend: str, mask_format: bool, device) -> Tensor:
    """(num_examples, 2) reference log-prob sums of (chosen, rejected) of a DPO set: one pass in
    order, every rank its share of the examples (each computed once), summed over ranks. A step at
    a time: a rank holds one step's micro-batches, not its whole share of the set."""
    every = DataLoader(
        loader.examples, loader.batch_size, loader.max_len, loader.tokens_per_microbatch, loader.rank,
        loader.world_size, shuffle=False, pad_id=loader.pad_id, drop_last=False,
        shape_buckets=loader.shape_buckets,  # the loader's static shapes: a compiled reference sees only those
    )  # fmt: skip
    table = torch.zeros(len(loader.examples), 2, dtype=torch.float32, device=device)
    for step in every.eval_steps():
        for batch in step.micro_batches:
            batch = batch.to(device)
            c, r = dpo_logps(model_logps(ref, batch, backend), batch, mask_format)
            table[batch.group_uid] = torch.stack([c, r], dim=-1).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    return table
