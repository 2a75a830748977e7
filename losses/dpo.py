"""DPO as in Llama 3: formatting tokens masked out of the log-probs, plus an NLL term on chosen.

With log-probs summed over the response tokens that are not formatting tokens (header spans and
turn terminators of the chat format),

    h = beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)))
    L = (1 - eps) * -log sigmoid(h) + eps * -log sigmoid(-h) + alpha * NLL(y_c|x)

beta = 0.1, alpha = 0.2 by default (Llama 3); eps is cDPO label smoothing (0 = off). The NLL
keeps the formatting tokens and is length-normalized per sequence, -log pi(y_c|x) / |y_c|
(Pang et al., iterative RPO); `nll_norm="token"` divides the step's summed NLL by its number of
chosen tokens instead. Means over pairs divide by the whole step's pair count (`num_pairs`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from data.rows import Batch
from losses.common import sequence_sums


def dpo_pairs(batch: Batch) -> tuple[Tensor, Tensor]:
    """Sequence indices of (chosen, rejected) per group: rank 0 against rank 1."""
    return (batch.seq_rank == 0).nonzero().squeeze(-1), (batch.seq_rank == 1).nonzero().squeeze(-1)


def dpo_logps(token_logps: Tensor, batch: Batch, mask_format: bool = True) -> tuple[Tensor, Tensor]:
    """token_logps (N,) -> summed log-probs (chosen (P,), rejected (P,)), formatting tokens masked."""
    keep = ~batch.target_format if mask_format else None
    seq = sequence_sums(token_logps, batch.target_seq, len(batch.seq_rank), keep)
    chosen, rejected = dpo_pairs(batch)
    return seq[chosen], seq[rejected]


def chosen_nll(token_logps: Tensor, batch: Batch, nll_norm: str = "sequence") -> tuple[Tensor, Tensor]:
    """-> (NLL per chosen sequence (P,), normalized per sequence, or summed for "token"; its token counts)."""
    chosen, _ = dpo_pairs(batch)
    n = len(batch.seq_rank)
    nll = -sequence_sums(token_logps, batch.target_seq, n)[chosen]
    count = sequence_sums(torch.ones_like(token_logps), batch.target_seq, n)[chosen]
    if nll_norm == "sequence":
        return nll / count.clamp(min=1), count
    if nll_norm == "token":
        return nll, count
    raise ValueError(f"nll_norm must be 'sequence' or 'token', got {nll_norm!r}")


def dpo_loss(
    pi_chosen: Tensor,
    pi_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    nll: Tensor | None = None,
    beta: float = 0.1,
    alpha: float = 0.2,
    label_smoothing: float = 0.0,
    num_pairs: int | None = None,
    nll_denominator: float | None = None,
) -> tuple[Tensor, dict]:
    """All inputs (P,) per pair. nll: from `chosen_nll`; nll_denominator: pairs ("sequence") or
    chosen tokens ("token") of the whole step, defaulting to num_pairs."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    pref = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    pairs = max(num_pairs if num_pairs is not None else len(h), 1)
    loss = pref.sum() / pairs
    if nll is not None and alpha:
        loss = loss + alpha * nll.sum() / (nll_denominator or pairs)
    cr, rr = chosen_reward.detach(), rejected_reward.detach()
    metrics = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (cr - rr).mean(),
        "rewards/accuracies": (cr > rr).float().mean(),
        "logps/chosen": pi_chosen.detach().mean(),
        "logps/rejected": pi_rejected.detach().mean(),
        "nll": nll.detach().mean() if nll is not None else h.new_tensor(float("nan")),
        "pairs": len(h),
    }
    return loss, metrics
