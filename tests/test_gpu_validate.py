"""The CPU-side parts of experiments/gpu/validate.py (argument parsing, the plan and what it leaves
out, running parts within budgets, the results table) and experiments/gpu/checks.py's logic run
on the CPU at small sizes, so that a GPU hour is not spent finding a typo."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import llama.model

ROOT = Path(__file__).parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", ROOT / "experiments" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


validate = load("validate")
checks = load("checks")


def test_arguments():
    args = validate.parse_args([])
    assert args.parts == ["kernels", "flex", "step", "logprob", "generate"] and args.budget == 570
    assert args.logprob_ns == [4096, 32768] and args.out == ROOT / "experiments/gpu/results.md"
    args = validate.parse_args(["--parts", "flex", "kernels", "--budget", "60", "--logprob-ns", "8192"])
    assert args.parts == ["flex", "kernels"] and args.budget == 60 and args.logprob_ns == [8192]
    for bad in (["--parts", "everything"], ["--budget", "0"], ["--budget", "soon"]):
        with pytest.raises(SystemExit):
            validate.parse_args(bad)
    assert sum(p.budget_s for p in validate.PARTS) <= 570 < 600  # one H100 command: 10 minutes


def test_missing_pieces_are_left_out_with_a_note(monkeypatch):
    monkeypatch.setattr(validate.importlib.util, "find_spec", lambda name: None)  # no liger, no transformers
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    args = validate.parse_args([])
    argv = validate.logprob_argv(args)
    methods = argv[argv.index("--methods") + 1 : argv.index("--repeats")]
    assert methods == ["matmul", "compile", "ours_torch", "ours_triton"]
    assert argv[argv.index("--ns") + 1 : argv.index("--methods")] == ["4096", "32768"]
    notes = validate.plan_notes(validate.PARTS)
    assert "logprob: method liger left out: liger-kernel is not installed" in notes
    assert "logprob: method torch_lce left out: this torch has no F.linear_cross_entropy" in notes
    assert any(n.startswith("generate: transformers is not installed") for n in notes)
    assert validate.plan_notes([p for p in validate.PARTS if p.name == "kernels"]) == []


def test_dry_run_needs_no_gpu_and_a_real_run_refuses_without_one(capsys, monkeypatch):
    assert validate.main(["--dry-run", "--parts", "kernels", "logprob"]) == 0
    out = capsys.readouterr().out
    assert "python experiments/gpu/checks.py kernels" in out and "experiments/bench/logprob.py --ns 4096" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        validate.main(["--parts", "kernels"])


LOGPROB_OUTPUT = """## target log-probs fwd+bwd, 2026-11-21
device: NVIDIA H100; torch 2.11; triton 3.6; H=4096, V=128256, bfloat16
| N | method | time (ms) | TFLOP/s (6NHV) | % of matmul | peak extra (MiB) | vs floor |
|---:|---|---:|---:|---:|---:|---:|
| 4096 | matmul | 1.2 | 700.00 |  | 0 |  |
| 4096 | ours_triton | 9.0 | 350.00 | 50% | 2100 | 1.02x |
| 4096 | compile | n/a: OutOfMemoryError | | | | |
"""


def test_benchmark_tables_become_rows():
    rows = validate.table_rows("logprob", LOGPROB_OUTPUT, 2)
    assert [r["check"] for r in rows] == ["4096 matmul", "4096 ours_triton", "4096 compile"]
    assert (
        rows[1]["value"]
        == "time (ms) 9.0, TFLOP/s (6NHV) 350.00, % of matmul 50%, peak extra (MiB) 2100, vs floor 1.02x"
    )
    assert [r["status"] for r in rows] == ["info", "info", "fail"]


def python_part(name, code, budget_s=30, parse=None):
    return validate.Part(name, budget_s, lambda args: ["-c", code], parse)


def test_parts_run_within_budgets_and_the_table_says_what_happened(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "MIN_START_S", 1.0)
    row = json.dumps({"part": "a", "check": "x | y", "status": "pass", "value": "1.0", "note": ""})
    bad = json.dumps({"part": "b", "check": "z", "status": "fail", "value": "9", "note": "too big"})
    parts = [
        python_part("ok", f"print('@@row {row}')"),
        python_part("failed_check", f"print('@@row {bad}')"),
        python_part("crash", "import sys; print('something broke'); sys.exit(3)"),
        python_part("silent", "pass"),
        python_part("bench", f"print({LOGPROB_OUTPUT!r})", parse=lambda out: validate.table_rows("bench", out, 2)),
        # a child that would outlive its parent: killed with it at the timeout
        python_part("slow", "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                    "'import time; time.sleep(60)']); print('started', flush=True); time.sleep(60)", budget_s=60),
        python_part("late", "print('never runs')"),
    ]  # fmt: skip
    args = validate.parse_args(["--budget", "5"])  # "slow" is cut at the end of the total budget
    results = {r.part: r for r in validate.run_parts(parts, args)}
    assert {k: r.status for k, r in results.items()} == {
        "ok": "pass", "failed_check": "fail", "crash": "fail", "silent": "fail", "bench": "fail", "slow": "timeout",
        "late": "skip",
    }  # fmt: skip
    assert results["crash"].note == "exit code 3" and "something broke" in results["crash"].tail
    assert results["silent"].note == "no results printed" and results["failed_check"].note == "1 failed check(s)"
    assert sum(r.seconds for r in results.values()) < 6 and "started" in results["slow"].tail
    assert "budget left" in results["late"].note
    out = tmp_path / "gpu" / "results.md"
    validate.write_atomic(out, validate.render(list(results.values()), ["# header"], ["a note"]))
    text = out.read_text()
    assert list(out.parent.iterdir()) == [out]  # no temp file left
    assert "| ok | pass |" in text and "| a | x \\| y | pass | 1.0 |  |" in text and "- a note" in text
    assert "## crash: output tail (fail)" in text and "## bench: benchmark output" in text
    assert "| bench | 4096 compile | fail | time (ms) n/a: OutOfMemoryError |" in text


def rows_of(out: str) -> list[dict]:
    return [json.loads(line[len(checks.ROW) :]) for line in out.splitlines() if line.startswith(checks.ROW)]


def flex_on_the_cpu(q, k, v, block_mask, enable_gqa):
    """FlexAttention has no CPU backward: the block mask's own rule (mask_mod) applied densely."""
    from torch.nn.attention.flex_attention import create_mask

    mask = create_mask(block_mask.mask_mod, q.shape[0], 1, q.shape[2], k.shape[2], device=q.device)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def test_flex_check_logic_on_the_cpu(one_rank, monkeypatch, capsys):
    """The check's own logic (FSDP on one rank, block masks vs dense, full gradients), fp32, small rows."""
    monkeypatch.setattr(llama.model, "_compiled_flex", flex_on_the_cpu)
    monkeypatch.setattr(llama.model, "_compiled_create_block_mask", llama.model.create_block_mask)
    checks.flex(precisions=("fp32",), modes=((False, False), (True, False)), max_len=256)
    rows = rows_of(capsys.readouterr().out)
    assert [r["check"] for r in rows] == ["fp32 eager", "fp32 eager + activation checkpointing"]
    assert all(r["status"] == "pass" for r in rows), rows


def test_step_check_logic_on_the_cpu(one_rank, capsys):
    """SFT then DPO steps through train/loop.py's Trainer at a tiny preset: the rows it reports."""
    checks.step(["sft", "dpo"], tokens_per_microbatch=1024, steps=1, compile=False, ac=False, preset="debug")
    rows = rows_of(capsys.readouterr().out)
    assert len(rows) == 10
    assert [r["status"] for r in rows if "finite loss" in r["check"]] == ["pass", "pass"]
    assert {r["value"] for r in rows if r["check"].endswith("MFU")} == {"n/a"}  # no known peak on a CPU
    assert rows[0]["check"].startswith("sft debug (1024 tokens/micro-batch") and rows[5]["check"].startswith("dpo")
