"""2 ranks (torchrun, gloo) give the same SFT loss and gradient as 1 rank on the same global batch."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from llama_posttrain.train.distributed import torchrun_command

WORKER = Path(__file__).parent / "dist_sft_worker.py"
ROOT = Path(__file__).parent.parent


def run(nproc, out):
    cmd = torchrun_command(str(WORKER), nproc, [str(out)])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, timeout=300)
    return torch.load(out, weights_only=True)


@pytest.mark.slow
@pytest.mark.long
def test_sft_two_ranks_equal_one(tmp_path):
    one, two = run(1, tmp_path / "one.pt"), run(2, tmp_path / "two.pt")
    assert torch.allclose(one["loss"], two["loss"], atol=1e-12, rtol=0)
    for k in one["grads"]:
        assert torch.allclose(one["grads"][k], two["grads"][k], atol=1e-12, rtol=0), k
    assert one["loss"] > 0
