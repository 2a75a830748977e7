"""The CPU-side parts of experiments/gpu/validate.py (argument parsing, the plan and what it leaves
out, running parts within budgets, the results table) and experiments/gpu/checks.py's logic run
on the CPU at small sizes, so that a GPU hour is not spent finding a typo."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llama.model
import train.loop

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
    assert args.parts == ["kernels", "flex", "step-dpo", "step-sft", "logprob", "generate"] and args.budget == 540
    assert args.logprob_ns == [4096, 32768] and args.out == ROOT / "experiments/gpu/results.md"
    args = validate.parse_args(["--parts", "flex", "kernels", "--budget", "60", "--logprob-ns", "8192"])
    assert args.parts == ["flex", "kernels"] and args.budget == 60 and args.logprob_ns == [8192]
    for bad in (["--parts", "everything"], ["--budget", "0"], ["--budget", "soon"]):
        with pytest.raises(SystemExit):
            validate.parse_args(bad)
    assert sum(p.budget_s for p in validate.PARTS) <= 540  # one 10-minute command: 9 minutes and a 60 s margin


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
    assert "experiments/gpu/checks.py kernels" in out and "experiments/bench/logprob.py --ns 4096" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        validate.main(["--parts", "kernels"])


def test_dry_run_plan_is_bf16_first_and_fits_nine_minutes(capsys):
    assert validate.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plan: 6 part(s), bf16 first in each; total budget 540 s")
    rows = {line.split()[0]: line for line in lines[1:7]}
    assert list(rows) == ["kernels", "flex", "step-dpo", "step-sft", "logprob", "generate"]
    assert all("[bf16" in line for line in rows.values())  # every part's dtype order starts with bf16
    budgets = [int(line.split()[1]) for line in rows.values()]
    assert sum(budgets) <= 540 and lines[7].startswith(f"total     {sum(budgets)} s")
    assert "checks.py step dpo" in rows["step-dpo"] and "checks.py step sft" in rows["step-sft"]
    assert list(checks.KERNEL_DTYPES) == ["bfloat16", "float32"]
    assert checks.flex.__defaults__[0] == ("bf16", "fp32")
    # a short total: the plan cuts the parts to what is left and says which would be skipped
    assert validate.main(["--dry-run", "--budget", "100"]) == 0
    out = capsys.readouterr().out
    assert "flex        40 s  at   60 s" in out and "step-dpo     0 s" in out and "skipped" in out


def test_out_gets_each_part_as_it_ends_and_rows_while_it_runs(tmp_path, monkeypatch):
    """main() with stand-in parts: --out holds a part's table when the next one starts, and a running
    part's rows before it ends (what a killed command leaves behind)."""
    out = tmp_path / "elsewhere" / "results.md"
    first = json.dumps({"part": "first", "check": "a", "status": "pass", "value": "1"})
    slow = json.dumps({"part": "slow", "check": "b", "status": "pass", "value": "2"})
    seen = (  # the second part passes only if the first one's row is already in --out
        f"import json, pathlib; ok = '| first | a | pass | 1 |' in pathlib.Path({str(out)!r}).read_text(); "
        "print('@@row ' + json.dumps({'part': 'second', 'check': 'saw first', 'status': 'pass' if ok else 'fail'}))"
    )
    parts = [
        python_part("first", f"print('@@row {first}')"),
        python_part("second", seen),
        python_part("slow", f"import time; print('@@row {slow}', flush=True); time.sleep(60)", budget_s=3),
    ]
    monkeypatch.setattr(validate, "PARTS", parts)
    monkeypatch.setattr(validate, "MIN_START_S", 1.0)
    monkeypatch.setattr(validate, "PROGRESS_S", 0.5)
    monkeypatch.setattr(validate, "environment_header", lambda argv: ["# header"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    written = []
    real_write = validate.write_atomic
    monkeypatch.setattr(validate, "write_atomic", lambda path, text: (written.append(text), real_write(path, text)))
    assert validate.main(["--out", str(out)]) == 1  # "slow" times out
    assert (
        "| first | pass |" in written[1] and "| second | pending |" in written[1] and "| slow | pending |" in written[1]
    )
    running = [t for t in written if "| slow | running |" in t]
    assert any("| slow | b | pass | 2 |" in t for t in running)  # the running part's rows, before it is killed
    text = out.read_text()
    assert text == written[-1] and "| second | saw first | pass |" in text and "| slow | timeout |" in text
    assert "pending" not in text and "running" not in text


def test_a_killed_validate_leaves_no_part_running(tmp_path):
    """validate.py killed with SIGKILL (a command past its limit): its running part dies with it."""
    pid_file = tmp_path / "part.pid"
    part = f"import os, time, pathlib; pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid())); time.sleep(60)"
    outer = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); import importlib.util as u; "
        f"s = u.spec_from_file_location('v', {str(ROOT / 'experiments/gpu/validate.py')!r}); v = u.module_from_spec(s); "
        f"sys.modules['v'] = v; s.loader.exec_module(v); v.run_command([sys.executable, '-c', {part!r}], 60, {{}})"
    )
    proc = subprocess.Popen([sys.executable, "-c", outer])
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    proc.kill()
    proc.wait()
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":  # a zombie: dead, not yet reaped
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the part outlived validate.py")


def test_validate_sh_dry_run_uses_python3_or_PYTHON():
    text = (ROOT / "experiments/gpu/validate.sh").read_text()
    assert 'exec "${PYTHON:-python3}" experiments/gpu/validate.py "$@"' in text
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(ROOT / "experiments/gpu/validate.sh"), "--dry-run"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.startswith("plan: 6 part(s), bf16 first in each; total budget 540 s")


def test_peak_flops_per_device_variant(monkeypatch, capsys):
    """Dense bf16 peaks by torch.cuda.get_device_name; the specific names win over the family's."""
    expect = {
        "NVIDIA H100 80GB HBM3": 989e12,  # SXM5
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12,
        "NVIDIA H200 NVL": 835e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "NVIDIA B200": 2250e12,
        "NVIDIA GeForce RTX 4090": None,
        "NVIDIA H100": None,  # an H100 whose variant the name does not say: no guess
    }
    for name, peak in expect.items():
        assert train.loop.device_peak_flops(name) == peak, name
    assert train.loop.peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert train.loop.peak_flops(torch.device("cuda")) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    monkeypatch.setattr(train.loop, "_UNKNOWN_DEVICES", set())
    assert train.loop.peak_flops(torch.device("cuda")) is None and train.loop.peak_flops(torch.device("cuda")) is None
    assert capsys.readouterr().out.count("MFU not logged: no bf16 peak FLOP/s known for 'Some Future GPU'") == 1


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


def test_step_check_logic_on_the_cpu(one_rank, capsys, monkeypatch):
    """SFT then DPO steps through train/loop.py's Trainer at a tiny preset: the rows it reports. The
    step clock waits for the device's work (the optimizer's too) when it starts and before it is read."""
    synced = []
    monkeypatch.setattr(train.loop, "sync_clock", synced.append)
    checks.step(["sft", "dpo"], tokens_per_microbatch=1024, steps=1, compile=False, ac=False, preset="debug")
    rows = rows_of(capsys.readouterr().out)
    assert len(rows) == 10
    assert len(synced) == 2 * 2 * 2  # two kinds x (warm-up + one timed step) x (start, end)
    assert [r["status"] for r in rows if "finite loss" in r["check"]] == ["pass", "pass"]
    assert {r["value"] for r in rows if r["check"].endswith("MFU")} == {"n/a"}  # no known peak on a CPU
    assert rows[0]["check"].startswith("sft debug (1024 tokens/micro-batch") and rows[5]["check"].startswith("dpo")
