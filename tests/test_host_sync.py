"""No host sync in a training step that is not logged (llama_posttrain/train/loop.py `Trainer.train_step`,
timed=False, the fused optimizer as on CUDA), SFT and DPO: checked on the CPU by the ops that would sync on CUDA.

The CPU has no transfers to see, so the test records the calls that are transfers on CUDA, in torch's
dispatcher (below every Python wrapper, so no call path hides them) and at the Tensor methods:
  - a tensor made from Python data (torch.tensor, Tensor.new_tensor, torch.as_tensor of a number): on the CPU
    the op `aten.lift_fresh`; with a CUDA device the same call is a blocking host-to-device copy
    (torch.full / torch.zeros make it on the device: no copy);
  - a read to the host: `aten._local_scalar_dense` (item, bool, int, float) and Tensor.tolist / cpu / numpy;
  - an op whose output size depends on the values (nonzero, masked_select, unique, indexing with a bool mask):
    the host waits for the count.
The GPU's own check of the same (experiments/gpu/checks.py `step`, under torch.cuda.set_sync_debug_mode)
also sees what only CUDA runs (FlexAttention's block mask, the Triton kernel's launch)."""

import sys

import pytest
import torch
from test_step_overheads import sft_setup
from test_train import QUICK, SHORT
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from llama_posttrain.train.config import parse_args

SYNC_OPS = {
    "lift_fresh": "a tensor from Python data (on CUDA: a blocking host-to-device copy)",
    "lift_fresh_copy": "a tensor from Python data (on CUDA: a blocking host-to-device copy)",
    "_local_scalar_dense": "a read to the host (item, bool, int, float)",
    "nonzero": "an output sized by the values",
    "masked_select": "an output sized by the values",
    "_unique2": "an output sized by the values",
    "unique_dim": "an output sized by the values",
    "unique_consecutive": "an output sized by the values",
    "repeat_interleave": "an output sized by the values",
}
HOST_METHODS = ("tolist", "cpu", "numpy")
FAST = ("optim.fused=true", "logging.log_every=1000", "train.steps=20", "data.cache=false", "data.batch_size=12")


def _caller() -> str:
    """The innermost frame of this repository's code: where the call is."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if "llama_posttrain" in name and "site-packages" not in name:
            return f"{name.split('llama_posttrain', 1)[1].lstrip('/')}:{f.f_lineno} {f.f_code.co_name}"
        f = f.f_back
    return "torch"


class SyncRecorder(TorchDispatchMode):
    """Records (op, where) for every op in SYNC_OPS, and aten.index / index_put with a bool mask."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())
        )
        if name in SYNC_OPS or bool_index:
            self.found.append((name, _caller()))
        return func(*args, **(kwargs or {}))


class HostMethodRecorder(TorchFunctionMode):
    """Records Tensor.tolist / cpu / numpy (no aten op on the CPU)."""

    def __init__(self, found: list):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_METHODS:
            self.found.append((func.__name__, _caller()))
        return func(*args, **(kwargs or {}))


def syncs_of_steps(trainer, steps, monkeypatch) -> list:
    """(op, where) of every would-be sync in these unlogged steps."""
    import dataclasses

    import llama_posttrain.llama.model as llama_model

    # a CPU-only check (trunk runs it on CPU tokens alone; on CUDA the ids are checked before they get there)
    monkeypatch.setattr(llama_model, "check_token_range", lambda tokens, vocab_size: None)
    # the CPU's attention by documents reads the ids on the host by design (llama/segments.py); CUDA runs
    # FlexAttention's block mask, not on the CPU here: the dense mask stands in for it, as before segments
    monkeypatch.setattr(llama_model.Transformer, "attention_kind", "dense")
    steps = list(steps)
    for batch in steps:  # collate's arrays made tensors (torch.from_numpy, a lift_fresh on the host) as a loader's
        for mb in batch.micro_batches:  # worker would: the step's own ops are what this test reads
            [getattr(mb, f.name) for f in dataclasses.fields(mb)]
    recorder = SyncRecorder()
    with recorder, HostMethodRecorder(recorder.found):
        for i, batch in enumerate(steps, start=2):
            assert trainer.train_step(batch, i, timed=False) == {}
    monkeypatch.undo()
    return recorder.found


def test_the_recorder_sees_what_syncs_on_cuda(monkeypatch):
    """The method itself: each kind of call is recorded, and torch.full / arithmetic with a Python number are not."""
    x = torch.randn(4)
    recorder = SyncRecorder()
    with recorder, HostMethodRecorder(recorder.found):
        x.new_tensor(4), torch.tensor(2.0), x.sum().item(), bool(x.sum() > 0), x.tolist(), x[x > 0], x.nonzero()
        torch.full((), 4, dtype=x.dtype), x / 4, x.new_zeros(4)
    assert [op for op, _ in recorder.found] == [
        "lift_fresh", "lift_fresh", "_local_scalar_dense", "_local_scalar_dense", "tolist", "index", "nonzero",
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["sft", "dpo", "rm"])
def test_an_unlogged_step_has_no_host_sync(tmp_path, one_rank, monkeypatch, kind):
    """Several micro-batches a step, the fused optimizer (the CUDA default): no call that syncs on CUDA,
    neither per micro-batch (the losses' counts as tensors made on the device) nor per step."""
    from llama_posttrain.train import loop

    if kind == "sft":
        from llama_posttrain.train import sft_objective as sft

        cfg, s = sft_setup(tmp_path, *FAST)
        objective = sft.make_objective(s.model, "torch")
    elif kind == "rm":  # the ranking loss's pairs as an (S, S) mask, not a nonzero's list; extrema on the device
        from llama_posttrain.train import rm, rm_objective
        from llama_posttrain.train.run_setup import setup

        argv = ["--config", str(QUICK / "rm.yaml"), f"train.run_dir={tmp_path}", "logging.progress=false", *SHORT]
        cfg = parse_args(rm.RMConfig, [*argv, "data.tokens_per_microbatch=256", *FAST])
        s = setup(cfg, kind="rm", head="reward", one_row=cfg.rm.one_row)
        objective = rm_objective.make_objective(s.model, cfg.rm.margin, cfg.rm.center_rewards, False)
    else:
        from llama_posttrain.train import dpo, dpo_objective
        from llama_posttrain.train.run_setup import setup

        argv = ["--config", str(QUICK / "dpo.yaml"), f"train.run_dir={tmp_path}", "logging.progress=false", *SHORT]
        argv += ["data.tokens_per_microbatch=256", *FAST]
        cfg = parse_args(dpo.DPOConfig, argv)
        s = setup(cfg, kind="dpo", head="lm")
        from llama_posttrain.train.distributed import build_model
        from llama_posttrain.train.targets import LiveReference

        m, t = cfg.model, cfg.train  # the live reference, as llama_posttrain/train/dpo_objective.py run builds it
        preset = None if m.checkpoint else m.preset
        ref = build_model(s.d, m.checkpoint, preset, "lm", t.seed, t.mixed_precision, trainable=False)
        objective = dpo_objective.make_objective(s.model, LiveReference(ref, "torch"), cfg.dpo, "torch")
    trainer = loop.Trainer(cfg, s.d, s.model, objective, s.train_loader, None, None)
    trainer.read_every_step = False  # as on CUDA (on the CPU a read costs no sync: it reads every step)
    batches = iter(s.train_loader)
    first = next(batches)
    found = syncs_of_steps(trainer, [first], monkeypatch)  # the first step too (the optimizer's state is made)
    second = next(batches)
    found += syncs_of_steps(trainer, [second], monkeypatch)
    assert min(len(b.micro_batches) for b in (first, second)) >= 2  # several micro-batches a step
    counts = {k: found.count(k) for k in dict.fromkeys(found)}
    assert found == [], "\n".join(
        f"{n}x {op} ({SYNC_OPS.get(op, 'a read to the host')}) at {w}" for (op, w), n in counts.items()
    )
