"""Reward-model ranking loss (Bradley-Terry) over 2..k ranked responses per prompt.

    L = (1 / |pairs|) * sum_{(i, j): i ranked above j, same prompt} -log sigmoid(r_i - r_j - m_ij)

A prompt with edited > chosen > rejected contributes 3 pairs. Llama 3 uses no margin (m = 0,
the default); Llama 2's margins by preference strength are available as an option. |pairs| is
passed in (the whole step's count) so accumulation and world size do not change the loss.

`center_rewards` c > 0 adds Eisenstein et al. 2023 (arXiv:2312.09244, eq. 2)'s push towards
mean-zero rewards, TRL's `center_rewards_coefficient` (0.01 recommended there), over the same pairs:

    L += c * (1 / |pairs|) * sum_{(i, j)} (r_i + r_j)^2

Logged beside the ratios: `reward_max` and `reward_min` (TRL's max_reward, min_reward), the largest and
smallest reward of the step's sequences, combined over micro-batches and ranks by max / min (EXTREMA;
a micro-batch without sequences gives -inf / +inf, so it changes neither).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Llama 2, Table 28: margin m(r) by how much better the chosen response is.
LLAMA2_MARGINS = {
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "marginally_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "marginally_better": 0.0},
}

# logged metric -> (sum, denominator); reward_std is derived from reward_sq_mean and reward_mean
RATIOS = {
    "accuracy": ("correct", "pairs"),
    "margin_mean": ("margin", "pairs"),
    "reward_mean": ("reward", "seqs"),
    "reward_sq_mean": ("reward_sq", "seqs"),
}


# sum name -> how the loop combines it over micro-batches and ranks (llama_posttrain/train/loop.py Objective.extrema)
EXTREMA = {"reward_max": "max", "reward_min": "min"}


def pair_matrix(group: Tensor, rank: Tensor) -> Tensor:
    """(S, S) bool, [i, j] true where sequence i is ranked above sequence j of the same group: the loss's
    pairs as a mask, so the loss needs no host sync (a list of pairs has a data-dependent size)."""
    return (group[:, None] == group[None, :]) & (rank[:, None] < rank[None, :])


def ranked_pairs(group: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """All ordered pairs (better i, worse j) of sequences within the same group, as indices (a host sync on
    CUDA: for evaluation, not the training step). -> (P,), (P,)"""
    i, j = pair_matrix(group, rank).nonzero(as_tuple=True)
    return i, j


def ranking_loss(
    rewards: Tensor,
    group: Tensor,
    rank: Tensor,
    *,
    margin: Tensor | None = None,
    num_pairs: int | None = None,
    group_class: Tensor | None = None,
    class_names: tuple[str, ...] = (),
    center_rewards: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """rewards (S,) one per sequence; group (S,), rank (S,) with 0 = best; margin (G,) per group.
    group_class (G,) indexes class_names (e.g. preference strengths; -1: none): the sums then also
    hold `pairs/<name>` and `correct/<name>` per class. center_rewards: c above (0: off).
    Every pair (i, j) is an entry of an (S, S) matrix masked by pair_matrix: S is a micro-batch's sequences."""
    better = pair_matrix(group, rank)  # (S, S)
    diff = rewards[:, None] - rewards[None, :]  # (S, S): r_i - r_j
    m = margin[group][:, None] if margin is not None else 0.0
    n = better.sum()
    pairs = max(num_pairs, 1) if num_pairs is not None else n.clamp(min=1)
    loss = -torch.where(better, F.logsigmoid(diff - m), 0.0).sum() / pairs
    if center_rewards:
        total = rewards[:, None] + rewards[None, :]
        loss = loss + center_rewards * torch.where(better, total**2, 0.0).sum() / pairs
    d, r = diff.detach(), rewards.detach()
    right = better & (d > 0)
    sums = {
        "pairs": n.to(d.dtype),
        "correct": right.sum().to(d.dtype),
        "margin": torch.where(better, d, 0.0).sum(),
        "seqs": r.new_full((), len(r)),
        "reward": r.sum(),
        "reward_sq": (r * r).sum(),
        "reward_max": r.max() if len(r) else r.new_full((), float("-inf")),
        "reward_min": r.min() if len(r) else r.new_full((), float("inf")),
    }
    if class_names:
        pair_class = group_class[group][:, None]  # (S, 1): the class of the better sequence's group (= the pair's)
        for k, name in enumerate(class_names):
            sums[f"pairs/{name}"] = (better & (pair_class == k)).sum().to(d.dtype)
            sums[f"correct/{name}"] = (right & (pair_class == k)).sum().to(d.dtype)
    return loss, sums
