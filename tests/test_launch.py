"""The launchers (llama_posttrain/train/launch.py): the commands each one runs; a training job across 2 "nodes" (two torchrun
agents on a loopback c10d rendezvous), through slurm (a stand-in srun) and through the torchrun leader /
follower queue, gives the same result as one node; the progress line."""

import io
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest
from test_train import QUICK, ROOT

from llama_posttrain.train import progress
from llama_posttrain.train.launch import Job, Launcher, ProgressLine

ARGS = ["--config", str(QUICK / "sft.yaml"), "train.steps=3", "data.eval=null", "train.save_every=0"]
ARGS += ["logging.log_every=1", "logging.progress=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_job(tmp_path, name, nproc=1):
    run_dir = tmp_path / name
    return Job(name, "llama_posttrain/train/sft.py", [*ARGS, f"train.run_dir={run_dir}"], tmp_path / f"{name}.log", nproc,
               {"OMP_NUM_THREADS": "1"}, run_dir)  # fmt: skip


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def same_training(a, b):
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["grad_norm"] == pytest.approx(y["grad_norm"])


def test_the_commands_of_each_launcher(tmp_path):
    job = Job("j", "llama_posttrain/train/sft.py", ["--config", "c.yaml"], tmp_path / "j.log", nproc=8)
    single = Job("avg", "llama_posttrain/train/average.py", ["--out", "o", "a", "b"], tmp_path / "a.log", nproc=0)
    py, script = sys.executable, str(ROOT / "llama_posttrain" / "train" / "sft.py")
    local = Launcher("local")
    assert local.command(job) == [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", script,
                                  "--config", "c.yaml"]  # fmt: skip
    assert local.command(single) == [py, str(ROOT / "llama_posttrain" / "train" / "average.py"), "--out", "o", "a", "b"]
    multi = Launcher("torchrun", nnodes=2, node_rank=1, rdzv_endpoint="node0:29400")
    assert multi.command(job, "s-3") == [
        py, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29400", "--rdzv_id=s-3", script, "--config", "c.yaml",
    ]  # fmt: skip
    slurm = Launcher("slurm", nnodes=2, rdzv_endpoint="node0:29400")
    assert slurm.command(job, "s-0")[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert slurm.command(job, "s-0")[4:] == multi.command(job, "s-0")
    assert slurm.command(single) == ["srun", "--nodes=1", "--ntasks=1", py, str(ROOT / "llama_posttrain" / "train" / "average.py"),
                                     "--out", "o", "a", "b"]  # fmt: skip
    os.environ.pop("MASTER_ADDR", None)
    with pytest.raises(ValueError, match="needs rdzv_endpoint"):
        Launcher("torchrun", nnodes=2).command(job)


FAKE_SRUN = """#!/usr/bin/env python3
# A stand-in srun: records its arguments, then runs the command once per node, in parallel (one agent each).
import json, subprocess, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
opts = [a for a in args if a.startswith("--")]
while args and args[0].startswith("--"):
    args.pop(0)
nodes = int(next(o.split("=")[1] for o in opts if o.startswith("--nodes=")))
procs = [subprocess.Popen(args) for _ in range(nodes)]
sys.exit(max(p.wait() for p in procs))
"""


@pytest.mark.slow
def test_a_job_on_two_nodes_through_slurm_equals_one_node(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(log=str(tmp_path / "srun_calls.jsonl")))
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    Launcher("local").run(sft_job(tmp_path, "one_node", nproc=2))
    Launcher("slurm", nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}").run(sft_job(tmp_path, "two_nodes"))
    calls = [json.loads(line) for line in (tmp_path / "srun_calls.jsonl").read_text().splitlines()]
    assert len(calls) == 1 and calls[0][:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--nnodes=2" in calls[0] and "--nproc_per_node=1" in calls[0]
    same_training(metrics(tmp_path / "one_node"), metrics(tmp_path / "two_nodes"))


FOLLOWER = """
import sys
from pathlib import Path
from llama_posttrain.train.launch import Launcher
launcher = Launcher("torchrun", nnodes=2, node_rank=1, rdzv_endpoint=sys.argv[2], queue=Path(sys.argv[1]))
with launcher.signals:
    sys.exit(launcher.follow(poll_s=0.1))
"""


@pytest.mark.slow
def test_the_torchrun_leader_and_a_follower_node_train_as_one_node(tmp_path, monkeypatch):
    endpoint, queue = f"127.0.0.1:{free_port()}", tmp_path / "jobs"
    (queue).mkdir()
    (queue / "session.json").write_text(json.dumps({"id": "an-earlier-leader", "host": "x"}))  # not followed
    (queue / "job_00000.json").write_text(json.dumps({"rdzv_id": "an-earlier-leader-0"}))
    follower = subprocess.Popen([sys.executable, "-c", FOLLOWER, str(queue), endpoint], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    leader = Launcher("torchrun", nnodes=2, node_rank=0, rdzv_endpoint=endpoint, queue=queue)
    leader.start_session()
    leader.run(sft_job(tmp_path, "two_nodes"))
    leader.end_session(0)
    out, _ = follower.communicate(timeout=120)
    assert follower.returncode == 0, out
    assert "[node 1] two_nodes: starting this node's agent" in out
    Launcher("local").run(sft_job(tmp_path, "one_node", nproc=2))
    same_training(metrics(tmp_path / "one_node"), metrics(tmp_path / "two_nodes"))


def test_the_progress_line_shows_done_total_and_an_eta(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    monkeypatch.setenv(progress.ENV, str(path))
    monkeypatch.setattr(progress, "MIN_INTERVAL_S", 0.0)
    out = io.StringIO()
    line = ProgressLine("[round 1] sft", path, out)
    line.t0 = time.time() - 30  # 30 s in
    progress.report(10, 40, "steps")
    line()
    progress.report(40, 40, "steps")
    line()
    shown = out.getvalue().splitlines()
    assert shown[0] == "[round 1] sft: 10/40 steps, 0:30, ETA 1:30"  # 3 s a step, 30 steps to go
    assert shown[1] == "[round 1] sft: 40/40 steps, 0:30"


def test_a_job_reports_its_progress_to_the_launcher(tmp_path, monkeypatch):
    seen = []
    real_call = ProgressLine.__call__

    def watch(self):
        real_call(self)
        if self.shown:
            seen.append(self.shown["done"])

    monkeypatch.setattr(ProgressLine, "__call__", watch)
    Launcher("local").run(sft_job(tmp_path, "run", nproc=1))
    assert seen and seen[-1] == 3 and all(a <= b for a, b in zip(seen, seen[1:]))  # the end is always shown
    assert json.loads((tmp_path / "run.progress.json").read_text())["done"] == 3
