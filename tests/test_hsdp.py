"""HSDP (train.shard_degree): 4 gloo ranks as 2 replicas x 2 shards train as 1 rank does."""

import json
import subprocess

import pytest
from test_train import ENV, QUICK, ROOT, torchrun_cmd

from llama_posttrain.train.distributed import Dist, shard_mesh

ARGS = ["train.steps=3", "data.eval=null", "train.save_every=0", "logging.log_every=1"]


def losses(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.long  # 14 s: 4 ranks on 2 cores (pytest -m long)
def test_hsdp_2x2_equals_one_rank(tmp_path):
    runs = {"one": (1, "train.shard_degree=0"), "hsdp": (4, "train.shard_degree=2")}
    out = {}
    for name, (nproc, layout) in runs.items():
        cmd = torchrun_cmd("sft", QUICK / "sft.yaml", tmp_path / name, [*ARGS, layout], nproc=nproc)
        res = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        out[name] = res.stdout
    assert "model: FSDP, sharded over 1 rank(s)" in out["one"]
    assert "model: HSDP, 2 replicas x 2 shards" in out["hsdp"]
    one, hsdp = losses(tmp_path / "one"), losses(tmp_path / "hsdp")
    assert [m["step"] for m in hsdp] == [1, 2, 3]
    for a, b in zip(one, hsdp):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_a_shard_degree_that_does_not_divide_the_ranks_is_refused():
    d = Dist(rank=0, world_size=4, local_rank=0, device=None, mesh="flat")
    assert shard_mesh(d, 0) == "flat" and shard_mesh(d, 4) == "flat"
    for bad in (3, 8):
        with pytest.raises(ValueError, match=rf"train.shard_degree={bad} must divide the number of ranks \(4\)"):
            shard_mesh(d, bad)
