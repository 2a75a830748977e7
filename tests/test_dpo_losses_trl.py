"""The DPO losses of two rewards (apo_zero, nca_pair, bco_pair) and `dpo.loss` as a weighted list, against
TRL 1.16's own code on the same float64 inputs: DPOTrainer._compute_loss's per-loss branches (their source
lines, run on our tensors: tests/test_loss_family.py trl_dpo_branch) and its `loss += per_sequence_loss.mean()
* loss_weight` sum over `loss_type` with `loss_weights`.
"""

from types import SimpleNamespace

import pytest
import torch
from test_loss_family import completion_mask, loss_of, pairs, trl_dpo_branch

from llama_posttrain.train.config import load_config
from llama_posttrain.train.dpo import DPOConfig, DPOSection


def trl_per_pair(loss_type: str, x, beta: float) -> torch.Tensor:
    """TRL's per_sequence_loss for loss_type on pairs()'s inputs (reverse KL: the scores are the log-ratios)."""
    pol, (rc, rr) = x["policy"], x["reference"]
    chosen, rejected = pol.chosen - rc, pol.rejected - rr
    return trl_dpo_branch(
        loss_type, self=SimpleNamespace(beta=beta, label_smoothing=0.0), chosen_logratios=chosen,
        rejected_logratios=rejected, chosen_scores=chosen, rejected_scores=rejected, delta_score=chosen - rejected,
        completion_mask=completion_mask(pol.chosen_tokens, pol.rejected_tokens),
    )  # fmt: skip


@pytest.mark.parametrize("loss", ["apo_zero", "nca_pair", "bco_pair"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_of_two_rewards_equals_trl(loss, beta):
    x = pairs(seed=4)
    got, sums = loss_of(x, loss=loss, beta=beta, alpha=0.0)
    assert got.item() == pytest.approx(trl_per_pair(loss, x, beta).mean().item(), abs=1e-12)
    # TRL's rewards/*: beta x the summed log-ratio, as for sigmoid
    pol, (rc, rr) = x["policy"], x["reference"]
    assert sums["rewards/margins"].item() == pytest.approx(
        (beta * ((pol.chosen - rc) - (pol.rejected - rr))).sum().item()
    )


def test_weighted_list_equals_trl_loss_weights():
    """dpo.loss [sigmoid, apo_zero, nca_pair, bco_pair] with loss_weights == TRL's loss_type / loss_weights sum."""
    x, beta = pairs(seed=5), 0.2
    types, weights = ["sigmoid", "apo_zero", "nca_pair", "bco_pair"], [1.0, 0.5, 0.25, 2.0]
    got, _ = loss_of(x, loss=types, loss_weights=weights, beta=beta, alpha=0.0)
    loss = 0.0
    for loss_type, loss_weight in zip(types, weights, strict=True):  # TRL's lines
        per_sequence_loss = trl_per_pair(loss_type, x, beta)
        loss += per_sequence_loss.mean() * loss_weight
    assert got.item() == pytest.approx(loss.item(), abs=1e-12)
    one, _ = loss_of(x, loss="sigmoid", beta=beta, alpha=0.0)  # a one-loss list is that loss, bit for bit
    assert torch.equal(loss_of(x, loss=["sigmoid"], beta=beta, alpha=0.0)[0], one)


def test_a_list_of_losses_from_overrides_and_its_errors():
    cfg = load_config(DPOConfig, None, ["dpo.loss=[sigmoid, sft]", "dpo.loss_weights=[1, 0.2]", "dpo.alpha=0"])
    assert cfg.dpo.loss == ["sigmoid", "sft"] and cfg.dpo.loss_weights == [1.0, 0.2]
    DPOSection(loss=["ipo", "hinge"])  # weights default to 1 each
    bad = {
        "alpha": dict(loss=["sigmoid", "sft"]),  # sft's weight and dpo.alpha would both weight the NLL
        "loss_weights": dict(loss=["sigmoid", "ipo"], loss_weights=[1.0]),
        "reference-free": dict(loss=["simpo", "sigmoid"]),
        "not one of": dict(loss=["sigmoid", "kto"]),
        "not sft": dict(loss=["sft"], alpha=0.0),
        "label_smoothing": dict(loss=["sigmoid", "robust"]),  # robust at 0: plain sigmoid
    }
    for match, kwargs in bad.items():
        with pytest.raises(ValueError, match=match):
            DPOSection(**kwargs)
