"""The DPO loss family (llama_posttrain/losses/dpo.py LOSSES) and the RM's reward centering, each against its formula
written out in float64 and, where TRL has the loss, against TRL's value on the same inputs.

TRL's values come from TRL's own code: DPOTrainer's per-loss branches (their source lines, run on our
tensors: the trainer computes them inline), CPOTrainer.cpo_loss (SimPO) and RewardTrainer.compute_loss
(called with stand-ins for the trainer and model). A new loss copies `test_<loss>_equals_float64_formula`.
"""

import inspect
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_losses import dpo_batch, dpo_inputs, pref

from llama_posttrain.losses.dpo import LOSSES, Hyper, PairSums, dpo_loss
from llama_posttrain.losses.ranking import ranking_loss
from llama_posttrain.train.dpo import DPOSection

P = 6


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def pairs(seed=0):
    """dpo_loss's tensor arguments for P pairs: log-prob sums of responses of 3..40 tokens, float64."""
    g = torch.Generator().manual_seed(seed)
    nc, nr = (torch.randint(3, 40, (P,), generator=g).double() for _ in range(2))  # tokens in the sums
    pc, pr = (-torch.rand(P, generator=g, dtype=torch.float64) * n for n in (nc, nr))
    rc, rr = (x + torch.randn(P, generator=g, dtype=torch.float64) * 4 for x in (pc, pr))
    nll_tokens = nc + 1  # the NLL keeps the terminator the log-prob sums leave out
    policy = PairSums(pc, pr, nc, nr, -pc + 0.5, nll_tokens)
    return dict(policy=policy, reference=(rc, rr), num_pairs=P, num_chosen_tokens=int(nll_tokens.sum()))


def loss_of(x, **hyper):
    """dpo_loss on pairs()'s inputs with these hyperparameters (losses/dpo.py Hyper)."""
    return dpo_loss(**x, hp=Hyper(**hyper))


def part(x, s):
    """pairs()'s inputs of the pairs in slice s."""
    ref = x["reference"] and tuple(t[s] for t in x["reference"])
    return {**x, "policy": PairSums(*(t[s] for t in x["policy"])), "reference": ref}


def margins(x, k):
    """Pair k's log-ratio margin d (summed) and d_tok (per token), and its per-token policy margin s_tok (SimPO's)."""
    pol, (rc, rr) = x["policy"], x["reference"]
    pc, pr, nc, nr = (
        pol.chosen[k].item(),
        pol.rejected[k].item(),
        pol.chosen_tokens[k].item(),
        pol.rejected_tokens[k].item(),
    )
    chosen, rejected = pc - rc[k].item(), pr - rr[k].item()
    return chosen - rejected, chosen / nc - rejected / nr, pc / nc - pr / nr


# ----------------------------------------------------------------------------- float64 formulas, one per loss


def check(loss, expected_per_pair, **hyper):
    """dpo_loss (alpha 0: the preference term alone) == the mean over pairs of the written-out terms."""
    x = pairs()
    got, sums = loss_of(x, loss=loss, alpha=0.0, **hyper)
    expected = sum(expected_per_pair(*margins(x, k)) for k in range(P)) / P
    assert got.item() == pytest.approx(expected, abs=1e-12)
    return x, sums


def test_sigmoid_equals_float64_formula():  # DPO, cDPO label smoothing
    b, e = 0.1, 0.1
    x, sums = check(
        "sigmoid", lambda d, d_tok, s_tok: -(1 - e) * log_sigmoid(b * d) - e * log_sigmoid(-b * d),
        beta=b, label_smoothing=e,
    )  # fmt: skip
    assert sums["rewards/margins"].item() == pytest.approx(sum(b * margins(x, k)[0] for k in range(P)), abs=1e-12)


def test_ipo_equals_float64_formula():  # per-token log-ratio margin, squared distance to 1 / (2 tau)
    t = 0.1
    x, sums = check("ipo", lambda d, d_tok, s_tok: (d_tok - 1 / (2 * t)) ** 2, beta=t)
    # TRL's rewards/*: beta x the summed log-ratio; the loss's per-token scores are ipo/score_*
    assert sums["rewards/margins"].item() == pytest.approx(sum(t * margins(x, k)[0] for k in range(P)), abs=1e-12)
    assert sums["ipo/score_margins"].item() == pytest.approx(sum(margins(x, k)[1] for k in range(P)), abs=1e-12)


def test_hinge_equals_float64_formula():
    b = 0.1
    check("hinge", lambda d, d_tok, s_tok: max(0.0, 1 - b * d), beta=b)
    assert 0 < sum(b * margins(pairs(), k)[0] < 1 for k in range(P)) < P  # both sides of the hinge


def test_robust_equals_float64_formula():
    b, e = 0.1, 0.2
    check(
        "robust",
        lambda d, d_tok, s_tok: ((1 - e) * -log_sigmoid(b * d) - e * -log_sigmoid(-b * d)) / (1 - 2 * e),
        beta=b, label_smoothing=e,
    )  # fmt: skip


def test_simpo_equals_float64_formula():  # no reference: the policy's per-token log-probs, margin gamma
    b, g, e = 2.0, 0.8, 0.1

    def simpo(d, d_tok, s_tok):
        h = b * s_tok - g
        return -(1 - e) * log_sigmoid(h) - e * log_sigmoid(-h)

    x, sums = check("simpo", simpo, beta=b, gamma=g, label_smoothing=e)
    no_ref = {**x, "reference": None}  # the reference is never read
    assert loss_of(no_ref, loss="simpo", beta=b, gamma=g)[0] == loss_of(x, loss="simpo", beta=b, gamma=g)[0]
    pol = x["policy"]
    assert sums["rewards/chosen"].item() == pytest.approx((b * pol.chosen / pol.chosen_tokens).sum().item())


def rewards(x, k):
    """Pair k's rewards beta-free: the summed log-ratios of chosen and rejected (c / beta, r / beta)."""
    pol, (rc, rr) = x["policy"], x["reference"]
    return pol.chosen[k].item() - rc[k].item(), pol.rejected[k].item() - rr[k].item()


def check_rewards(loss, expected_per_pair, beta):
    """As check, for a loss of the two rewards (not only of their margin): expected_per_pair(c, r)."""
    x = pairs()
    got, _ = loss_of(x, loss=loss, alpha=0.0, beta=beta)
    expected = sum(expected_per_pair(*(beta * v for v in rewards(x, k))) for k in range(P)) / P
    assert got.item() == pytest.approx(expected, abs=1e-12)


def sigmoid_(x):
    return 1 / (1 + math.exp(-x))


def test_apo_zero_equals_float64_formula():
    check_rewards("apo_zero", lambda c, r: (1 - sigmoid_(c)) + sigmoid_(r), beta=0.1)


def test_nca_pair_equals_float64_formula():
    check_rewards("nca_pair", lambda c, r: -log_sigmoid(c) - 0.5 * log_sigmoid(-c) - 0.5 * log_sigmoid(-r), beta=0.1)


def test_bco_pair_equals_float64_formula():
    check_rewards("bco_pair", lambda c, r: -log_sigmoid(c) - log_sigmoid(-r), beta=0.1)


def test_every_loss_is_tested_and_configurable():
    suffix = "_equals_float64_formula"
    tested = {n.removeprefix("test_").removesuffix(suffix) for n in globals() if n.endswith(suffix)}
    assert set(LOSSES) == tested


def test_a_reference_loss_without_reference_is_an_error():
    x = {**pairs(), "reference": None}
    for loss, spec in LOSSES.items():
        if spec.reference:
            with pytest.raises(ValueError, match="reference"):
                loss_of(x, loss=loss)


def test_label_smoothing_is_checked():
    DPOSection(loss="robust", label_smoothing=0.2)
    for bad in (dict(loss="robust", label_smoothing=0.5), dict(loss="ipo", label_smoothing=0.1)):
        with pytest.raises(ValueError, match="label_smoothing"):
            DPOSection(**bad)


@pytest.mark.parametrize("nll_norm", ["sequence", "token"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_micro_batches_add_up_to_the_step(loss, nll_norm):
    """Pairs split over micro-batches, each divided by the step's pairs and chosen tokens: the losses and
    the sums add up to the one-batch values, so accumulation and world size do not change the loss."""
    x, hyper = pairs(), dict(loss=loss, nll_norm=nll_norm, label_smoothing=0.1 if loss in ("sigmoid", "robust") else 0)
    whole, whole_sums = loss_of(x, **hyper)
    parts = [loss_of(part(x, s), **hyper) for s in (slice(0, 1), slice(1, 4), slice(4, P))]
    assert sum(p[0] for p in parts).item() == pytest.approx(whole.item(), abs=1e-12)
    for k, v in whole_sums.items():
        assert sum(p[1][k] for p in parts).item() == pytest.approx(v.item(), abs=1e-9), k


# ----------------------------------------------------------------------------- TRL's values


def trl_dpo_branch(loss_type: str, **names) -> torch.Tensor:
    """`per_sequence_loss` of trl's DPOTrainer._compute_loss for loss_type: that branch's source lines,
    run on `names` (self: beta, label_smoothing; delta_score, chosen_scores, ..., completion_mask)."""
    from trl import DPOTrainer

    lines = inspect.getsource(DPOTrainer._compute_loss).splitlines()
    start = next(i for i, line in enumerate(lines) if line.rstrip().endswith(f'loss_type == "{loss_type}":'))
    indent = len(lines[start]) - len(lines[start].lstrip())
    body = []
    for line in lines[start + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        body.append(line)
    scope = {"F": F, "torch": torch, **names}
    exec(textwrap.dedent("\n".join(body)), scope)
    return scope["per_sequence_loss"]


def completion_mask(*counts):
    """(2P, L) mask with the given tokens per row: chosen rows, then rejected rows (TRL's layout)."""
    n = torch.cat(counts).long()
    return (torch.arange(int(n.max()))[None, :] < n[:, None]).long()


@pytest.mark.parametrize(("loss", "label_smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_reference_losses_equal_trl(loss, label_smoothing):
    x, beta = pairs(), 0.1
    got, _ = loss_of(x, loss=loss, beta=beta, alpha=0.0, label_smoothing=label_smoothing)
    pol = x["policy"]
    chosen_scores, rejected_scores = pol.chosen - x["reference"][0], pol.rejected - x["reference"][1]
    trl = trl_dpo_branch(
        loss, self=SimpleNamespace(beta=beta, label_smoothing=label_smoothing), chosen_scores=chosen_scores,
        rejected_scores=rejected_scores, delta_score=chosen_scores - rejected_scores,
        completion_mask=completion_mask(pol.chosen_tokens, pol.rejected_tokens),
    )  # fmt: skip
    assert got.item() == pytest.approx(trl.mean().item(), abs=1e-12)


def test_simpo_equals_trl_cpo():
    from trl.experimental.cpo import CPOTrainer

    x, beta, gamma, eps = pairs(), 2.0, 0.8, 0.1
    got, sums = loss_of(x, loss="simpo", beta=beta, gamma=gamma, alpha=0.0, label_smoothing=eps)
    trainer = SimpleNamespace(
        alpha=0.0, beta=beta, simpo_gamma=gamma, label_smoothing=eps, loss_type="simpo",
        accelerator=SimpleNamespace(device="cpu"),
    )  # fmt: skip
    # TRL's CPOTrainer averages the policy log-probs over the completion for simpo (average_log_prob)
    pol = x["policy"]
    avg_c, avg_r = pol.chosen / pol.chosen_tokens, pol.rejected / pol.rejected_tokens
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, avg_c, avg_r)
    assert got.item() == pytest.approx(losses.mean().item(), abs=1e-12)
    assert sums["rewards/chosen"].item() == pytest.approx(chosen_rewards.sum().item(), abs=1e-12)
    assert sums["rewards/rejected"].item() == pytest.approx(rejected_rewards.sum().item(), abs=1e-12)


def test_sigmoid_with_token_nll_equals_trl_sigmoid_plus_sft():
    """Llama 3's loss with `nll_norm: token` is TRL's loss_type [sigmoid, sft] weighted [1, alpha]: the
    NLL averaged over every chosen token of the batch (real rows, formatting tokens in the NLL)."""
    batch = dpo_batch([pref("a?", "yes", "no way"), pref("b?", "maybe so, I think", "x"), pref("c", "12", "1")])
    g = torch.Generator().manual_seed(2)
    pi = -torch.rand(batch.num_targets, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(batch.num_targets, generator=g, dtype=torch.float64) * 3
    beta, alpha = 0.1, 0.2
    x = dpo_inputs(pi, ref, batch)
    got, _ = loss_of(x, beta=beta, alpha=alpha, nll_norm="token")
    # the same as a list of losses with TRL's loss_weights
    listed = loss_of(x, loss=["sigmoid", "sft"], loss_weights=[1.0, alpha], beta=beta, alpha=0.0, nll_norm="token")
    assert torch.equal(listed[0], got)

    chosen_scores = x["policy"].chosen - x["reference"][0]
    rejected_scores = x["policy"].rejected - x["reference"][1]
    trainer = SimpleNamespace(beta=beta, label_smoothing=0.0)
    dpo = trl_dpo_branch("sigmoid", self=trainer, delta_score=chosen_scores - rejected_scores)
    # TRL's per-token layout: one row per response, chosen rows first, the completion's log-probs left-aligned
    order = [k for k in range(len(batch.seq_rank)) if batch.seq_rank[k] == 0]
    order += [k for k in range(len(batch.seq_rank)) if batch.seq_rank[k] == 1]
    rows = [pi[batch.target_seq == k] for k in order]
    per_token_logps = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    mask = completion_mask(torch.tensor([float(len(r)) for r in rows]))
    sft = trl_dpo_branch("sft", shift_completion_mask=mask, per_token_logps=per_token_logps)
    assert got.item() == pytest.approx(dpo.mean().item() + alpha * sft.mean().item(), abs=1e-12)


# ----------------------------------------------------------------------------- RM: center_rewards


def test_center_rewards_equals_float64_formula_and_trl():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(7, generator=g, dtype=torch.float64) * 2
    group, rank = torch.tensor([0, 0, 0, 1, 1, 2, 2]), torch.tensor([1, 0, 2, 0, 1, 1, 0])
    c = 0.01
    loss, _ = ranking_loss(rewards, group, rank, center_rewards=c)
    r, terms = rewards.tolist(), []
    for a in range(7):
        for b in range(7):
            if group[a] == group[b] and rank[a] < rank[b]:
                terms.append(-log_sigmoid(r[a] - r[b]) + c * (r[a] + r[b]) ** 2)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), abs=1e-12)

    # two responses per prompt: TRL's RewardTrainer.compute_loss, with stand-ins for the trainer and model
    from collections import defaultdict

    from trl import RewardTrainer

    two = torch.tensor([3, 4, 5, 6])  # groups 1 and 2: (chosen, rejected) pairs
    chosen, rejected = two[rank[two] == 0], two[rank[two] == 1]
    ours, _ = ranking_loss(rewards[two], group[two], rank[two], center_rewards=c)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=c),
        accelerator=SimpleNamespace(gather_for_metrics=lambda t: t, gather=lambda t: t),
        _total_train_tokens=0, _tp_size=1, _metrics=defaultdict(lambda: defaultdict(list)),
    )  # fmt: skip
    logits = torch.cat([rewards[chosen], rewards[rejected]])[:, None]  # (2P, 1): chosen rows, then rejected
    trl = RewardTrainer.compute_loss(
        trainer, lambda **kw: SimpleNamespace(logits=logits), {"attention_mask": torch.ones(4, 3)}
    )  # fmt: skip
    assert ours.item() == pytest.approx(trl.item(), abs=1e-12)
    assert ranking_loss(rewards, group, rank, center_rewards=0.0)[0].item() < loss.item()


# ----------------------------------------------------------------------------- through llama_posttrain/train/dpo.py


def test_simpo_objective_runs_without_a_reference_model():
    from conftest import random_model

    from llama_posttrain.llama import get_preset
    from llama_posttrain.train.dpo_objective import make_objective
    from llama_posttrain.train.targets import LiveReference, model_logps

    model = random_model(get_preset("debug"))
    batch = dpo_batch([pref("a?", "yes", "no way"), pref("b?", "maybe so", "x")])
    step = SimpleNamespace(num_pairs=2, num_chosen_targets=int((batch.target_seq % 2 == 0).sum()))
    objective = make_objective(model, None, DPOSection(loss="simpo", beta=2.0), "torch")
    assert not objective.reference_forward  # no reference forward, counted nowhere (MFU)
    loss, _ = objective.loss(batch, step)
    with torch.no_grad():
        x = dpo_inputs(model_logps(model, batch, "torch"), None, batch)
    assert loss.item() == pytest.approx(loss_of(x, loss="simpo", beta=2.0)[0].item(), abs=1e-6)
    assert make_objective(model, LiveReference(model), DPOSection(), "torch").reference_forward
