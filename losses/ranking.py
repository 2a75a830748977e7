"""Reward-model ranking loss (Bradley-Terry) over 2..k ranked responses per prompt.

    L = (1 / |pairs|) * sum_{(i, j): i ranked above j, same prompt} -log sigmoid(r_i - r_j - m_ij)

A prompt with edited > chosen > rejected contributes 3 pairs. Llama 3 uses no margin (m = 0,
the default); Llama 2's margins by preference strength are available as an option. |pairs| is
passed in (the whole step's count) so accumulation and world size do not change the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from data.schema import STRENGTHS

# Llama 2, Table 28: margin m(r) by how much better the chosen response is.
LLAMA2_MARGINS = {
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "marginally_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "marginally_better": 0.0},
}


def strength_margins(group_strength: Tensor, table: dict[str, float]) -> Tensor:
    """(G,) strength indices (-1 unknown) -> (G,) margins (0 for unknown)."""
    values = torch.tensor([table[s] for s in STRENGTHS] + [0.0], device=group_strength.device)
    return values[group_strength]  # index -1 picks the trailing 0


def ranked_pairs(group: Tensor, rank: Tensor) -> tuple[Tensor, Tensor]:
    """All ordered pairs (better i, worse j) of sequences within the same group. -> (P,), (P,)"""
    better = (group[:, None] == group[None, :]) & (rank[:, None] < rank[None, :])
    i, j = better.nonzero(as_tuple=True)
    return i, j


def ranking_loss(
    rewards: Tensor, group: Tensor, rank: Tensor, margin: Tensor | None = None, num_pairs: int | None = None
) -> tuple[Tensor, dict]:
    """rewards (S,) one per sequence; group (S,), rank (S,) with 0 = best; margin (G,) per group."""
    i, j = ranked_pairs(group, rank)
    diff = rewards[i] - rewards[j]  # (P,)
    m = margin[group[i]] if margin is not None else 0.0
    loss = -F.logsigmoid(diff - m).sum() / max(num_pairs if num_pairs is not None else len(i), 1)
    d = diff.detach()
    metrics = {
        "accuracy": (d > 0).float().mean() if len(d) else d.new_tensor(float("nan")),
        "reward_mean": rewards.detach().mean(),
        "reward_std": rewards.detach().std() if len(rewards) > 1 else rewards.new_tensor(0.0),
        "margin_mean": d.mean() if len(d) else d.new_tensor(float("nan")),
        "pairs": len(i),
    }
    return loss, metrics
