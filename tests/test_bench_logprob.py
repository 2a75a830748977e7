"""experiments/bench/logprob.py on the CPU: the order of its jobs, a worker that dies mid-run, the
table rows, the chunking settings of F.linear_cross_entropy, and the tile-skip rate of our Triton
backward under the interpreter (flat logits skip nothing, peaked ones every tile without a target)."""

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
spec = importlib.util.spec_from_file_location("bench_logprob", ROOT / "experiments/bench/logprob.py")
logprob = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = logprob
spec.loader.exec_module(logprob)


def test_jobs_run_the_first_shape_first_and_once_methods_there_only():
    jobs = logprob.plan_jobs([4096, 2048], [32768, 12289], 128256, "bfloat16", ["matmul", "ours_triton", "compile"],
                             {"compile"}, 3, skip=True)  # fmt: skip
    names = [(j["H"], j["N"], j.get("method") or j["logits"]) for j in jobs]
    assert names == [
        (4096, 32768, "matmul"), (4096, 32768, "ours_triton"), (4096, 32768, "compile"),
        (4096, 12289, "matmul"), (4096, 12289, "ours_triton"),
        *[(4096, 32768, logits) for logits in logprob.SKIP_LOGITS],
        (2048, 32768, "matmul"), (2048, 32768, "ours_triton"), (2048, 12289, "matmul"), (2048, 12289, "ours_triton"),
    ]  # fmt: skip


def test_a_dead_worker_is_replaced_after_the_job_it_died_on():
    """One worker for all jobs (as on CUDA): an error ends it with an error row, the next worker goes on."""
    job = dict(kind="method", N=8, H=16, V=64, dtype="float32", repeats=1)
    jobs = [{**job, "method": m} for m in ("matmul", "no_such_method", "naive", "ours_torch")]
    results = list(logprob.run_jobs(jobs, per_process=False))
    assert [j["method"] for j, _ in results] == ["matmul", "no_such_method", "naive", "ours_torch"]
    assert results[1][1] == {"error": "ValueError: no_such_method"}
    assert all("time" in r and r["peak"] >= 0 for _, r in (results[0], *results[2:]))
    rates = {}
    rows = [logprob.table_row(j, r, rates) for j, r in results]
    assert rows[1] == "| 16 | 8 | no_such_method | n/a: ValueError: no_such_method | | | | |"
    assert rates[16, 8] == results[0][1]["tflops"] and rows[2].split(" | ")[5].endswith("%")  # % of matmul


def test_chunking_settings_map_to_torchs_options():
    import torch.nn.functional as F

    if "options" not in inspect.signature(getattr(F, "linear_cross_entropy", lambda: 0)).parameters:
        pytest.skip("this torch has no LinearCrossEntropyOptions")
    assert logprob.lce_options(None) is None
    assert logprob.lce_options("auto").chunking_method == "auto"
    assert logprob.lce_options("aspect_ratio:8").chunking_method == "aspect_ratio:8"
    fixed = logprob.lce_options("chunk=256")
    assert fixed.batch_chunk_size == 256 and fixed.chunking_method is None
    with pytest.raises(ValueError):
        logprob.lce_options("bogus")
    h, w = torch.randn(40, 16, dtype=torch.float64), torch.randn(100, 16, dtype=torch.float64)
    t = torch.randint(0, 100, (40,))
    exact = torch.log_softmax(h @ w.T, -1).gather(1, t[:, None])[:, 0]
    for setting in ("torch_lce", "torch_lce:auto", "torch_lce:aspect_ratio", "torch_lce:chunk=7"):
        torch.testing.assert_close(logprob.make_fn(setting)(h, w, t), exact)


def test_skip_rate_on_flat_and_peaked_logits():
    """Under TRITON_INTERPRET=1 (tests/conftest.py): 32 x 64 tiles, 2 token blocks x 32 vocabulary tiles."""
    cpu = torch.device("cpu")
    flat, peaked, mixed = (logprob.skip_rate(64, 128, 2048, "float32", k, 0, cpu) for k in logprob.SKIP_LOGITS)
    assert flat["tiles"] == 64 and flat["tile"] == "32x64" and flat["skipped"] == 0
    assert 0 < peaked["skipped"] == peaked["no_target"]  # every tile that holds no target of its block
    assert mixed["skipped"] == 0  # a flat row in each block keeps it from skipping
