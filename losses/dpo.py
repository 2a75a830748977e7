"""DPO as in Llama 3: formatting tokens masked out of the log-probs, plus an NLL term on chosen.

With log-probs summed over the response tokens that are not formatting tokens (header spans and
turn terminators of the chat format),

    h = beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x)))
    L = (1 - eps) * -log sigmoid(h) + eps * -log sigmoid(-h) + alpha * NLL(y_c|x)

beta = 0.1, alpha = 0.2 by default (Llama 3); eps is cDPO label smoothing (0 = off). The NLL
keeps the formatting tokens and is length-normalized per sequence, -log pi(y_c|x) / |y_c|
(Pang et al., iterative RPO), or summed and divided by the step's chosen tokens (`nll_norm:
token`): the caller passes the per-pair NLL and its denominator. Means over pairs divide by the
whole step's pair count (`num_pairs`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

_PER_PAIR = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen")
RATIOS = {k: (k, "pairs") for k in (*_PER_PAIR, "logps/rejected", "nll")}  # logged metric -> (sum, denominator)


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
) -> tuple[Tensor, dict[str, Tensor]]:
    """All inputs (P,) per pair: summed (masked) log-probs of policy and reference; nll per chosen
    sequence. num_pairs / nll_denominator: the whole step's pairs (or chosen tokens), default P."""
    chosen_reward = beta * (pi_chosen - ref_chosen)
    rejected_reward = beta * (pi_rejected - ref_rejected)
    h = chosen_reward - rejected_reward
    pref = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    pairs = max(num_pairs if num_pairs is not None else len(h), 1)
    loss = pref.sum() / pairs
    if nll is not None and alpha:
        loss = loss + alpha * nll.sum() / (nll_denominator or pairs)
    cr, rr = chosen_reward.detach(), rejected_reward.detach()
    sums = {
        "pairs": h.new_tensor(len(h)),
        "rewards/chosen": cr.sum(),
        "rewards/rejected": rr.sum(),
        "rewards/margins": (cr - rr).sum(),
        "rewards/accuracies": (cr > rr).sum().to(h.dtype),
        "logps/chosen": pi_chosen.detach().sum(),
        "logps/rejected": pi_rejected.detach().sum(),
        "nll": nll.detach().sum() if nll is not None else h.new_zeros(()),
    }
    return loss, sums
