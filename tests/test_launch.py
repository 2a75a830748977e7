"""The launchers (llama_posttrain/driver/launch.py): the commands each one runs; a training job across 2 "nodes" (two torchrun
agents on a loopback c10d rendezvous) through slurm (a stand-in srun) gives the same result as one node; a job dies
with its driver (kill -9: no orphans); the progress line. Ray: tests/test_launch_ray.py."""

import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train import QUICK, ROOT, process_tree

from llama_posttrain.driver.launch import Job, JobFailed, Launcher, ProgressLine
from llama_posttrain.train import progress

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


def test_the_commands_of_each_launcher(tmp_path, monkeypatch):
    job = Job("j", "llama_posttrain/train/sft.py", ["--config", "c.yaml"], tmp_path / "j.log", nproc=8)
    single = Job("avg", "llama_posttrain/jobs/average.py", ["--out", "o", "a", "b"], tmp_path / "a.log", nproc=0)
    py, script = sys.executable, str(ROOT / "llama_posttrain" / "train" / "sft.py")
    average = [py, str(ROOT / "llama_posttrain" / "jobs" / "average.py"), "--out", "o", "a", "b"]
    standalone = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8", script, "--config", "c.yaml"]
    assert Launcher("local").command(job) == Launcher("torchrun").command(job) == standalone
    assert Launcher("local").command(single) == average
    slurm = Launcher("slurm", nnodes=2, rdzv_endpoint="node0:29400")
    assert slurm.command(job, "s-0") == [
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        py, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=8", "--rdzv_backend=c10d",
        "--rdzv_endpoint=node0:29400", "--rdzv_id=s-0", script, "--config", "c.yaml",
    ]  # fmt: skip
    assert slurm.command(single) == ["srun", "--nodes=1", "--ntasks=1", *average]
    monkeypatch.setenv("MASTER_ADDR", "head")
    monkeypatch.setenv("MASTER_PORT", "1234")
    assert "--rdzv_endpoint=head:1234" in Launcher("slurm", nnodes=2).command(job)
    ray = Launcher("ray", nnodes=2)  # node i's agent, a static rendezvous on node 0 (ranks 8 i ... 8 i + 7)
    assert ray.command(job, node=1, master="10.0.0.5:4321") == [
        py, "-m", "torch.distributed.run", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.5",
        "--master_port=4321", "--nproc_per_node=8", script, "--config", "c.yaml",
    ]  # fmt: skip
    assert ray.command(single) == average


@pytest.mark.parametrize("kind", ["local", "torchrun"])
def test_one_node_launchers_refuse_several_nodes(kind):
    with pytest.raises(
        ValueError, match=f"launcher: {kind} runs on one node; .* use launcher: ray .* or launcher: slurm"
    ):
        Launcher(kind, nnodes=2)


def test_the_pipeline_refuses_several_nodes_on_one_node_launchers(tmp_path):
    from llama_posttrain.driver.pipeline import make_launcher
    from llama_posttrain.driver.pipeline_config import PipelineError, load_pipeline_config

    cfg = load_pipeline_config(None, ["launcher=torchrun", "nnodes=2"])
    with pytest.raises(PipelineError, match="launcher: torchrun runs on one node"):
        make_launcher(cfg, tmp_path)
    with pytest.raises(PipelineError, match="node_rank"):  # the retired queue's key is unknown now
        load_pipeline_config(None, ["node_rank=1"])


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


def stand_in_srun(tmp_path, monkeypatch) -> None:
    """FAKE_SRUN first on PATH; its calls are recorded in tmp_path/srun_calls.jsonl."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(log=str(tmp_path / "srun_calls.jsonl")))
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")


@pytest.mark.slow
@pytest.mark.long  # in CI: tests/test_topology.py's bit-identical twin, with the recipe's per-rank settings
def test_a_job_on_two_nodes_through_slurm_equals_one_node(tmp_path, monkeypatch):
    stand_in_srun(tmp_path, monkeypatch)
    Launcher("local").run(sft_job(tmp_path, "one_node", nproc=2))
    Launcher("slurm", nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}").run(sft_job(tmp_path, "two_nodes"))
    calls = [json.loads(line) for line in (tmp_path / "srun_calls.jsonl").read_text().splitlines()]
    assert len(calls) == 1 and calls[0][:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "--nnodes=2" in calls[0] and "--nproc_per_node=1" in calls[0]
    same_training(metrics(tmp_path / "one_node"), metrics(tmp_path / "two_nodes"))


@pytest.mark.slow
@pytest.mark.long
def test_a_round_of_the_pipeline_through_slurm_on_two_nodes_equals_one_node(tmp_path, monkeypatch):
    """A shrunk round of the quickstart pipeline (its averaging job included) through the stand-in srun, 2 nodes
    of 1 rank each: the summary equals the local launcher's on 2 ranks (the Ray test's twin)."""
    from test_launch_ray import float_close
    from test_pipeline import MICRO

    from llama_posttrain.driver.pipeline import Pipeline
    from llama_posttrain.driver.pipeline_config import load_pipeline_config

    stand_in_srun(tmp_path, monkeypatch)
    two_ranks = {**MICRO, "dpo": {**MICRO["dpo"], "data.batch_size": 2}}  # an example per rank and step
    summaries = {}
    for name, launch in [("local", {"launcher": "local", "nproc": 2}),
                         ("slurm", {"launcher": "slurm", "nnodes": 2, "nproc": 1,
                                    "rdzv_endpoint": f"127.0.0.1:{free_port()}"})]:  # fmt: skip
        config = {**two_ranks, **launch, "root": str(tmp_path / name), "plots": False}
        Pipeline(load_pipeline_config(None, [f"{k}={json.dumps(v)}" for k, v in config.items()])).run()
        summaries[name] = json.loads((tmp_path / name / "micro" / "summary.json").read_text())
    assert [s["stage"] for s in summaries["slurm"]["stages"]] == ["data", "pretrain", "rm", "rs", "sft", "pref", "dpo"]
    float_close(summaries["local"]["stages"], summaries["slurm"]["stages"])
    calls = [json.loads(line) for line in (tmp_path / "srun_calls.jsonl").read_text().splitlines()]
    assert any("--nodes=2" in c for c in calls) and any(c[:2] == ["--nodes=1", "--ntasks=1"] for c in calls)


# A job that records its pid, then works until SIGTERM, on which it "saves" (writes a file) and exits 143.
JOB = """
import os, signal, sys, time
out = sys.argv[1]
def save(signum, frame):
    open(out + ".saved", "w").write(signal.Signals(signum).name)
    sys.exit(143)
signal.signal(signal.SIGTERM, save)
open(out + ".pid.tmp", "w").write(str(os.getpid()))
os.replace(out + ".pid.tmp", out + ".pid")
while True:
    time.sleep(0.05)
"""

DRIVER = """
import sys
from pathlib import Path
from llama_posttrain.driver.launch import Job, Launcher
script, out, nproc = sys.argv[1:]
launcher = Launcher("local")
with launcher.signals:
    launcher.run(Job("job", script, [out], Path(out + ".log"), int(nproc), {"OMP_NUM_THREADS": "1"}))
"""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent has not reaped it


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def kill_9_driver_and_check_the_job_ends(tmp_path, nproc):
    script, out = tmp_path / "job.py", tmp_path / "out"
    script.write_text(JOB)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(script), str(out), str(nproc)], cwd=ROOT)
    tree = [driver.pid]
    try:
        assert wait_for(lambda: Path(f"{out}.pid").exists(), 60), "the job did not start"
        worker = int(Path(f"{out}.pid").read_text())
        tree = process_tree(driver.pid)  # the driver, (torchrun,) the job's process(es)
        assert worker in tree and len(tree) == (2 + nproc if nproc > 1 else 2)
        driver.kill()  # kill -9: no handler runs in the driver
        driver.wait()
        assert wait_for(lambda: not any(alive(pid) for pid in tree[1:]), 40), "the job outlived its driver"
        assert Path(f"{out}.saved").read_text() == "SIGTERM"  # as a forwarded signal: it saved
    finally:
        for pid in tree:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("nproc", [0, 1])  # a plain process (averaging); a 1-rank job, without torchrun
def test_a_job_dies_with_its_driver_killed_by_kill_9(tmp_path, nproc):
    kill_9_driver_and_check_the_job_ends(tmp_path, nproc)


@pytest.mark.slow
def test_torchrun_and_its_workers_die_with_the_driver_killed_by_kill_9(tmp_path):
    kill_9_driver_and_check_the_job_ends(tmp_path, nproc=2)  # torchrun forwards the SIGTERM to its workers


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


def test_launcher_ray_without_ray_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(JobFailed, match=r"launcher: ray needs Ray, which is not installed: pip install -e '\.\[ray\]'"):
        Launcher("ray").run(Job("j", "llama_posttrain/jobs/average.py", [], tmp_path / "j.log", nproc=0))


def test_a_stopped_training_job_is_told_by_its_result_file_not_its_log(tmp_path, monkeypatch):
    """The launcher names the step a stopped run saved from <run_dir>/result.json (the run's own record,
    llama_posttrain/train/lifecycle.py write_result), never from text in the log; the result of an earlier
    attempt is removed before the job starts."""
    from llama_posttrain.driver.launch import _saved
    from llama_posttrain.train.lifecycle import RESULT, read_result, write_result

    run_dir = tmp_path / "run"
    job = Job("sft", "llama_posttrain/train/sft.py", [], tmp_path / "run.log", 1, run_dir=run_dir)
    write_result(run_dir, 3, signal.SIGTERM)  # an earlier attempt's
    child = (
        f"import os, signal; from llama_posttrain.train.lifecycle import write_result\n"
        f"assert not os.path.exists({str(run_dir / RESULT)!r}), 'a stale result'\n"
        f"print('SIGTERM: saved step 99', flush=True)\n"  # printed text: not what the launcher reads
        f"write_result({str(run_dir)!r}, 7, signal.SIGTERM)"
    )
    monkeypatch.setattr(Launcher, "command", lambda self, job, rdzv_id=None: [sys.executable, "-c", child])
    Launcher("local").run(job)
    assert read_result(run_dir) == {"saved_step": 7, "stopped_by": "SIGTERM"}
    assert _saved(job, 128 + signal.SIGTERM, killed=False) == f"{job.script} saved step 7 in {run_dir}"
    (run_dir / RESULT).unlink()  # stopped before it wrote one (killed while loading): the log's text is not read
    assert _saved(job, 1, killed=False).startswith(f"{job.script} stopped before it saved a step (exit code 1)")
    (run_dir / RESULT).write_text('{"step": 7}')
    with pytest.raises(ValueError, match=rf"{run_dir / RESULT}: not a training run's result \(KeyError"):
        read_result(run_dir)
    assert _saved(job, 1, killed=False).startswith(f"{job.script} stopped (exit code 1), its saved step unknown: ")
