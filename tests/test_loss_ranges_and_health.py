"""The training losses' hyperparameter ranges and the loop's health checks: every loss hyperparameter's range
checked when the config is read, and declared with its loss; keys a loss does not read refused; skipped
non-finite steps said when they happen and at the end; exploding updates and losses warned of; non-finite
weights never exported."""

import dataclasses
import math
import statistics
import typing

import pytest
import torch
from test_loss_family import loss_of, pairs
from test_train import in_process
from test_training_faults import sft_argv

from llama_posttrain.llama.config import PRESETS
from llama_posttrain.llama.model import Transformer
from llama_posttrain.losses.dpo import LOSSES
from llama_posttrain.train import health, loop, train_state
from llama_posttrain.train.config import AtLeast, Interval, load_config, parse_args
from llama_posttrain.train.dpo import LOSS_HYPERPARAMETERS, REFERENCE_FREE, DPOConfig, DPOSection
from llama_posttrain.train.rm import RMConfig, RMSection
from llama_posttrain.train.sft import SFTConfig, SFTSection

# ---------------------------------------------------------------------------------------------------------- loss ranges

BAD = [  # (config class, overrides, the key, the value as printed, the range as printed)
    (DPOConfig, ["dpo.beta=-0.1"], "dpo.beta", "-0.1", "(0, inf)"),
    (DPOConfig, ["dpo.beta=0"], "dpo.beta", "0.0", "(0, inf)"),
    (DPOConfig, ["dpo.alpha=-1"], "dpo.alpha", "-1.0", "[0, inf)"),
    (DPOConfig, ["dpo.loss=ipo", "dpo.beta=0"], "dpo.beta", "0.0", "(0, inf)"),
    (DPOConfig, ["dpo.loss=robust", "dpo.label_smoothing=0.5"], "dpo.label_smoothing", "0.5", "[0, 0.5)"),
    (DPOConfig, ["dpo.loss=sigmoid", "dpo.label_smoothing=0.7"], "dpo.label_smoothing", "0.7", "[0, 0.5)"),
    (DPOConfig, ["dpo.loss=simpo", "dpo.beta=2", "dpo.gamma=-1"], "dpo.gamma", "-1.0", "[0, inf)"),
    (RMConfig, ["rm.center_rewards=-0.01"], "rm.center_rewards", "-0.01", ">= 0"),
    (SFTConfig, ["optim.betas=[0.9, 1.0]"], "optim.betas", "1.0", "[0, 1)"),
]


@pytest.mark.parametrize("cls, overrides, key, value, allowed", BAD, ids=[" ".join(b[1]) for b in BAD])
def test_a_loss_hyperparameter_out_of_range_is_an_error_naming_key_value_and_range(cls, overrides, key, value, allowed):
    with pytest.raises(ValueError) as e:
        load_config(cls, None, overrides)
    msg = str(e.value)
    assert key in msg and value in msg and allowed in msg, msg
    assert f"override '{next(o for o in overrides if o.startswith(key))}'" in msg, msg  # where it was set


@pytest.mark.parametrize("override", ["dpo.beta=.nan", "dpo.alpha=.inf", "rm.center_rewards=.nan", "optim.lr=.nan"])
def test_a_non_finite_number_is_refused(override):
    cls = RMConfig if override.startswith("rm.") else DPOConfig
    with pytest.raises(ValueError, match=r"must be a finite number|outside"):
        load_config(cls, None, [override])


def test_dpo_refuses_a_bad_beta_before_loading_anything(tmp_path, one_rank):
    """`dpo.loss=ipo dpo.beta=0` died of a ZeroDivisionError at step 1, after the models were loaded."""
    argv = [*sft_argv(tmp_path / "run", "dpo.loss=ipo", "dpo.beta=0")]
    argv[1] = argv[1].replace("sft.yaml", "dpo.yaml")
    with pytest.raises(ValueError, match=r"dpo.beta=0.0 is outside \(0, inf\), its range for dpo.loss ipo"):
        in_process("dpo", argv)
    assert not (tmp_path / "run").exists()  # not even the run folder


def test_reference_checkpoint_under_a_reference_free_loss_is_refused(tmp_path):
    """Refused, not warned of: a reference model named for a loss that has none is a run that optimizes
    something else than its author meant; a warning scrolls by, an error costs one edit."""
    with pytest.raises(ValueError, match=r"dpo.reference_checkpoint='/x' is not read by dpo.loss simpo \(only by sig"):
        load_config(DPOConfig, None, ["dpo.loss=simpo", "dpo.beta=2", "dpo.reference_checkpoint=/x"])
    with pytest.raises(ValueError, match=r"dpo.reference='precompute' is not read by dpo.loss simpo"):
        load_config(DPOConfig, None, ["dpo.loss=simpo", "dpo.reference=precompute"])
    with pytest.raises(ValueError, match=r"dpo.gamma=1.0 is not read by dpo.loss sigmoid \(only by simpo\)"):
        load_config(DPOConfig, None, ["dpo.gamma=1"])
    assert load_config(DPOConfig, None, ["dpo.reference_checkpoint=/x"]).dpo.reference_checkpoint == "/x"


def _pref_grads(loss, **hyper):
    """d loss / d (policy_chosen, chosen_nll), float64, where the labels decide alone: policy == reference
    (h = 0), or for SimPO the per-token margin at gamma / |beta| (h - gamma = 0 for beta > 0). None: not finite."""
    x = pairs()
    pol, (rc, rr) = x["policy"], x["reference"]
    pc, pr = rc.clone().requires_grad_(), rr.clone()
    nll = pol.chosen_nll.clone().requires_grad_()
    if loss in REFERENCE_FREE:  # no reference: the per-token log-probs, gamma / |beta| apart
        beta, gamma = hyper["beta"], hyper["gamma"]
        margin = gamma / abs(beta) if beta else 0.0
        pc = ((pol.rejected / pol.rejected_tokens + margin) * pol.chosen_tokens).requires_grad_()
        pr = pol.rejected
    try:
        total, _ = loss_of({**x, "policy": pol._replace(chosen=pc, rejected=pr, chosen_nll=nll)}, loss=loss, **hyper)
    except ZeroDivisionError:
        return None
    total.backward()
    nll_grad = torch.zeros_like(nll) if nll.grad is None else nll.grad  # alpha 0: no NLL term
    if not (torch.isfinite(pc.grad).all() and torch.isfinite(nll_grad).all()):
        return None
    return pc.grad, nll_grad


@pytest.mark.parametrize("loss", list(LOSSES))
def test_the_ranges_are_where_the_loss_prefers_the_chosen_response(loss):
    """The declared ranges against the losses themselves: inside, the gradient raises the chosen response's
    log-prob and lowers its NLL; at or past the bounds of beta, label_smoothing and alpha, it does not (or the
    loss is not finite): the bounds are the losses' own, not guesses."""
    row = LOSS_HYPERPARAMETERS[loss]
    base = {"beta": 0.1, "alpha": 0.2} | ({"gamma": 0.5} if "gamma" in row else {})
    for name, inside, outside in (("beta", [1e-3, 0.1, 5.0], [0.0, -0.1]), ("alpha", [0.0, 0.2, 3.0], [-1.0]),
                                  ("label_smoothing", [0.0, 0.2, 0.49], [0.5, 0.7])):  # fmt: skip
        if name not in row:
            continue
        for v in inside:
            assert v in row[name]
            pc_grad, nll_grad = _pref_grads(loss, **{**base, name: v})
            assert (pc_grad < 0).all() and (nll_grad >= 0).all(), (name, v)
        for v in outside:
            assert v not in row[name]
            grads = _pref_grads(loss, **{**base, name: v})
            assert grads is None or not ((grads[0] < 0).all() and (grads[1] >= 0).all()), (name, v)


def test_every_loss_declares_exactly_the_hyperparameters_it_reads():
    """The one table of the losses (llama_posttrain/losses/dpo_names.py LOSS_KEYS) against the losses: a row
    naming a key its loss ignores, or missing one it reads, fails here. Read = changing the value changes the
    loss; not read = bit-identical."""
    every = {n for row in LOSS_HYPERPARAMETERS.values() for n in row}
    floats = {f.name for f in dataclasses.fields(DPOSection) if f.type in ("float", float)}
    assert floats == every, "every float key of dpo: is some loss's hyperparameter, with its range"
    x = pairs()
    x["reference"] = (x["reference"][0] - 3.0, x["reference"][1])  # h != 0: every term depends on its parameters
    start = {"beta": 0.1, "alpha": 0.2, "label_smoothing": 0.0, "gamma": 0.5}
    other = {"beta": 0.3, "alpha": 0.7, "label_smoothing": 0.2, "gamma": 1.5}
    for loss, row in LOSS_HYPERPARAMETERS.items():
        # the defaults are in range for every loss but robust, which needs its flip probability set (at 0 it is sigmoid)
        DPOSection(loss=loss, **({"label_smoothing": 0.1} if loss == "robust" else {}))
        for name in every:
            a = loss_of(x, loss=loss, **start)[0]
            b = loss_of(x, loss=loss, **{**start, name: other[name]})[0]
            assert (a != b) == (name in row), f"{loss} {'ignores' if a == b else 'reads'} {name}"


@pytest.mark.parametrize("section", [RMSection, SFTSection])
def test_every_number_of_the_other_losses_has_a_range(section):
    hints = typing.get_type_hints(section, include_extras=True)
    for name, tp in hints.items():
        base = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
        if base in (int, float):
            extras = typing.get_args(tp)[1:]
            assert any(isinstance(b, AtLeast | Interval) for b in extras), f"{section.__name__}.{name} has no range"


# ------------------------------------------------------------------------------------------------------------- the loop


def _run_with(tmp_path, bad_steps, *overrides, poison=None, poisoned=None):
    """An in-process SFT run whose loss is NaN at `bad_steps` (optimizer steps, 1-based); poison: the step at
    which the first trained weight tensor is set to NaN first (its size appended to the list `poisoned`)."""
    from llama_posttrain.train.run_setup import setup
    from llama_posttrain.train.sft_objective import make_objective

    cfg = parse_args(SFTConfig, sft_argv(tmp_path, *overrides))
    s = setup(cfg, kind="sft", head="lm")
    objective, seen = make_objective(s.model, "torch"), []
    first = next(p for p in s.model.parameters() if p.requires_grad)
    if poisoned is not None:
        poisoned.append(first.numel())

    def loss(batch, step):
        if not seen or seen[-1] is not step:
            seen.append(step)
        if len(seen) == poison:
            with torch.no_grad():
                (first.to_local() if hasattr(first, "to_local") else first).fill_(float("nan"))
        value, sums = objective.loss(batch, step)
        return (value * float("nan") if len(seen) in bad_steps else value), sums

    loop.run(s, loop.Objective(loss, objective.ratios, objective.derive))


@pytest.mark.parametrize("fused", [False, True])
def test_skipped_steps_are_said_when_they_happen_and_at_the_end(tmp_path, one_rank, capsys, fused):
    """optim.lr=1e30 (and any non-finite step below train.max_bad_steps) used to end with rc 0 and nothing said.
    With the fused optimizer the flags stay on the device until a logged step (logging.log_every)."""
    _run_with(tmp_path, {2, 4}, "train.steps=6", f"optim.fused={str(fused).lower()}", "logging.log_every=3")
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith(("step ", "skipped "))]  # (tmp_path says skipped)
    assert lines == [
        "step 2: skipped (non-finite loss and gradient norm); the weights were not updated",
        "step 4: skipped (non-finite loss and gradient norm); the weights were not updated",
        "skipped 2 non-finite steps (train.max_bad_steps in a row stop the run): "
        "step 2 (loss and gradient norm), step 4 (loss and gradient norm)",
    ], out
    assert (tmp_path / "model").is_dir()


def test_exploding_weights_are_warned_of_and_a_sound_run_is_not(tmp_path, one_rank, capsys):
    in_process("sft", sft_argv(tmp_path / "sound", "train.steps=8"))
    assert "warning" not in capsys.readouterr().out
    from test_training_faults import fresh_group

    fresh_group()
    in_process("sft", sft_argv(tmp_path / "boom", "train.steps=2", "optim.lr=1e30", "optim.warmup_steps=0"))
    out = capsys.readouterr().out
    warning = next(line for line in out.splitlines() if line.startswith("warning: step 1: the weights' norm"))
    # Adam's first step moves every weight whose gradient is not 0 by exactly lr (m / sqrt(v) = g / |g|, bias
    # corrected): |w| jumps to lr * sqrt(N) at most, N the weights, and here nearly every weight has a gradient
    n = sum(p.numel() for p in Transformer(PRESETS["tiny"]).parameters())
    after = float(warning.split(" to ")[1].split(",")[0])
    assert 0.99 * 1e30 * math.sqrt(n) < after < (1 + 1e-4) * 1e30 * math.sqrt(n), warning
    assert "the updates are exploding" in warning


def test_a_loss_spike_is_warned_of_and_noise_is_not(capsys):
    h = health.Health(is_main=True)
    g = torch.Generator().manual_seed(0)
    noisy = (2.0 + 0.05 * torch.randn(40, generator=g)).tolist()
    for step, value in enumerate(noisy, 1):
        h.loss(step, value)
    h.loss(41, 2.3)  # a hard batch: 6 sigma, not double the median
    assert capsys.readouterr().out == ""
    h.loss(42, math.log(128256))  # the loss of a uniform guess over Llama 3's vocabulary: diverged
    median = statistics.median([*noisy, 2.3][-health.WINDOW :])
    assert f"warning: step 42: loss 11.76 against a median of {median:.4g} over the last 20" in capsys.readouterr().out
    h.summary()
    assert "1 exploding loss warning(s)" in capsys.readouterr().out


def test_non_finite_weights_are_not_exported_and_the_checkpoints_are_kept(tmp_path, one_rank, capsys):
    poisoned = []
    with pytest.raises(SystemExit) as e:
        _run_with(
            tmp_path, set(), "train.steps=3", "train.save_every=1", "train.keep_last=1", poison=3, poisoned=poisoned
        )
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path}: {poisoned[0]} weights are NaN or inf after step 3: the model is not exported" in err
    assert not (tmp_path / "model").exists()
    # no final checkpoint of NaN weights pushed out step 2's (train.keep_last=1)
    assert [p.name for p in train_state.list_checkpoints(tmp_path)] == ["step_00000002"]
