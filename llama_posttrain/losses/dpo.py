"""Preference losses on (chosen, rejected) pairs; `sigmoid` is Llama 3's DPO and the default.

Each pair comes in as sums and counts: the policy's (and reference's) log-prob sums of the chosen
and rejected responses over the response tokens that are not formatting tokens (header spans and
turn terminators, masked by the caller with `dpo.mask_format`) with the count of those tokens, and
the chosen response's NLL summed over all of its tokens with their count. Every division is here:

    score(y) = log pi(y|x) - log ref(y|x)          the reference losses (sigmoid, hinge, robust)
             = (log pi(y|x) - log ref(y|x)) / |y|  ipo: per token
             = log pi(y|x) / |y|                   simpo: no reference model
    c = beta * score(y_c), r = beta * score(y_r)   the pair's rewards; h = c - r its margin

    L = sum_losses w * (1 / P) * sum_pairs loss(c, r) + alpha * NLL(y_c|x)

with loss(c, r) one of LOSSES below, each with its paper, and w its weight (`dpo.loss` a list with
`dpo.loss_weights`, as TRL's loss_type and loss_weights; one loss: w = 1). `sft` in the list is the NLL
term, weighted by its w in place of alpha (TRL's sft: `nll_norm: token`). The NLL term (Pang et al. 2024, iterative
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
1 / (2 beta)). The caller passes per-pair sums (`PairSums`) and adds the metrics of the policy's
logits (logits/*, token_accuracy, entropy: llama_posttrain/train/dpo_objective.py, where they are computed).

A new loss: a function of (c, r, Hyper) as those below, named as the loss; its row in
llama_posttrain/losses/dpo_names.py `LOSS_KEYS` (the one list of the losses: the hyperparameters it reads,
whether it scores against the reference and per token; no torch there, so that a config error answers at
once; LOSSES below is that table with the functions); a float64 test (tests/test_loss_family.py; against
TRL's code where TRL has the loss: tests/test_dpo_losses_trl.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from llama_posttrain.losses.dpo_names import (
    LOSS_KEYS,
    SFT,
    LossKeys,
    needs_reference,  # noqa: F401 (dpo.needs_reference, as before)
)


class Hyper(NamedTuple):
    """The loss's hyperparameters (llama_posttrain/train/dpo.py DPOSection checks their ranges)."""

    loss: str | Sequence[str] = "sigmoid"  # one of LOSSES, or a list of them (and `sft`)
    loss_weights: Sequence[float] | None = None  # one per loss of the list; None: 1 each
    beta: float = 0.1
    alpha: float = 0.2
    label_smoothing: float = 0.0
    gamma: float = 0.5
    nll_norm: str = "sequence"

    def terms(self) -> list[tuple[str, float]]:
        """(loss name, weight) for each loss."""
        names = [self.loss] if isinstance(self.loss, str) else list(self.loss)
        weights = [1.0] * len(names) if self.loss_weights is None else list(self.loss_weights)
        if len(weights) != len(names):
            raise ValueError(f"dpo.loss_weights {weights} must have one weight per dpo.loss {names}")
        return list(zip(names, weights))


class PairSums(NamedTuple):
    """The policy's side of a micro-batch's pairs, each (P,): log-prob sums of the chosen and rejected
    responses over the tokens of the DPO sums and the count of those tokens; the chosen response's NLL
    (-sum log p over every chosen token) and its token count."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_nll: Tensor
    chosen_nll_tokens: Tensor


def _logsigmoid_loss(h: Tensor, label_smoothing: float) -> Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def sigmoid(c: Tensor, r: Tensor, hp: Hyper) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): -log sigmoid(h). label_smoothing eps > 0:
    conservative DPO (cDPO, Mitchell 2023), the label flipped with probability eps."""
    return _logsigmoid_loss(c - r, hp.label_smoothing)


def ipo(c: Tensor, r: Tensor, hp: Hyper) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): (score_c - score_r - 1 / (2 beta))^2, the
    scores per token (as TRL, whose authors confirmed it with the paper's)."""
    return ((c - r) / hp.beta - 1 / (2 * hp.beta)) ** 2


def hinge(c: Tensor, r: Tensor, hp: Hyper) -> Tensor:
    """SLiC-HF (Zhao et al. 2023, arXiv:2305.10425) calibration loss on the reference log-ratio
    margin (as in the DPO paper's and TRL's `hinge`): max(0, 1 - h), a margin of 1 / beta nats."""
    return F.relu(1 - (c - r))


def robust(c: Tensor, r: Tensor, hp: Hyper) -> Tensor:
    """rDPO (Chowdhury et al. 2024, arXiv:2403.00409): unbiased for labels flipped with probability
    eps = label_smoothing < 0.5: ((1 - eps) * -log sigmoid(h) - eps * -log sigmoid(-h)) / (1 - 2 eps)."""
    h, eps = c - r, hp.label_smoothing
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


def simpo(c: Tensor, r: Tensor, hp: Hyper) -> Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734): no reference model, the per-token log-prob as the
    reward, a target reward margin gamma: -log sigmoid(h - gamma) (label smoothing as in sigmoid)."""
    return _logsigmoid_loss(c - r - hp.gamma, hp.label_smoothing)


def apo_zero(c: Tensor, r: Tensor, hp: Hyper) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): each reward on its own, the chosen
    one up and the rejected one down: (1 - sigmoid(c)) + sigmoid(r). For chosen responses better than the
    policy's own."""
    return (1 - c.sigmoid()) + r.sigmoid()


def nca_pair(c: Tensor, r: Tensor, hp: Hyper) -> Tensor:
    """NCA (Chen et al. 2024, arXiv:2402.05369, eq. 11 with two responses): -log sigmoid(c)
    - 0.5 log sigmoid(-c) - 0.5 log sigmoid(-r), the rewards against an absolute zero, not each other."""
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def bco_pair(c: Tensor, r: Tensor, hp: Hyper) -> Tensor:
    """BCO on pairs (Jung et al. 2024, arXiv:2404.04656): a binary classifier of chosen (reward > 0) and
    rejected: -log sigmoid(c) - log sigmoid(-r). As TRL 1.16 (the paper's and TRL's earlier versions
    shift both rewards by a running mean of the rewards, delta; TRL 1.16 has none)."""
    return -F.logsigmoid(c) - F.logsigmoid(-r)


class PairLoss(NamedTuple):
    fn: Callable[[Tensor, Tensor, Hyper], Tensor]  # (chosen reward (P,), rejected reward (P,), hyper) -> (P,)
    reference: bool = True  # score: log-ratio to the reference model; False: the policy's log-prob alone
    per_token: bool = False  # score divided by the response's token count


def _with_functions(table: dict[str, LossKeys]) -> dict[str, PairLoss]:
    """Each loss of the table (llama_posttrain/losses/dpo_names.py LOSS_KEYS) with the function of its name above."""
    missing = [name for name in table if not callable(globals().get(name))]
    if missing:
        raise ImportError(
            f"llama_posttrain/losses/dpo_names.py LOSS_KEYS: no loss function named {missing} in {__file__}"
        )
    return {name: PairLoss(globals()[name], keys.reference, keys.per_token) for name, keys in table.items()}


LOSSES = _with_functions(LOSS_KEYS)


# logged metric -> (sum, denominator); nll_terms: the pairs (nll_norm: sequence) or chosen tokens (token).
# trl_tokens_per_token: TRL's token count of the step (each response with its own copy of the prompt, as TRL's
# rows are; the caller's sum, llama_posttrain/train/targets.py trl_tokens) per token run (the prompt once); the
# logger's train/num_tokens (TRL's) adds up tokens x this.
RATIOS = {
    **{k: (k, "pairs") for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")},
    **{k: (k, "pairs") for k in ("logps/chosen", "logps/rejected")},
    "nll": ("nll", "nll_terms"),
    **{f"ipo/score_{k}": (f"ipo/score_{k}", "ipo_pairs") for k in ("chosen", "rejected", "margins")},
    "trl_tokens_per_token": ("trl_tokens", "tokens"),
}


DEFAULTS = Hyper()  # Llama 3's: sigmoid, beta 0.1, NLL weight alpha 0.2


def dpo_loss(
    policy: PairSums,
    reference: tuple[Tensor, Tensor] | None,
    num_pairs: int,
    num_chosen_tokens: int,
    hp: Hyper = DEFAULTS,
) -> tuple[Tensor, dict[str, Tensor]]:
    """policy: its per-pair sums; reference: the reference's log-prob sums of (chosen, rejected) over the
    same tokens (None: reference-free losses only). num_pairs, num_chosen_tokens: the whole step's."""
    terms = hp.terms()
    specs = [(LOSSES[name], w) for name, w in terms if name != SFT]
    if not specs:
        raise ValueError(f"dpo.loss {hp.loss!r} has no preference loss (one of {tuple(LOSSES)})")
    with_reference = {spec.reference for spec, _ in specs}
    if len(with_reference) > 1:
        raise ValueError(f"dpo.loss {hp.loss!r} mixes reference-free and reference losses")
    with_reference = with_reference.pop()
    if with_reference and reference is None:
        raise ValueError(f"loss {hp.loss!r} needs the reference log-probs")

    rewards = {}  # per_token -> (chosen, rejected) rewards (P,): beta * score

    def reward(per_token: bool) -> tuple[Tensor, Tensor]:
        if per_token not in rewards:
            c, r = policy.chosen, policy.rejected
            if with_reference:
                c, r = c - reference[0], r - reference[1]
            if per_token:
                c, r = c / policy.chosen_tokens.clamp(min=1), r / policy.rejected_tokens.clamp(min=1)
            rewards[per_token] = hp.beta * c, hp.beta * r
        return rewards[per_token]

    pairs = max(num_pairs, 1)
    total = None
    for spec, weight in specs:
        term = spec.fn(*reward(spec.per_token), hp).sum() / pairs
        term = term if weight == 1 else weight * term
        total = term if total is None else total + term
    alpha = sum(w for name, w in terms if name == SFT) or hp.alpha  # `sft` listed: its weight (dpo.alpha 0)
    n = len(policy.chosen)
    if hp.nll_norm == "sequence":
        nll = policy.chosen_nll / policy.chosen_nll_tokens.clamp(min=1)
        nll_terms, nll_denominator = policy.chosen.new_full((), n), pairs
    elif hp.nll_norm == "token":
        nll, nll_terms, nll_denominator = policy.chosen_nll, policy.chosen_nll_tokens.sum(), max(num_chosen_tokens, 1)
    else:
        raise ValueError(f"nll_norm must be 'sequence' or 'token', got {hp.nll_norm!r}")
    if alpha:
        total = total + alpha * nll.sum() / nll_denominator
    # TRL's rewards/*: DPOTrainer's beta x the summed log-ratio; reference-free (CPOTrainer's): the loss's own
    cr, rr = (x.detach() for x in reward(not with_reference))
    sums = {
        "pairs": policy.chosen.new_full((), n),  # made on the device: no host-to-device copy
        "rewards/chosen": cr.sum(),
        "rewards/rejected": rr.sum(),
        "rewards/margins": (cr - rr).sum(),
        "rewards/accuracies": (cr > rr).sum().to(cr.dtype),
        "logps/chosen": policy.chosen.detach().sum(),
        "logps/rejected": policy.rejected.detach().sum(),
        "nll": nll.detach().sum(),
        "nll_terms": nll_terms,
        "chosen_tokens": policy.chosen_tokens.sum(),
        "rejected_tokens": policy.rejected_tokens.sum(),
    }
    if with_reference and any(spec.per_token for spec, _ in specs):  # ipo: its per-token scores
        sc, sr = (x.detach() / hp.beta for x in reward(True))
        sums |= {"ipo_pairs": sums["pairs"], "ipo/score_chosen": sc.sum(), "ipo/score_rejected": sr.sum()}
        sums["ipo/score_margins"] = (sc - sr).sum()
    return total, sums
