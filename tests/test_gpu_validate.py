"""The CPU-side parts of experiments/gpu/validate.py (argument parsing, the plan and what it leaves
out, running parts within budgets, the results table) and experiments/gpu/checks.py's logic run
on the CPU at small sizes, so that a GPU hour is not spent finding a typo."""

import importlib.util
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llama_posttrain.llama.model as llama_model
import llama_posttrain.train.loop as train_loop

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
    assert args.parts == ["smoke", "kernels", "flex", "step", "step-ac", "logprob", "generate"] and args.budget == 540
    assert args.logprob_hs == [4096, 2048] and args.logprob_ns == [32768, 12289, 4096]
    assert 12289 % 64 and args.out == ROOT / "experiments/gpu/results.md"  # an N no tile divides
    args = validate.parse_args(["--parts", "flex", "kernels", "--budget", "60", "--logprob-ns", "8192"])
    assert args.parts == ["flex", "kernels"] and args.budget == 60 and args.logprob_ns == [8192]
    for bad in (["--parts", "everything"], ["--budget", "0"], ["--budget", "soon"]):
        with pytest.raises(SystemExit):
            validate.parse_args(bad)
    assert sum(p.budget_s for p in validate.PARTS) <= 540  # one 10-minute command: 9 minutes and a 60 s margin


def test_missing_pieces_are_left_out_with_a_note(monkeypatch):
    monkeypatch.setattr(validate.importlib.util, "find_spec", lambda name: None)  # no liger
    monkeypatch.delattr(torch.nn.functional, "linear_cross_entropy", raising=False)
    args = validate.parse_args([])
    argv = validate.logprob_argv(args)
    methods = argv[argv.index("--methods") + 1 : argv.index("--once")]
    assert methods == ["matmul", "ours_triton", "ours_torch", "compile"]
    assert argv[argv.index("--hs") + 1 : argv.index("--ns")] == ["4096", "2048"]
    assert argv[argv.index("--ns") + 1 : argv.index("--methods")] == ["32768", "12289", "4096"]
    assert argv[argv.index("--once") + 1 : argv.index("--skip-rate")] == ["compile"]
    notes = validate.plan_notes(validate.PARTS)
    assert "logprob: method liger left out: liger-kernel is not installed" in notes
    for m in ("torch_lce", "torch_lce:auto", "torch_lce:aspect_ratio", "torch_lce:aspect_ratio:8"):
        assert f"logprob: method {m} left out: this torch has no F.linear_cross_entropy" in notes
    assert any(n.startswith("generate: HF generate, no-fan-out and per-sample rows left out") for n in notes)
    assert validate.plan_notes([p for p in validate.PARTS if p.name == "flex"]) == []
    assert validate.plan_notes([p for p in validate.PARTS if p.name == "kernels"])[0].startswith(
        "kernels: tests/test_kernels.py -k stats is not run here"
    )


def test_a_torch_without_chunking_options_keeps_the_reference_row(monkeypatch):
    """torch 2.11 (the GPU's) may have F.linear_cross_entropy without `options`: only the chunked rows go."""
    monkeypatch.setattr(torch.nn.functional, "linear_cross_entropy", lambda input, weight, target, reduction="mean": 0)
    missing = validate.missing_logprob_methods()
    assert (
        "torch_lce" not in missing
        and "torch_lce:auto" in missing
        and "no chunking options" in missing["torch_lce:auto"]
    )
    assert "torch_lce" in validate.logprob_methods()


def test_every_chunking_setting_is_one_this_torch_accepts():
    import torch.nn.functional as F

    if "options" not in inspect.signature(F.linear_cross_entropy).parameters:
        pytest.skip("this torch has no LinearCrossEntropyOptions")
    assert not {m for m in validate.missing_logprob_methods() if m.startswith("torch_lce")}


def test_dry_run_needs_no_gpu_and_a_real_run_refuses_without_one(capsys, monkeypatch):
    assert validate.main(["--dry-run", "--parts", "kernels", "logprob"]) == 0
    out = capsys.readouterr().out
    assert "experiments/gpu/checks.py kernels" in out and "experiments/bench/logprob.py --hs 4096 2048" in out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        validate.main(["--parts", "kernels"])


def test_dry_run_plan_is_bf16_first_and_fits_nine_minutes(capsys):
    assert validate.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("plan: 7 part(s), bf16 first in each; total budget 540 s")
    names = ["smoke", "kernels", "flex", "step", "step-ac", "logprob", "generate"]
    rows = {line.split()[0]: line for line in lines if line.split()[0] in names}
    assert list(rows) == names
    measures = {}  # each part's line is followed by what it measures
    for i, line in enumerate(lines):
        if line.split()[0] in names:
            assert lines[i + 1].startswith("          measures: ")
            measures[line.split()[0]] = lines[i + 1]
    assert all("[bf16" in line for name, line in rows.items() if name != "smoke")  # dtype order: bf16 first
    budgets = [int(line.split()[1]) for line in rows.values()]
    total = next(line for line in lines if line.startswith("total"))
    assert sum(budgets) <= 540 and total.startswith(f"total     {sum(budgets)} s")
    assert list(checks.KERNEL_DTYPES) == ["bfloat16", "float32"]
    assert checks.flex.__defaults__[0] == ("bf16", "fp32")
    # the steps: SFT then DPO (DPO's policy reuses SFT's compiled blocks), activation checkpointing off, then on
    # and profiled (the profiled step is not in the first part's cold start)
    assert "checks.py step sft dpo" in rows["step"] and "checks.py step sft dpo" in rows["step-ac"]
    assert "--profile" not in rows["step"] and "--profile" in rows["step-ac"]
    assert "--activation-checkpointing" not in rows["step"] and "--activation-checkpointing" in rows["step-ac"]
    assert "MFU" in measures["step"] and "activation checkpointing off" in measures["step"]
    assert "activation checkpointing on" in measures["step-ac"] and "one full micro-batch" in measures["step"]
    assert all(g in measures["step-ac"] for g in ("communication", "log-prob", "optimizer", "attention", "matmul"))
    assert "STATS variant" in measures["kernels"] and "Triton kernel and a torch.compile" in measures["smoke"]
    # the log-prob benchmark: both hidden sizes, the awkward N, ours vs its peers, the skip rate
    logprob = rows["logprob"]
    assert "--hs 4096 2048" in logprob and "--ns 32768 12289 4096" in logprob and "--skip-rate" in logprob
    methods = logprob.split("--methods ")[1].split(" --")[0].split()
    assert methods[:3] == ["matmul", "ours_triton", "ours_torch"]  # the achievable rate first, then ours
    assert set(methods) - {"liger"} >= {"torch_lce", "compile"} and "--once compile" in logprob
    if "options" in inspect.signature(torch.nn.functional.linear_cross_entropy).parameters:
        assert {"torch_lce:auto", "torch_lce:aspect_ratio", "torch_lce:aspect_ratio:8"} <= set(methods)
    assert "tile-skip rate" in measures["logprob"] and "peaked" in measures["logprob"]
    # sampling: eager vs compiled at a realistic batch
    gen = rows["generate"]
    assert "--prompts 16 --samples 8 --prompt-len 256 --new 128" in gen and "--methods fanout compiled" in gen
    # a short total: the plan cuts the parts to what is left and says which would be skipped
    assert validate.main(["--dry-run", "--budget", "100"]) == 0
    out = capsys.readouterr().out
    assert "flex        30 s  at   70 s" in out and "step         0 s" in out and "skipped" in out


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
    assert validate.main(["--out", str(out), "--budget", "4"]) == 1  # "slow" times out at the total's end
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
    assert out.returncode == 0 and out.stdout.startswith("plan: 7 part(s), bf16 first in each; total budget 540 s")


def test_peak_flops_per_device_variant(monkeypatch, capsys):
    """Dense bf16 peaks by torch.cuda.get_device_name; the specific names win over the family's."""
    from llama_posttrain.train import flops

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
        assert flops.device_peak_flops(name) == peak, name
    assert flops.peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert flops.peak_flops(torch.device("cuda")) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    monkeypatch.setattr(flops, "_UNKNOWN_DEVICES", set())
    assert flops.peak_flops(torch.device("cuda")) is None and flops.peak_flops(torch.device("cuda")) is None
    assert capsys.readouterr().out.count("MFU not logged: no bf16 peak FLOP/s known for 'Some Future GPU'") == 1


LOGPROB_OUTPUT = """## target log-probs fwd+bwd, 2026-11-21
device: NVIDIA H100; torch 2.11; triton 3.6; V=128256, bfloat16
| H | N | method | time (ms) | TFLOP/s (6NHV) | % of matmul | peak extra (MiB) | vs floor |
|---:|---:|---|---:|---:|---:|---:|---:|
| 4096 | 4096 | matmul | 1.2 | 700.00 |  | 0 |  |
| 4096 | 4096 | ours_triton | 9.0 | 350.00 | 50% | 2100 | 1.02x |
| 4096 | 4096 | compile | n/a: OutOfMemoryError | | | | |

| H | N | logits | tiles skipped | of | skip rate | no-target tiles | backward (ms) | tile |
|---:|---:|---|---:|---:|---:|---:|---:|---|
| 4096 | 4096 | peaked | 28000 | 32064 | 87.3% | 28100 | 20.0 | 128x128 |
"""


def test_benchmark_tables_become_rows():
    rows = validate.table_rows("logprob", LOGPROB_OUTPUT, 3)
    checks_ = ["4096 4096 matmul", "4096 4096 ours_triton", "4096 4096 compile", "4096 4096 peaked"]
    assert [r["check"] for r in rows] == checks_
    assert (
        rows[1]["value"]
        == "time (ms) 9.0, TFLOP/s (6NHV) 350.00, % of matmul 50%, peak extra (MiB) 2100, vs floor 1.02x"
    )
    assert rows[3]["value"].startswith("tiles skipped 28000, of 32064, skip rate 87.3%")
    assert [r["status"] for r in rows] == ["info", "info", "fail", "info"]


def python_part(name, code, budget_s=30, parse=None):
    return validate.Part(name, budget_s, lambda args: ["-c", code], parse)


@pytest.mark.long  # 5 s of real timeouts (pytest -m long); the budget logic's own test stays in CI
def test_parts_run_within_budgets_and_the_table_says_what_happened(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "MIN_START_S", 1.0)
    row = json.dumps({"part": "a", "check": "x | y", "status": "pass", "value": "1.0", "note": ""})
    bad = json.dumps({"part": "b", "check": "z", "status": "fail", "value": "9", "note": "too big"})
    parts = [
        python_part("ok", f"print('@@row {row}')"),
        python_part("failed_check", f"print('@@row {bad}')"),
        python_part("crash", "import sys; print('something broke'); sys.exit(3)"),
        python_part("silent", "pass"),
        python_part("bench", f"print({LOGPROB_OUTPUT!r})", parse=lambda out: validate.table_rows("bench", out, 3)),
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
    assert "| bench | 4096 4096 compile | fail | time (ms) n/a: OutOfMemoryError |" in text


def rows_of(out: str) -> list[dict]:
    return [json.loads(line[len(checks.ROW) :]) for line in out.splitlines() if line.startswith(checks.ROW)]


def flex_on_the_cpu(q, k, v, block_mask, enable_gqa):
    """FlexAttention has no CPU backward: the block mask's own rule (mask_mod) applied densely."""
    from torch.nn.attention.flex_attention import create_mask

    mask = create_mask(block_mask.mask_mod, q.shape[0], 1, q.shape[2], k.shape[2], device=q.device)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def test_flex_check_logic_on_the_cpu(one_rank, monkeypatch, capsys):
    """The check's own logic (FSDP on one rank, block masks vs dense, full gradients), fp32, small rows."""
    monkeypatch.setattr(llama_model, "_compiled_flex", flex_on_the_cpu)
    monkeypatch.setattr(llama_model, "_compiled_create_block_mask", llama_model.create_block_mask)
    checks.flex(precisions=("fp32",), modes=((False, False), (True, False)), max_len=256)
    rows = rows_of(capsys.readouterr().out)
    assert [r["check"] for r in rows] == ["fp32 eager", "fp32 eager + activation checkpointing"]
    assert all(r["status"] == "pass" for r in rows), rows


def test_step_check_logic_on_the_cpu(one_rank, capsys, monkeypatch):
    """DPO then SFT steps through llama_posttrain/train/loop.py's Trainer at a tiny preset, each with one profiled
    step: the rows it reports. Each step is one full micro-batch of the one shape both kinds share. The step clock
    waits for the device's work (the optimizer's too) when it starts and before it is read. DPO first: the order
    in which the SFT rows used to count the DPO reference still alive; each kind's trainer and the reference
    are freed before the next kind's trainer is built. The first profiled step fails (as torch 2.11's profiler
    API did): one fail row, and every other row of both kinds is still written. An unlogged step (timed=False)
    after the timed ones: its host syncs, counted on CUDA only (the CPU's row says so)."""
    import gc
    import weakref

    import llama_posttrain.train.distributed as distributed

    synced, calls, timed_calls, models, trainers, alive_at_build = [], [], [], [], [], []
    monkeypatch.setattr(train_loop, "sync_clock", synced.append)
    real_step, real_build, real_post_init = (
        train_loop.Trainer.train_step, distributed.build_model, train_loop.Trainer.__post_init__
    )  # fmt: skip

    def recording_step(self, batch, step, timed=None):
        calls.append((step, [tuple(mb.tokens.shape) for mb in batch.micro_batches]))
        timed_calls.append(timed)
        return real_step(self, batch, step, timed)

    def recording_build(*args, **kwargs):
        models.append(weakref.ref(model := real_build(*args, **kwargs)))
        return model

    def recording_post_init(self):
        gc.collect()
        alive_at_build.append(([m() is not None for m in models], [t() is not None for t in trainers]))
        trainers.append(weakref.ref(self))
        real_post_init(self)

    profiles = []

    def profiled_kernels(prof):  # the first call fails, as reading linked_correlation_id did on torch 2.11
        profiles.append(prof)
        if len(profiles) == 1:
            raise AttributeError("'FunctionEvent' object has no attribute 'linked_correlation_id'")
        return real_kernels(prof)

    real_kernels = checks.profiled_kernels
    monkeypatch.setattr(checks, "profiled_kernels", profiled_kernels)
    monkeypatch.setattr(train_loop.Trainer, "train_step", recording_step)
    monkeypatch.setattr(train_loop.Trainer, "__post_init__", recording_post_init)
    monkeypatch.setattr(distributed, "build_model", recording_build)
    checks.step(
        ["dpo", "sft"], tokens_per_microbatch=1024, steps=1, compile=False, ac=False, preset="debug", profile=True
    )
    rows = rows_of(capsys.readouterr().out)
    # the SFT trainer is built with the DPO trainer and the DPO reference gone (the policy stays)
    assert alive_at_build == [([True, True], []), ([True, False], [False])]
    assert rows[0]["check"] == "step-time breakdown patterns" and "log-prob: TargetLogprobs" in rows[0]["value"]
    per_kind = 6 + len(checks.BREAKDOWN) + 2  # the step's and sync rows, one per group, the total, largest "other"
    assert len(rows) == 1 + 6 + 1 + per_kind  # DPO: its step's rows and the failed breakdown's one; SFT: all
    failed = [r for r in rows if r["status"] == "fail"]
    assert [r["check"] for r in failed] == [rows[1]["check"].split(":")[0] + ": breakdown"]
    assert "AttributeError" in failed[0]["value"] and failed[0]["check"].startswith("dpo")
    assert len(synced) == 2 * timed_calls.count(True)  # every timed step synced at its start and end
    assert timed_calls.count(False) == 2  # one unlogged step per kind
    assert all(len(shapes) == 1 for _, shapes in calls)  # one micro-batch a step
    assert {s for _, shapes in calls for s in shapes} == {(1, 1024)}  # one shape, both kinds: compiled once
    kinds = [[]]  # the calls per kind: warm-ups (step 1: the first, then one per new shape), one timed, one profiled
    for i, call in enumerate(calls):
        if i and call[0] == 1 and calls[i - 1][0] > 1:
            kinds.append([])
        kinds[-1].append(call)
    assert len(kinds) == 2
    for steps in kinds:
        warm = [set(shapes) for n, shapes in steps if n == 1]
        timed = [set(shapes) for n, shapes in steps if n > 1]
        assert len(timed) == 3 and steps[: len(warm)] == [(1, sorted(w)) for w in warm]  # timed, unlogged, profiled
        assert all(t <= set().union(*warm) for t in timed)  # no shape is first met (compiled) on the clock
    assert [r["status"] for r in rows if "finite loss" in r["check"]] == ["pass", "pass"]
    assert {r["value"] for r in rows if r["check"].endswith("MFU")} == {"n/a"}  # no known peak on a CPU
    assert rows[1]["check"].startswith("dpo debug (1024 tokens/micro-batch") and rows[8]["check"].startswith("sft")
    syncs = [r for r in rows if ": host syncs" in r["check"]]
    assert [(r["status"], r["value"]) for r in syncs] == [("info", "not checked")] * 2  # CUDA only
    assert "one micro-batch a step" in rows[1]["note"] and "% of its slots real tokens" in rows[1]["note"]
    shares = [r for r in rows if r["check"].startswith("sft") and ": breakdown, " in r["check"]][
        : len(checks.BREAKDOWN)
    ]
    assert [r["check"].split(": breakdown, ")[1] for r in shares] == [g for g, _ in checks.BREAKDOWN]
    ms = {r["check"].split(": breakdown, ")[1]: float(r["value"].split(" ms")[0]) for r in shares}
    assert ms["matmul"] > 0 and ms["log-prob"] > 0 and ms["optimizer"] > 0  # CPU ops, grouped by the same rules


def test_host_syncs_counts_torchs_sync_warnings_where_they_were_given(monkeypatch, capsys):
    """checks.host_syncs on a CUDA device (the debug mode's switch stubbed: the CPU has none): one entry per
    warning torch gives in sync debug mode, at its caller in this repository; the mode is "warn" during the
    call and restored after; other warnings still reach the user. report_syncs: an unlogged step passes with
    none, fails with any, the places named."""
    import warnings

    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step(n):
        for _ in range(n):
            warnings.warn(f"{checks.SYNC_WARNING} (Triggered internally at c10/cuda/CUDAFunctions.cpp)", stacklevel=1)
        warnings.warn("something else", stacklevel=1)
        return n

    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match="something else"):
        out, found = checks.host_syncs(cuda, step, 3)
    line = inspect.getsourcelines(step)[1] + 2
    assert out == 3 and modes == ["warn", 0]
    assert found == [f"tests/test_gpu_validate.py:{line} step"] * 3
    with pytest.warns(UserWarning):  # the CPU: run as is, nothing counted, the mode not touched
        assert checks.host_syncs(torch.device("cpu"), step, 1) == (1, []) and modes == ["warn", 0]
    checks.report_syncs("sft", [found, found[:1]], [], 2, cuda)
    checks.report_syncs("dpo", [[]], found, 1, cuda)
    rows = rows_of(capsys.readouterr().out)
    assert [(r["check"], r["status"], r["value"]) for r in rows] == [
        ("sft: host syncs, a logged step", "info", "2"),  # the median of 3 and 1
        ("sft: host syncs, an unlogged step", "pass", "0"),
        ("dpo: host syncs, a logged step", "info", "0"),
        ("dpo: host syncs, an unlogged step", "fail", "3"),
    ]
    assert f"3x tests/test_gpu_validate.py:{line} step" in rows[3]["note"]


def test_training_steps_are_one_full_micro_batch_each_as_the_loader_packs_them():
    """Each step: the examples first-fit packing put in one micro-batch before the next example spilled over,
    made a step by training's DataLoader (static shapes): the full shape, the loader's counts."""
    import random

    from llama_posttrain.data.rows import plan

    for kind in ("sft", "dpo"):
        steps, info = checks.training_steps(kind, 500, 1024, 4096, 3, random.Random(1))
        assert len(steps) == 3 and info["dropped"] >= 0
        for s in steps:
            (mb,) = s.micro_batches
            assert tuple(mb.tokens.shape) == (4, 1024)
            assert s.num_targets == mb.num_targets and s.num_pairs == (len(mb.group_uid) if kind == "dpo" else 0)
            lengths = [int((mb.doc_ids[r] >= 0).sum()) for r in range(4)]
            assert all(n > 0 for n in lengths)  # every row used
        real = sum(int((mb.doc_ids >= 0).sum()) for s in steps for mb in s.micro_batches)
        assert info["fill"] == pytest.approx(real / (3 * 4 * 1024)) and info["fill"] > 0.6
    # the first-fit rule the loader plans by: the stream is cut where an example opened a second micro-batch
    assert len(plan([1024, 1024, 1024, 1024, 1], 1024, 4096)) == 2


class Kernel211(tuple):  # torch 2.11's profiler_util.Kernel: a namedtuple (name, device, duration)
    name = property(lambda self: self[0])
    device = property(lambda self: self[1])
    duration = property(lambda self: self[2])


class Interval211:
    def __init__(self, start, end):
        self.start, self.end = start, end

    def elapsed_us(self):
        return self.end - self.start


class Event211:
    """A FunctionEvent with only the attributes torch 2.11 has that profiled_kernels reads: no
    linked_correlation_id (added after 2.11), so reading it raises AttributeError."""

    __slots__ = ("name", "device_type", "is_async", "cpu_parent", "kernels", "time_range", "is_user_annotation")

    def __init__(self, name, device_type, start, end, parent=None, kernels=(), annotation=False):
        self.name, self.device_type, self.is_async, self.cpu_parent = name, device_type, False, parent
        self.kernels, self.time_range, self.is_user_annotation = list(kernels), Interval211(start, end), annotation

    @property
    def self_cpu_time_total(self):
        return self.time_range.elapsed_us()


def test_profiled_kernels_reads_torch_2_11_events():
    """Each device event gets its launching op from the op's `kernels` (what 2.11 links), a kernel no op lists
    gets no context, and a GPU user annotation (no kernel) is left out."""
    from torch.autograd import DeviceType

    cpu, cuda = DeviceType.CPU, DeviceType.CUDA
    linear = Event211("aten::linear", cpu, 0, 100)
    mm = Event211("aten::mm", cpu, 1, 50, linear, [Kernel211(("sm90_xmma_gemm_bf16", 0, 30.0))])
    fn = Event211("TritonTargetLogprobs", cpu, 60, 90, None, [Kernel211(("_forward_kernel", 0, 90.0))])
    step = Event211("Optimizer.step#AdamW.step", cpu, 95, 99)
    events = [
        linear, mm, fn, step,
        Event211("sm90_xmma_gemm_bf16", cuda, 200, 230),
        Event211("_forward_kernel", cuda, 240, 330),
        Event211("triton_poi_fused_add_0", cuda, 330, 335),  # launched outside any op
        Event211("Optimizer.step#AdamW.step", cuda, 335, 735, annotation=True),  # a span, not a kernel
    ]  # fmt: skip
    prof = type("Prof", (), {"events": lambda self: events})()
    with pytest.raises(AttributeError):
        mm.linked_correlation_id  # noqa: B018  what the breakdown read before: not in 2.11
    kernels = checks.profiled_kernels(prof)
    assert kernels == [
        ("aten::mm < aten::linear", "sm90_xmma_gemm_bf16", 30.0),
        ("TritonTargetLogprobs", "_forward_kernel", 90.0),
        ("", "triton_poi_fused_add_0", 5.0),
    ]
    assert checks.group_times(kernels) == dict(
        communication=0.0, **{"log-prob": 90.0}, optimizer=0.0, attention=0.0, matmul=30.0, other=5.0
    )
    # without device events (a CPU run): the CPU ops and their self time, each with its callers
    cpu_only = checks.profiled_kernels(type("Prof", (), {"events": lambda self: events[:4]})())
    assert cpu_only[1] == ("aten::linear", "aten::mm", 49) and len(cpu_only) == 4


def test_a_part_gets_the_seconds_earlier_parts_left_unused(monkeypatch):
    """A part's limit: its budget plus what the parts before it left unused, within the total; a later part
    still gets its own budget."""
    part = validate.Part("p", 10, lambda args: [])
    assert validate.part_timeout(part, budgets_before=30, elapsed=12, total=100) == (28, 18)  # 18 s unused
    assert validate.part_timeout(part, budgets_before=30, elapsed=35, total=100) == (10, 0)  # none left over
    assert validate.part_timeout(part, budgets_before=30, elapsed=95, total=100) == (5, 0)  # the total's end
    monkeypatch.setattr(validate, "MIN_START_S", 0.5)
    parts = [
        python_part("quick", "pass", budget_s=3),
        python_part("long", 'import time; time.sleep(2); print(\'@@row {"status": "pass"}\')', budget_s=1),
        python_part("last", 'print(\'@@row {"status": "pass"}\')', budget_s=1),
    ]
    results = validate.run_parts(parts, validate.parse_args(["--budget", "5"]))
    assert [r.status for r in results] == ["fail", "pass", "pass"]  # "quick" prints no row
    assert results[1].budget_s > 2 and results[2].budget_s >= 1


def test_smoke_says_what_the_toolchain_lacks(monkeypatch, capsys):
    """On the CPU (the interpreter, torch.compile's eager backend): three passes; then no compiler, no
    Python.h and a kernel that cannot build: fail rows that say so."""
    checks.smoke("cpu", "eager")
    rows = rows_of(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["pass"] * 3 and rows[0]["check"] == "C compiler and Python headers"
    monkeypatch.setattr(checks, "toolchain", lambda: (None, Path("/nowhere/Python.h")))

    def no_launcher(x):
        raise RuntimeError("Failed to compile the launcher: cc not found")

    monkeypatch.setattr(checks, "_add_one", no_launcher)
    checks.smoke("cpu", "eager")
    rows = rows_of(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["fail", "fail", "pass"]
    assert "none found" in rows[0]["value"] and "/nowhere/Python.h missing" in rows[0]["value"]
    assert rows[1]["value"] == "RuntimeError: Failed to compile the launcher: cc not found"


def test_kernel_stats_check_on_the_interpreter(monkeypatch, capsys):
    """The kernels part's STATS rows on the CPU (the interpreter): pass; a kernel whose hits are off fails."""
    from llama_posttrain import kernels

    checks.kernel_stats("float32", "cpu", [(40, 12, 301)])
    checks.kernel_stats("bfloat16", "cpu", [(37, 24, 333)])
    rows = rows_of(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["pass", "pass"] and rows[0]["value"].startswith("hits equal")
    real = kernels.target_logprobs

    def off_by_one(*args, **kw):
        out = real(*args, **kw)
        return out._replace(is_argmax=~out.is_argmax) if kw.get("stats") else out

    monkeypatch.setattr(kernels, "target_logprobs", off_by_one)
    checks.kernel_stats("float32", "cpu", [(40, 12, 301)])
    assert rows_of(capsys.readouterr().out)[0]["status"] == "fail"


# kernel names as a CUDA profile of one training step shows them (H100, torch 2.x), each with the op that
# launched it and that op's callers
STAND_IN_KERNELS = [
    ("c10d::_allgather_base_ < FSDP::all_gather (layers.0)", "ncclDevKernel_AllGather_RING_LL", 30.0),
    ("fsdp::all_gather_copy_in < FSDP::all_gather (layers.0)", "void at::native::elementwise_kernel<128, 4>", 2.0),
    ("TritonTargetLogprobs", "_forward_kernel", 900.0),
    ("aten::mm < TritonTargetLogprobsBackward < autograd::engine::evaluate_function: TritonTargetLogprobsBackward",
     "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", 700.0),
    ("TritonTargetLogprobsBackward < autograd::engine::evaluate_function: TritonTargetLogprobsBackward",
     "_dlogits_kernel", 800.0),
    ("aten::logsumexp < _ChunkedTargetLogprobs", "void at::native::reduce_kernel<512, 1>", 50.0),
    ("aten::_fused_adamw_ < Optimizer.step#AdamW.step",
     "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 400.0),
    ("aten::_foreach_norm", "void at::native::multi_tensor_apply_kernel<LpNormFunctor>", 20.0),
    ("", "triton_tem_fused_flex_attention_0", 600.0),
    ("", "triton_tem_fused_flex_attention_backward_2", 1200.0),
    ("aten::_scaled_dot_product_flash_attention", "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", 10.0),
    ("aten::mm", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", 3000.0),
    ("aten::addmm < aten::linear", "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16", 500.0),
    ("aten::mm", "some_future_gemm_kernel_name", 5.0),  # matched by its op
    ("", "triton_poi_fused__to_copy_add_mul_rsqrt_0", 300.0),
    ("aten::copy_", "Memcpy DtoD (Device -> Device)", 3.0),
]  # fmt: skip


def test_breakdown_groups_kernels_by_name_and_launching_op():
    groups = checks.group_times(STAND_IN_KERNELS)
    assert list(groups) == ["communication", "log-prob", "optimizer", "attention", "matmul", "other"]
    assert groups == {
        "communication": 32.0,
        "log-prob": 900.0 + 700.0 + 800.0 + 50.0,  # the LM head's GEMMs inside our Function count here
        "optimizer": 420.0,
        "attention": 1810.0,
        "matmul": 3505.0,
        "other": 303.0,
    }
    assert sum(groups.values()) == sum(t for _, _, t in STAND_IN_KERNELS)
    assert checks.kernel_groups(STAND_IN_KERNELS[:3]) == ["communication", "communication", "log-prob"]
    assert checks.group_times([]) == dict.fromkeys(groups, 0.0)
