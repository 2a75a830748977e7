"""Preference losses on (chosen, rejected) pairs; `sigmoid` is Llama 3's DPO and the default.

Each pair comes in as sums and counts: the policy's (and reference's) log-prob sums of the chosen
and rejected responses over the response tokens that are not formatting tokens (header spans and
turn terminators, masked by the caller with `dpo.mask_format`) with the count of those tokens, and
the chosen response's NLL summed over all of its tokens with their count. Every division is here:

    score(y) = log pi(y|x) - log ref(y|x)          the reference losses (sigmoid, hinge, robust)
             = (log pi(y|x) - log ref(y|x)) / |y|  ipo: per token
             = log pi(y|x) / |y|                   simpo: no reference model
    h = beta * score(y_c) - beta * score(y_r)      the loss's margin

    L = (1 / P) * sum_pairs loss(h) + alpha * NLL(y_c|x)

with loss(h) one of LOSSES below, each with its paper. The NLL term (Pang et al. 2024, iterative
RPO, as in Llama 3) keeps the formatting tokens. `nll_norm: sequence` divides each chosen sequence's
NLL by its length and averages over the P pairs; `token` divides the NLL summed over every chosen
token by the number of chosen tokens. P and the chosen token count are the whole step's (every
micro-batch on every rank), so accumulation and world size do not change the loss. beta = 0.1,
alpha = 0.2 by default (Llama 3); alpha and the format mask apply to every loss (the papers'
versions: alpha 0, no mask).

Logged beside it (no gradient), under TRL's names with TRL 1.16 DPOTrainer's meanings (with the
reference-free simpo, its CPOTrainer's), each over the tokens of the DPO sums, as TRL's over the tokens
of its loss (`dpo.mask_format: false`: the same tokens as TRL's):

    rewards/chosen = beta * (log pi(y_c|x) - log ref(y_c|x)), summed over the tokens, for every reference
                     loss (ipo too: its per-token scores are ipo/score_*); simpo: beta * log pi(y_c|x) / |y_c|
    rewards/rejected, rewards/margins (chosen - rejected), rewards/accuracies (chosen > rejected): the same
    logps/chosen, logps/rejected: log pi(y|x) summed
    logits/chosen, logits/rejected: the policy's logits averaged over the tokens and the vocabulary
    token_accuracy (TRL's mean_token_accuracy): the chosen tokens whose logit is the vocabulary's largest
    entropy: the policy's mean entropy over the tokens of both responses (kernels `TokenStats`)

and ours, where the loss scores per token with a reference (ipo): ipo/score_chosen, ipo/score_rejected
(the per-token log-ratio score(y) above) and ipo/score_margins (their difference, which IPO pulls to
1 / (2 beta)). The caller passes per-pair sums.

A new loss: a function of h with the signature below, its entry in LOSSES, its name in
llama_posttrain/train/dpo.py's `DPOSection.loss` and its row in `LOSS_HYPERPARAMETERS` there (the
hyperparameters it reads and their allowed values, checked when the config is read; no torch there, so
that a config error answers at once), a float64 test (tests/test_loss_family.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor


def sigmoid(h: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): -log sigmoid(h). label_smoothing eps > 0:
    conservative DPO (cDPO, Mitchell 2023), the label flipped with probability eps."""
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo(h: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): (score_c - score_r - 1 / (2 beta))^2, the
    scores per token (as TRL, whose authors confirmed it with the paper's)."""
    return (h / beta - 1 / (2 * beta)) ** 2


def hinge(h: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """SLiC-HF (Zhao et al. 2023, arXiv:2305.10425) calibration loss on the reference log-ratio
    margin (as in the DPO paper's and TRL's `hinge`): max(0, 1 - h), a margin of 1 / beta nats."""
    return F.relu(1 - h)


def robust(h: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """rDPO (Chowdhury et al. 2024, arXiv:2403.00409): unbiased for labels flipped with probability
    eps = label_smoothing < 0.5: ((1 - eps) * -log sigmoid(h) - eps * -log sigmoid(-h)) / (1 - 2 eps)."""
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


def simpo(h: Tensor, beta: float, label_smoothing: float, gamma: float) -> Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734): no reference model, the per-token log-prob as the
    reward, a target reward margin gamma: -log sigmoid(h - gamma) (label smoothing as in sigmoid)."""
    return sigmoid(h - gamma, beta, label_smoothing, gamma)


class PairLoss(NamedTuple):
    fn: Callable[[Tensor, float, float, float], Tensor]  # (h (P,), beta, label_smoothing, gamma) -> (P,)
    reference: bool = True  # score: log-ratio to the reference model; False: the policy's log-prob alone
    per_token: bool = False  # score divided by the response's token count


LOSSES = {
    "sigmoid": PairLoss(sigmoid),
    "ipo": PairLoss(ipo, per_token=True),
    "hinge": PairLoss(hinge),
    "robust": PairLoss(robust),
    "simpo": PairLoss(simpo, reference=False, per_token=True),
}

# logged metric -> (sum, denominator); nll_terms: the pairs (nll_norm: sequence) or chosen tokens (token).
# trl_tokens_per_token: TRL's token count of the step (each response with its own copy of the prompt, as TRL's
# rows are; the caller's sum, llama_posttrain/train/targets.py trl_tokens) per token run (the prompt once); the
# logger's train/num_tokens (TRL's) adds up tokens x this.
RATIOS = {
    **{k: (k, "pairs") for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")},
    **{k: (k, "pairs") for k in ("logps/chosen", "logps/rejected")},
    "nll": ("nll", "nll_terms"),
    "logits/chosen": ("logits/chosen", "chosen_tokens"),
    "logits/rejected": ("logits/rejected", "rejected_tokens"),
    "token_accuracy": ("argmax_tokens", "chosen_tokens"),
    "entropy": ("entropy", "response_tokens"),
    **{f"ipo/score_{k}": (f"ipo/score_{k}", "ipo_pairs") for k in ("chosen", "rejected", "margins")},
    "trl_tokens_per_token": ("trl_tokens", "tokens"),
}


def dpo_loss(
    *,
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor | None,
    reference_rejected: Tensor | None,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    chosen_nll: Tensor,
    chosen_nll_tokens: Tensor,
    num_pairs: int,
    num_chosen_tokens: int,
    loss: str = "sigmoid",
    beta: float = 0.1,
    alpha: float = 0.2,
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    nll_norm: str = "sequence",
    chosen_mean_logits: Tensor | None = None,
    rejected_mean_logits: Tensor | None = None,
    chosen_argmax_tokens: Tensor | None = None,
    chosen_entropy: Tensor | None = None,
    rejected_entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per pair (P,): policy_* / reference_* log-prob sums (reference None: a reference-free loss),
    chosen_tokens / rejected_tokens the tokens in those sums, chosen_nll = -sum log pi over every
    chosen token and chosen_nll_tokens their count. num_pairs, num_chosen_tokens: the whole step's.
    Metrics only, per pair (P,) over the tokens of the sums (None: not in `sums`): *_mean_logits, each
    token's mean logit over the vocabulary, summed; chosen_argmax_tokens, the chosen tokens that are
    their row's argmax; *_entropy, the tokens' entropies summed (both or neither)."""
    spec = LOSSES[loss]
    if spec.reference and reference_chosen is None:
        raise ValueError(f"loss {loss!r} needs the reference log-probs")

    def score(pi: Tensor, ref: Tensor | None, tokens: Tensor) -> Tensor:
        s = pi - ref if spec.reference else pi
        return s / tokens.clamp(min=1) if spec.per_token else s

    chosen_reward = beta * score(policy_chosen, reference_chosen, chosen_tokens)  # (P,)
    rejected_reward = beta * score(policy_rejected, reference_rejected, rejected_tokens)
    h = chosen_reward - rejected_reward
    pairs = max(num_pairs, 1)
    total = spec.fn(h, beta, label_smoothing, gamma).sum() / pairs
    if nll_norm == "sequence":
        nll, nll_terms, nll_denominator = chosen_nll / chosen_nll_tokens.clamp(min=1), h.new_full((), len(h)), pairs
    elif nll_norm == "token":
        nll, nll_terms, nll_denominator = chosen_nll, chosen_nll_tokens.sum(), max(num_chosen_tokens, 1)
    else:
        raise ValueError(f"nll_norm must be 'sequence' or 'token', got {nll_norm!r}")
    if alpha:
        total = total + alpha * nll.sum() / nll_denominator
    cr, rr = chosen_reward.detach(), rejected_reward.detach()
    if spec.per_token and spec.reference:  # TRL's rewards are beta x the summed log-ratio; the scores are ipo/
        sc, sr = cr / beta, rr / beta
        cr = beta * (policy_chosen - reference_chosen).detach()
        rr = beta * (policy_rejected - reference_rejected).detach()
    sums = {
        "pairs": h.new_full((), len(h)),  # made on the device: no host-to-device copy
        "rewards/chosen": cr.sum(),
        "rewards/rejected": rr.sum(),
        "rewards/margins": (cr - rr).sum(),
        "rewards/accuracies": (cr > rr).sum().to(h.dtype),
        "logps/chosen": policy_chosen.detach().sum(),
        "logps/rejected": policy_rejected.detach().sum(),
        "nll": nll.detach().sum(),
        "nll_terms": nll_terms,
        "chosen_tokens": chosen_tokens.sum(),
        "rejected_tokens": rejected_tokens.sum(),
    }
    for name, value in (("logits/chosen", chosen_mean_logits), ("logits/rejected", rejected_mean_logits),
                        ("argmax_tokens", chosen_argmax_tokens)):  # fmt: skip
        if value is not None:
            sums[name] = value.detach().sum()
    if chosen_entropy is not None:
        sums["entropy"] = (chosen_entropy + rejected_entropy).detach().sum()
        sums["response_tokens"] = sums["chosen_tokens"] + sums["rejected_tokens"]
    if spec.per_token and spec.reference:
        sums |= {"ipo_pairs": sums["pairs"], "ipo/score_chosen": sc.sum(), "ipo/score_rejected": sr.sum()}
        sums["ipo/score_margins"] = (sc - sr).sum()
    return total, sums
