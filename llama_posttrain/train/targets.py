"""From a packed micro-batch (llama_posttrain/data/rows.py `Batch`) to the tensors the losses take.

The losses (losses/) see tensors only; this is the one place that knows the row layout: which
hidden states predict a target, which sequence each target belongs to, where rewards are read,
which sequences are chosen and rejected.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from llama_posttrain import kernels
from llama_posttrain.data.batch import Batch
from llama_posttrain.data.loader import DataLoader
from llama_posttrain.data.schema import STRENGTHS
from llama_posttrain.llama.model import attention_mask
from llama_posttrain.losses.common import sequence_sums
from llama_posttrain.losses.dpo import PairSums


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
        mask = attention_mask(batch.doc_ids, batch.branch_ids, kind=model.attention_kind)
    return model(
        batch.tokens, batch.positions, head_fn=lambda h, w: target_logps(h, w, batch, backend, stats), mask=mask
    )


def scores(rewards: Tensor, batch: Batch) -> Tensor:
    """rewards (B, T) at every position -> (S,) one per sequence, read at its final token.

    fp32 from the reward head (llama/heads.py RewardHead) and kept so through the ranking loss: a
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


class Pairs:
    """A micro-batch's DPO pairs (dpo_pairs: one device sort) and sums over them: per sequence, then
    picked out as (chosen (P,), rejected (P,)). mask_format: the DPO sums leave out the formatting tokens."""

    def __init__(self, batch: Batch, mask_format: bool = True):
        self.batch, self.keep = batch, ~batch.target_format if mask_format else None
        self.chosen, self.rejected = dpo_pairs(batch)

    def sums(self, token_values: Tensor, masked: bool = True) -> tuple[Tensor, Tensor]:
        """token_values (N,) -> their sums over each pair's (chosen, rejected) responses; masked=False: over
        every token, formatting tokens included."""
        b = self.batch
        seq = sequence_sums(token_values, b.target_seq, len(b.seq_rank), self.keep if masked else None)
        return seq[self.chosen], seq[self.rejected]

    def policy(self, token_logps: Tensor) -> PairSums:
        """The losses' per-pair sums of the policy's log p(target) (N,): the DPO sums and their token
        counts (fp32), the chosen NLL over every chosen token (not normalized: losses/dpo.py divides) and
        its token count."""
        ones = torch.ones(self.batch.target_seq.shape, dtype=torch.float32, device=self.batch.target_seq.device)
        chosen, rejected = self.sums(token_logps)
        chosen_tokens, rejected_tokens = self.sums(ones)
        nll = -self.sums(token_logps, masked=False)[0]
        nll_tokens = self.sums(torch.ones_like(token_logps), masked=False)[0]
        return PairSums(chosen, rejected, chosen_tokens, rejected_tokens, nll, nll_tokens)


def dpo_logps(token_logps: Tensor, batch: Batch, mask_format: bool = True) -> tuple[Tensor, Tensor]:
    """token_logps (N,) -> summed log-probs (chosen (P,), rejected (P,)), formatting tokens masked."""
    return Pairs(batch, mask_format).sums(token_logps)


class Reference(Protocol):
    """The reference model's side of the pairs: logps(batch, pairs, mask) -> its log-prob sums of (chosen (P,),
    rejected (P,)) over the DPO sums' tokens; forward: whether that runs a model forward per micro-batch."""

    forward: bool

    def logps(self, batch: Batch, pairs: Pairs, mask) -> tuple[Tensor, Tensor]: ...


class LiveReference:
    """The frozen reference model, run on each micro-batch (no gradient)."""

    forward = True  # a model forward per micro-batch (llama_posttrain/train/loop.py Objective.reference_forward)

    def __init__(self, model, backend: str = "auto"):
        self.model, self.backend = model, backend

    @torch.no_grad()
    def logps(self, batch: Batch, pairs: Pairs, mask) -> tuple[Tensor, Tensor]:
        """The reference's log-prob sums of (chosen (P,), rejected (P,)); mask: the policy's attention mask."""
        return pairs.sums(model_logps(self.model, batch, self.backend, mask))


class PrecomputedReference:
    """The reference's log-prob sums read from reference_table's (num_examples, 2) table, by example."""

    forward = False

    def __init__(self, table: Tensor):
        self.table = table

    def logps(self, batch: Batch, pairs: Pairs, mask) -> tuple[Tensor, Tensor]:
        return self.table[batch.group_uid].unbind(-1)


@torch.no_grad()
def reference_table(ref, loader: DataLoader, backend: str, mask_format: bool, device) -> Tensor:
    """(num_examples, 2) reference log-prob sums of (chosen, rejected) of a DPO set: one pass in
    order, every rank its share of the examples (each computed once), summed over ranks. A step at
    a time: a rank holds one step's micro-batches, not its whole share of the set."""
    every = DataLoader(
        loader.examples,
        loader.batch_size,
        loader.max_len,
        loader.tokens_per_microbatch,
        loader.rank,
        loader.world_size,
        shuffle=False,
        pad_id=loader.pad_id,
        drop_last=False,
        shape_buckets=loader.shape_buckets,  # the loader's static shapes: a compiled reference sees only those
    )
    table = torch.zeros(len(loader.examples), 2, dtype=torch.float32, device=device)
    for step in every.eval_steps():
        for batch in step.micro_batches:
            batch = batch.to(device)
            c, r = dpo_logps(model_logps(ref, batch, backend), batch, mask_format)
            table[batch.group_uid] = torch.stack([c, r], dim=-1).float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(table)
    return table
