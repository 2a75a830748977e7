"""Across topologies (issue 29 item 6): every launcher gives a job's ranks the same settings, computed once from the
job's ranks over all its nodes (driver/processes.py rank_env), so a training job on 1 node x 2 ranks (local) and on
2 nodes x 1 rank (slurm, a stand-in srun) gives bit-identical weights; a job on several nodes says what it waits
for before its first progress report, at once and periodically."""

import io
import json
import os
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from test_launch import ARGS, free_port, stand_in_srun

from llama_posttrain.driver import launch
from llama_posttrain.driver.launch import Job, Launcher, ProgressLine
from llama_posttrain.driver.recipe import Recipe


class Kept(Launcher):
    """Runs nothing: keeps each job."""

    def __init__(self, kind, nnodes=1):
        super().__init__(kind, nnodes)
        self.jobs = []

    def run(self, job):
        self.jobs.append(job)


def recipe_of(launcher):
    """What Recipe.job reads of a recipe: its launcher, and the config's nodes (the launcher's)."""
    return SimpleNamespace(launcher=launcher, cfg=SimpleNamespace(nnodes=launcher.nnodes))


def planned(launcher, nproc: int) -> Job:
    """The job the recipe hands the launcher (Recipe.job: its ranks' settings)."""
    Recipe.job(recipe_of(launcher), "j", "llama_posttrain/train/sft.py", [], "j.log", nproc)
    return launcher.jobs[-1]


def test_every_launcher_gives_the_ranks_of_a_job_the_same_settings(monkeypatch):
    """Before: OMP_NUM_THREADS was this node's cores / nproc: 4 on 1 node x 2 ranks, 8 on 2 nodes x 1 (8 cores)."""
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    one_node = planned(Kept("local"), nproc=2)
    for kind in ("slurm", "ray"):
        two_nodes = planned(Kept(kind, nnodes=2), nproc=1)
        assert two_nodes.env == one_node.env == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}, kind
        assert two_nodes.cwd == one_node.cwd == os.getcwd()
    assert planned(Kept("slurm", nnodes=2), nproc=0).env["OMP_NUM_THREADS"] == "8"  # one plain process: all cores
    assert planned(Kept("local"), nproc=16).env["OMP_NUM_THREADS"] == "1"  # never 0


@pytest.mark.long  # 12 s, two 2-rank jobs (pytest -m long); the settings test above stays in CI
def test_a_training_job_is_bit_identical_on_one_node_x_2_and_through_slurm_on_2_nodes_x_1(tmp_path, monkeypatch):
    """The part that is bit-reproducible across topologies: the same world size, seeds and per-rank threads give
    the same weights, to the bit, whether the ranks share a node or not."""
    stand_in_srun(tmp_path, monkeypatch)
    runs = {"one_node": (Launcher("local"), 2), "two_nodes": (Launcher("slurm", 2, f"127.0.0.1:{free_port()}"), 1)}
    for name, (launcher, nproc) in runs.items():
        args = [*ARGS, f"train.run_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'cache'}"]
        Recipe.job(recipe_of(launcher), name, "llama_posttrain/train/sft.py", args,
                   tmp_path / f"{name}.log", nproc, tmp_path / name)  # fmt: skip
    a, b = (load_file(str(tmp_path / name / "model" / "model.safetensors")) for name in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = {
        name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()] for name in runs
    }
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in lines["one_node"]] == [
        (m["step"], m["loss"], m["grad_norm"]) for m in lines["two_nodes"]
    ]
    srun = [json.loads(line) for line in (tmp_path / "srun_calls.jsonl").read_text().splitlines()]
    assert "--nnodes=2" in srun[0] and "--nproc_per_node=1" in srun[0]


def test_a_job_on_several_nodes_says_what_it_waits_for_at_once_and_periodically(tmp_path, monkeypatch):
    """Before its first progress report (its nodes meeting at the rendezvous, a follower started before node 0):
    said at once, then every WAIT_EVERY_S; nothing more once it reports. One node: nothing to wait for."""
    job = Job("[round 1] sft", "llama_posttrain/train/sft.py", [], tmp_path / "sft.log", nproc=8)
    slurm = Launcher("slurm", nnodes=2, rdzv_endpoint="node0:29400")
    waiting = slurm.waiting(job)
    assert "2 nodes x 8 ranks" in waiting and "rendezvous at node0:29400" in waiting and str(job.log) in waiting
    assert "node 0's" in Launcher("ray", nnodes=2).waiting(job)
    assert Launcher("local").waiting(job) is None and slurm.waiting(Job("a", "s", [], job.log, nproc=0)) is None
    out, path = io.StringIO(), tmp_path / "p.json"
    line = ProgressLine(job.name, path, out, waiting)
    line()
    line()  # within WAIT_EVERY_S: said once
    assert out.getvalue() == f"{job.name}: 0:00, waiting for {waiting}\n"
    monkeypatch.setattr(launch, "WAIT_EVERY_S", 0.0)
    line.t0 = time.time() - 65
    line()
    assert out.getvalue().splitlines()[-1] == f"{job.name}: 1:05, still waiting for {waiting}"
    path.write_text(json.dumps({"done": 1, "total": 3, "unit": "steps"}))
    line()
    assert out.getvalue().splitlines()[-1].startswith(f"{job.name}: 1/3 steps")
