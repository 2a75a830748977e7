"""The training loops under torchrun on the CPU (gloo): quickstart runs, FSDP equivalence,
kill -9 and resume, a crash while checkpointing, wandb offline, non-finite steps."""

import json
import os
import random
import signal
import subprocess
import time
from itertools import accumulate
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_posttrain.train import logger
from llama_posttrain.train.config import parse_args
from llama_posttrain.train.distributed import torchrun_command

ROOT = Path(__file__).parent.parent
QUICK = ROOT / "experiments" / "quickstart"


def torchrun_cmd(entry, config, run_dir, overrides=(), nproc=2):
    args = ["--config", str(config), f"train.run_dir={run_dir}", "logging.progress=false", *overrides]
    return torchrun_command(str(ROOT / "llama_posttrain" / "train" / f"{entry}.py"), nproc, args)


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts each worker in a session of its own, so killing
    torchrun's process group leaves its workers running)."""
    from llama_posttrain.driver.launch import _process_tree

    return _process_tree(pid)


def kill_9_tree(pid: int) -> None:
    """kill -9 a process and every descendant at once, as a machine crash would."""
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def torchrun(*args, **kw):
    out = subprocess.run(torchrun_cmd(*args, **kw), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def read_metrics(run_dir):
    return logger.read_metrics(Path(run_dir) / "metrics.jsonl")


def evals(run_dir, key):
    return [m[f"eval/{key}"] for m in read_metrics(run_dir) if f"eval/{key}" in m]


@pytest.mark.slow
@pytest.mark.long
def test_quickstart_rm(tmp_path):
    torchrun("rm", QUICK / "rm.yaml", tmp_path)
    acc = evals(tmp_path, "accuracy")
    assert acc[-1] > 0.6, acc  # held-out pairwise accuracy, chance = 0.5
    assert (tmp_path / "model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.long
def test_quickstart_sft(tmp_path):
    torchrun("sft", QUICK / "sft.yaml", tmp_path)
    loss = evals(tmp_path, "loss")
    assert loss[-1] < 0.5 * loss[0], loss


@pytest.mark.slow
@pytest.mark.long
def test_quickstart_dpo(tmp_path):
    torchrun("dpo", QUICK / "dpo.yaml", tmp_path, ["dpo.reference=precompute"])
    acc = evals(tmp_path, "rewards/accuracies")
    assert acc[-1] > acc[0] + 0.05 and acc[-1] > 0.55, acc


SHORT = ["data.eval=null", "train.save_every=0", "optim.warmup_steps=2"]


@pytest.mark.slow
def test_fsdp_two_ranks_match_one(tmp_path):
    torchrun("sft", QUICK / "sft.yaml", tmp_path / "one", [*SHORT, "train.steps=5"], nproc=1)
    torchrun("sft", QUICK / "sft.yaml", tmp_path / "two", [*SHORT, "train.steps=5"], nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["tokens"] == b["tokens"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], abs=1e-5)
    wa, wb = load_file(tmp_path / "one/model/model.safetensors"), load_file(tmp_path / "two/model/model.safetensors")
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


DETERMINISTIC = ("loss", "nll", "grad_norm", "lr", "tokens")


@pytest.mark.long  # 19 s, three 2-rank runs (pytest -m long); CI keeps the in-process signal and crash resumes
def test_kill_9_and_resume_logs_the_same(tmp_path):
    args = [*SHORT, "train.steps=10", "train.save_every=3", "train.keep_last=2"]
    torchrun("sft", QUICK / "sft.yaml", tmp_path / "ref", args)
    kill_after = random.Random().randint(4, 8)
    proc = subprocess.Popen(
        torchrun_cmd("sft", QUICK / "sft.yaml", tmp_path / "run", args), cwd=ROOT, env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            break
        time.sleep(0.02)
    kill_9_tree(proc.pid)  # torchrun and its workers: a worker left running would write on into "run"
    proc.wait()
    torchrun("sft", QUICK / "sft.yaml", tmp_path / "run", args)  # resume: auto
    ref, run = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "run")
    assert [m["step"] for m in run] == list(range(1, 11)), f"killed after {kill_after}"
    for a, b in zip(ref, run):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}, f"killed after {kill_after}"


def in_process(entry, argv):
    import importlib

    return importlib.import_module(f"llama_posttrain.train.{entry}").main(argv)


def test_crash_while_writing_a_checkpoint_keeps_the_previous(tmp_path, one_rank, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from llama_posttrain.train import train_state

    argv = ["--config", str(QUICK / "sft.yaml"), f"train.run_dir={tmp_path}", "logging.progress=false", *SHORT]
    argv += ["train.steps=6", "train.save_every=2", "train.keep_last=5"]
    real_save, calls = dcp.save, []

    def crashing_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:  # the step-4 checkpoint: half written, then the process dies
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
            raise KeyboardInterrupt("simulated crash")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        in_process("sft", argv)
    assert [p.name for p in train_state.list_checkpoints(tmp_path)] == ["step_00000002"]
    assert (tmp_path / "checkpoints" / "step_00000004.tmp").exists()
    monkeypatch.setattr(dcp, "save", real_save)
    import torch.distributed as dist

    dist.destroy_process_group()
    in_process("sft", argv)  # resumes from step 2, cleans the partial one up
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert sorted(names) == ["step_00000002", "step_00000004", "step_00000006"]


def read_wandb_records(path: Path) -> list:
    """The records of an offline .wandb file: a LevelDB-style log (32 KiB blocks, 7-byte record
    headers: crc32, length, type) of wandb `Record` protobufs, after a 7-byte ':W&B' header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, records, parts = path.read_bytes(), 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            parts = b""
            records.append(rec)
    return records


def read_wandb_history(path: Path, timeout_s: float = 60) -> list[dict]:
    """History rows, once the file is complete: wandb's service process writes it and may still be
    flushing when `wandb.finish()` returns on a loaded machine (the run's exit record comes last)."""
    deadline = time.time() + timeout_s
    while not (records := read_wandb_records(path)) or records[-1].WhichOneof("record_type") != "exit":
        assert time.time() < deadline, f"{path}: no exit record after {timeout_s} s"
        time.sleep(0.2)
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item} for h in history]


def test_wandb_offline_run_holds_the_metrics(tmp_path, one_rank):
    argv = ["--config", str(QUICK / "sft.yaml"), f"train.run_dir={tmp_path}", "logging.progress=false", *SHORT]
    place = ["logging.group=quickstart", "logging.job_type=sft", "logging.name=round_1/sft/variant_0"]
    in_process("sft", [*argv, "train.steps=3", "logging.wandb=offline", *place])
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = read_wandb_history(files[0])
    (run,) = [r.run for r in read_wandb_records(files[0]) if r.WhichOneof("record_type") == "run"][:1]
    assert (run.run_group, run.job_type, run.display_name) == ("quickstart", "sft", "round_1/sft/variant_0")
    logged = read_metrics(tmp_path)
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h, m in zip(history, logged):  # the dashboard names (llama_posttrain/train/logger.py), metrics.jsonl's own keys
        assert h["train/loss"] == pytest.approx(m["loss"], rel=1e-6)
        assert h["train/learning_rate"] == pytest.approx(m["lr"]) and h["train/global_step"] == m["step"]
        assert not {k for k in h if not k.startswith(("train/", "eval/", "_"))}  # every key in a namespace
    assert [h["train/num_tokens"] for h in history] == list(accumulate(m["tokens"] for m in logged if "tokens" in m))


def test_non_finite_steps_are_skipped_then_stop(tmp_path, one_rank):
    from llama_posttrain.train import loop
    from llama_posttrain.train.sft import SFTConfig
    from llama_posttrain.train.sft_objective import make_objective

    argv = ["--config", str(QUICK / "sft.yaml"), f"train.run_dir={tmp_path}", "logging.progress=false", *SHORT]
    cfg = parse_args(SFTConfig, [*argv, "train.steps=10", "train.max_bad_steps=3"])
    from llama_posttrain.train.run_setup import setup

    s = setup(cfg, kind="sft", head="lm")
    model = s.model
    objective = make_objective(model, "torch")
    calls = []

    def loss(batch, step):
        value, m = objective.loss(batch, step)
        if not calls or calls[-1] is not step:  # count optimizer steps, not micro-batches
            calls.append(step)
        bad = len(calls) in (2, 5, 6, 7)  # step 2 alone, then steps 5, 6, 7 in a row
        return (value * float("nan") if bad else value), m

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="step 7: 3 steps in a row with a non-finite loss"):
        loop.run(s, loop.Objective(loss, objective.ratios, objective.derive))
    logged = read_metrics(tmp_path)
    assert [m["skipped_steps"] for m in logged] == [0, 1, 1, 1, 2, 3]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dpo_precomputed_reference_equals_live_reference(tmp_path, one_rank):
    for name, reference in (("live", "model"), ("pre", "precompute")):
        argv = ["--config", str(QUICK / "dpo.yaml"), f"train.run_dir={tmp_path / name}", "logging.progress=false"]
        in_process("dpo", [*argv, *SHORT, "train.steps=3", f"dpo.reference={reference}"])
    for a, b in zip(read_metrics(tmp_path / "live"), read_metrics(tmp_path / "pre")):
        for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "nll"):
            assert a[k] == pytest.approx(b[k], abs=1e-5), k
    first = read_metrics(tmp_path / "live")[0]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
