"""What one optimizer step costs beyond its math (llama_posttrain/train/loop.py `Trainer.train_step`): collectives and
host syncs per step (none per micro-batch), the DPO pair indices without `nonzero`, the DPO
reference compiled like the policy and freed after `dpo.reference=precompute`."""

import gc
import sys
import weakref
from pathlib import Path

import pytest
import torch
from test_train import QUICK, SHORT

from llama_posttrain.train.config import parse_args

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")


def sft_setup(tmp_path, *overrides):
    from llama_posttrain.train.run_setup import setup
    from llama_posttrain.train.sft import SFTConfig

    argv = ["--config", str(QUICK / "sft.yaml"), f"train.run_dir={tmp_path}", "logging.progress=false", *SHORT]
    cfg = parse_args(SFTConfig, [*argv, "data.tokens_per_microbatch=256", *overrides])
    return cfg, setup(cfg, kind="sft", head="lm")


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_has_one_collective_and_one_host_read_whatever_its_micro_batches(tmp_path, one_rank, monkeypatch, fused):
    """Per step: one reduce of the step's sums (on the device); with the fused optimizer the non-finite
    check stays on the device too (no host read at all), without it the host decides (one read). The
    signal flag is polled on the CPU (lifecycle.StopPoll). Nothing per micro-batch: the steps have several."""
    from llama_posttrain.train import loop, sft_objective

    cfg, s = sft_setup(tmp_path, f"optim.fused={str(fused).lower()}", "logging.log_every=1000", "train.steps=20")
    trainer = loop.Trainer(
        cfg, s.d, s.model, sft_objective.make_objective(s.model, "torch"), s.train_loader, None, None
    )
    assert trainer.read_every_step  # on the CPU a read costs no sync: the non-finite check reads every step
    trainer.read_every_step = not fused  # as on CUDA
    batches = iter(s.train_loader)
    trainer.train_step(next(batches), 1, timed=False)  # first step: the optimizer's state is created

    steps = [next(batches) for _ in range(3)]  # the loader's own reads are of CPU data: not counted
    import llama_posttrain.llama.model as llama_model

    monkeypatch.setattr(llama_model, "check_token_range", lambda tokens, vocab_size: None)  # CPU-only check
    # the CPU's attention by documents reads the ids on the host by design (llama/segments.py); on CUDA the
    # block mask does not: the dense mask stands in for it here
    monkeypatch.setattr(llama_model.Transformer, "attention_kind", "dense")
    reduces, reads = [], []
    real_reduce = loop.reduce_on_device
    monkeypatch.setattr(loop, "reduce_on_device", lambda *a, **k: reduces.append(1) or real_reduce(*a, **k))
    ours = str(
        Path(__file__).parent.parent
    )  # reads by our code (torch's own, e.g. foreach AdamW's CPU step counts, are not)

    def counting(name, real):
        def read(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(ours) and "site-packages" not in caller:
                reads.append(name)
            return real(self, *a, **k)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    micro_batches = 0
    for step, batch in enumerate(steps, start=2):
        micro_batches += len(batch.micro_batches)
        assert trainer.train_step(batch, step, timed=False) == {}  # an unlogged step: nothing read back
    monkeypatch.undo()
    assert micro_batches >= 6  # several per step, yet:
    assert len(reduces) == 3
    assert reads == ([] if fused else ["__bool__"] * 3), reads
    metrics = trainer.train_step(next(batches), 5, timed=True)  # a logged step reads its sums back
    assert metrics["skipped_steps"] == 0 and metrics["loss"] > 0 and metrics["tokens"] > 0


@pytest.mark.parametrize("log_every", [1, 3])
def test_fused_optimizer_skips_non_finite_steps_on_the_device(tmp_path, one_rank, log_every):
    """The fused optimizer (the default): a non-finite step leaves the weights and the optimizer's state untouched
    (AdamW's found_inf), is counted, and max_bad_steps in a row stop the run. On the CPU the counters are
    read every step (no sync to save): the stop comes at the limit; on CUDA (read_every_step False, set
    here for log_every=3) at the first logged step after it."""
    from llama_posttrain.train import loop, sft_objective

    cfg, s = sft_setup(tmp_path, f"logging.log_every={log_every}", "train.steps=12", "train.max_bad_steps=3")
    objective = sft_objective.make_objective(s.model, "torch")
    steps_seen = []

    def loss(batch, step):
        value, m = objective.loss(batch, step)
        if not steps_seen or steps_seen[-1] is not step:
            steps_seen.append(step)
        bad = len(steps_seen) in (2, 5, 6, 7)  # step 2 alone, then 5, 6, 7 in a row
        return (value * float("nan") if bad else value), m

    trainer = loop.Trainer(
        cfg, s.d, s.model, loop.Objective(loss, objective.ratios, objective.derive), s.train_loader, None, None
    )
    assert trainer.fused and trainer.read_every_step  # the CPU's default
    trainer.read_every_step = log_every == 1  # log_every=3: as on CUDA
    batches = iter(s.train_loader)
    trainer.train_step(next(batches), 1, timed=True)
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    state = {k: v.clone() for k, v in trainer.optimizer.state[next(iter(trainer.optimizer.state))].items()}
    trainer.train_step(next(batches), 2, timed=True)  # bad: nothing moves
    assert all(torch.equal(before[k], v) for k, v in s.model.state_dict().items())
    after = trainer.optimizer.state[next(iter(trainer.optimizer.state))]
    assert all(torch.equal(state[k], after[k]) for k in state)  # step count, moments: as before
    logged = {}
    with pytest.raises(RuntimeError, match="3 steps in a row with a non-finite loss") as stop:
        for step in range(3, 13):
            timed = step % log_every == 0
            metrics = trainer.train_step(next(batches), step, timed=timed)
            if timed:
                logged[step] = metrics["skipped_steps"]
    stopped_at = int(str(stop.value).split(":")[0].removeprefix("step "))
    assert stopped_at == (7 if log_every == 1 else 9)  # the limit is reached at step 7
    assert all(v == sum(1 for b in (2, 5, 6, 7) if b <= k) for k, v in logged.items()), logged
    assert all(torch.isfinite(v).all() for v in s.model.state_dict().values())


def test_dpo_pairs_without_nonzero_pair_each_groups_chosen_with_its_rejected(tmp_path, one_rank):
    """llama_posttrain/train/targets.py dpo_pairs (a device sort) against the definition: per group, in group order,
    the sequence of rank 0 and the one of rank 1, on the quickstart DPO data's micro-batches."""
    from llama_posttrain.train.dpo import DPOConfig
    from llama_posttrain.train.run_setup import setup
    from llama_posttrain.train.targets import dpo_pairs

    argv = ["--config", str(QUICK / "dpo.yaml"), f"train.run_dir={tmp_path}", "logging.progress=false", *SHORT]
    s = setup(parse_args(DPOConfig, [*argv, "data.tokens_per_microbatch=512"]), kind="dpo", head="lm")
    checked = 0
    for step in [next(iter(s.train_loader)) for _ in range(1)]:
        for mb in step.micro_batches:
            chosen, rejected = dpo_pairs(mb)
            for g in range(mb.group_uid.numel()):
                mine = [i for i in range(len(mb.seq_rank)) if mb.seq_group[i] == g]
                assert chosen[g] == next(i for i in mine if mb.seq_rank[i] == 0)
                assert rejected[g] == next(i for i in mine if mb.seq_rank[i] == 1)
                checked += 1
            old = (mb.seq_rank == 0).nonzero().squeeze(-1), (mb.seq_rank == 1).nonzero().squeeze(-1)
            assert torch.equal(chosen, old[0]) and torch.equal(rejected, old[1])  # the same order as before
    assert checked >= 8


@pytest.mark.parametrize("compile", [pytest.param(False, marks=pytest.mark.long), True])  # eager: -m long
def test_dpo_reference_is_compiled_like_the_policy_and_freed_after_precompute(tmp_path, one_rank, monkeypatch, compile):
    import llama_posttrain.train.distributed as distributed
    from llama_posttrain.train import dpo, dpo_objective, loop

    built, alive = [], {}
    real_build = distributed.build_model

    def recording_build(*args, **kw):  # records what was asked; builds uncompiled (inductor is slow here)
        built.append(dict(kw))
        model = real_build(*args, **{**kw, "compile": False})
        alive["ref"] = weakref.ref(model)
        return model

    def check_run(setup, objective, eval_objective=None):
        gc.collect()
        alive["at_run"] = alive["ref"]() is not None
        return {}

    monkeypatch.setattr(dpo_objective, "build_model", recording_build)
    monkeypatch.setattr(loop, "run", check_run)
    argv = ["--config", str(QUICK / "dpo.yaml"), f"train.run_dir={tmp_path}", "logging.progress=false", *SHORT]
    dpo.main([*argv, "train.steps=1", "dpo.reference=precompute", f"train.compile={str(compile).lower()}"])
    assert built == [{**built[0], "trainable": False, "compile": compile}]  # the reference: frozen, compiled as asked
    assert alive["at_run"] is False  # no eval set (SHORT): the table is all that is kept
