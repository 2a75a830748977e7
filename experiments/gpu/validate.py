"""Every GPU-only check in one run, one results table: experiments/gpu/validate.sh calls this.

    experiments/gpu/validate.sh --out $OUT/results.md  # all parts, within --budget seconds (default 540)
    experiments/gpu/validate.sh --parts kernels flex   # some of them
    experiments/gpu/validate.sh --dry-run              # the plan: commands, budgets, what is skipped and why

Made for one 10-minute GPU command that may be killed: the budgets sum to at most 540 s (9 minutes,
a 60 s margin for the interpreter, imports and the machine), every part runs bf16 first (the rows
that matter most come before a timeout can cut them), and the results file is rewritten after every
part and every PROGRESS_S seconds while one runs, so whatever finished is there when the command
is killed. Parts, in order (each its own process, killed at its time budget plus the seconds the
parts before it left unused; a part that would start with less than MIN_START_S seconds of the
total budget left is skipped and says so; the dry run prints what each measures):
  smoke     a C compiler and Python.h, a Triton kernel and a torch.compile built and run: a machine that
            cannot compile says so in seconds, with the reason (experiments/gpu/checks.py)
  kernels   the Triton kernel on real CUDA against float64, bf16 then fp32, and its STATS variant, the tile
            config pinned (deterministic=True: one compile per kernel, no autotuning)
  flex      FlexAttention forward/backward, compiled with activation checkpointing, vs the dense path, bf16 then fp32
  step      1-GPU SFT then DPO steps (live bf16 reference) at the llama3.2-1b shape, one full micro-batch a step,
            activation checkpointing off: tokens/s per GPU, MFU, peak memory
  step-ac   the same with activation checkpointing on; then one profiled step each: CUDA time by kernel group
  logprob   experiments/bench/logprob.py at H 4096 then 2048 (V 128256), N 32768, 12289 (no tile's multiple),
            4096, bf16: a plain matmul (the achievable rate), ours (Triton, chunked torch), F.linear_cross_entropy
            (reference and chunked settings), Liger, torch.compile (each left out with a note where this torch /
            env lacks it); our backward's tile-skip rate on flat and peaked logits
  generate  experiments/bench/generate.py at 1B, bf16, 16 prompts x 8 samples: samples/s eager vs compile=True

Writes --out (default experiments/gpu/results.md: device, versions, date, command; a summary per
part; every check's row; the benchmark tables; the output tail of any part that failed). The
benchmarks also append their tables to experiments/bench/results/. Needs nothing from the network.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECKS = "experiments/gpu/checks.py"
ROW = "@@row "
MIN_START_S = 20  # a part gets at least this long, or is skipped
PROGRESS_S = 15.0  # while a part runs, its rows so far are written to --out this often
BUDGET_S = 540  # the default total: 9 minutes, 60 s under one 10-minute command
# ours against its peers first; each torch_lce:<setting> is one chunking setting of F.linear_cross_entropy
# (experiments/bench/logprob.py); compile (slow to compile) at the first shape only
LOGPROB_METHODS = [
    "matmul", "ours_triton", "ours_torch", "torch_lce:auto", "torch_lce:aspect_ratio", "torch_lce:aspect_ratio:8",
    "torch_lce", "liger", "compile",
]  # fmt: skip
LOGPROB_ONCE = ["compile"]
GENERATE_METHODS = ["fanout", "compiled"]  # eager vs compile=True (HF, no-fan-out and per-sample rows: time)


@dataclass
class Part:
    name: str
    budget_s: int  # the part is killed after this long
    argv: Callable  # args -> the command (after the python executable)
    parse: Callable | None = None  # stdout -> rows, for the benchmark scripts that print markdown tables
    what: str = ""  # the plan's one-line description (dtype order first)
    measures: Callable | None = None  # args -> what the dry run lists under the part: every measurement


@dataclass
class Result:
    part: str
    status: str  # pass | fail | timeout | skip
    seconds: float = 0.0
    budget_s: float = 0.0
    note: str = ""
    rows: list[dict] = field(default_factory=list)
    tables: str = ""  # markdown printed by a benchmark script
    tail: str = ""  # the end of the output, kept when the part failed


# ----------------------------------------------------------------------------- what runs


def _module(path: str):
    """A script of this repository as a module (its tables of settings; torch is imported anyway)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def missing_logprob_methods() -> dict[str, str]:
    """Methods of experiments/bench/logprob.py this environment cannot run -> why."""
    out = {}
    if importlib.util.find_spec("liger_kernel") is None:
        out["liger"] = "liger-kernel is not installed"
    import torch.nn.functional as F

    lce = [m for m in LOGPROB_METHODS if m.split(":")[0] == "torch_lce"]
    if not hasattr(F, "linear_cross_entropy"):
        return out | {m: "this torch has no F.linear_cross_entropy" for m in lce}
    chunked = [m for m in lce if ":" in m]
    try:
        has_options = "options" in inspect.signature(F.linear_cross_entropy).parameters
    except (TypeError, ValueError):  # a builtin without a Python signature
        has_options = False
    if not has_options:
        return out | {m: "this torch's F.linear_cross_entropy has no chunking options" for m in chunked}
    bench = _module("experiments/bench/logprob.py")  # its chunking settings -> torch's options
    for m in chunked:
        try:
            bench.lce_options(m.partition(":")[2])
        except (ImportError, TypeError, ValueError) as e:
            out[m] = f"this torch's LinearCrossEntropyOptions refuses it ({type(e).__name__}: {e})"
    return out


def logprob_methods() -> list[str]:
    missing = missing_logprob_methods()
    return [m for m in LOGPROB_METHODS if m not in missing]


def logprob_argv(args) -> list[str]:
    methods = logprob_methods()
    return [
        "experiments/bench/logprob.py", "--hs", *map(str, args.logprob_hs), "--ns", *map(str, args.logprob_ns),
        "--methods", *methods, "--once", *[m for m in LOGPROB_ONCE if m in methods], "--skip-rate",
        "--repeats", "3", "--out", "experiments/bench/results/logprob.md",
    ]  # fmt: skip


def logprob_measures(args) -> str:
    methods = logprob_methods()
    once = [m for m in LOGPROB_ONCE if m in methods]
    every = [m for m in methods if m not in once]
    hs, ns = "/".join(map(str, args.logprob_hs)), "/".join(map(str, args.logprob_ns))
    return (
        f"fwd+bwd time, TFLOP/s, % of matmul, peak memory at H {hs} x N {ns} (V 128256), in that order: "
        f"{', '.join(every)}"
        + (f"; {', '.join(once)} at H {args.logprob_hs[0]}, N {args.logprob_ns[0]} only" if once else "")
        + f"; our backward's tile-skip rate at H {args.logprob_hs[0]}, N {args.logprob_ns[0]} on flat, peaked and"
        " peaked-with-every-16th-row-flat logits"
    )


def generate_argv(args) -> list[str]:
    return [
        "experiments/bench/generate.py", "--sizes", "1b", "--prompts", "16", "--samples", "8", "--prompt-len", "256",
        "--new", "128", "--repeats", "2", "--methods", *GENERATE_METHODS, "--out", "experiments/bench/results/generate.md",
    ]  # fmt: skip


def table_rows(part: str, stdout: str, key_columns: int) -> list[dict]:
    """The data lines of the markdown tables a benchmark printed -> rows: the first `key_columns`
    cells name the check, the rest are its value (a cell starting with "n/a" marks a failure)."""
    rows, header = [], None
    for line in stdout.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not set("".join(cells)) <= set("-: "):
            check = " ".join(cells[:key_columns])
            value = ", ".join(f"{h} {c}" for h, c in zip(header[key_columns:], cells[key_columns:]) if c)
            failed = any(c.startswith("n/a") for c in cells[key_columns:])
            rows.append({"part": part, "check": check, "status": "fail" if failed else "info", "value": value})
    return rows


def step_argv(*options: str):
    """SFT then DPO on one policy in one process (one model build; DPO's policy runs the blocks SFT
    compiled, the same shape); the first step of each compiles."""
    return lambda args: [
        CHECKS, "step", "sft", "dpo", "--tokens-per-microbatch", str(args.step_tokens), "--steps", "2", *options,
    ]  # fmt: skip


def step_measures(ac: bool, profile: bool):
    def measures(args) -> str:
        text = (
            f"SFT then DPO, llama3.2-1b, one full micro-batch of {args.step_tokens} tokens a step, compiled, "
            f"activation checkpointing {'on' if ac else 'off'}: tokens/s per GPU, MFU, peak memory, step time "
            "(median of 2 after a compiling one)"
        )
        groups = ", ".join(g for g, _ in _module(CHECKS).BREAKDOWN)
        return text + (f"; one profiled step each: CUDA kernel time by group ({groups})" if profile else "")

    return measures


PARTS = [  # budgets sum to BUDGET_S; each part runs its bf16 rows first
    Part("smoke", 20, lambda args: [CHECKS, "smoke"], what="no dtype order: the toolchain, seconds",
         measures=lambda args: "a C compiler and Python.h found; a Triton kernel and a torch.compile'd function "
         "built and run (each's seconds, or the error)"),
    Part("kernels", 50, lambda args: [CHECKS, "kernels"], what="bf16 then fp32, pinned tiles",
         measures=lambda args: "the Triton kernel vs float64 at 6 sizes up to N 2048 x H 4096 x V 128256; its "
         "STATS variant (argmax hits, logit sums, entropies) at V 128256 and 32000; empty input; tied weights; "
         "bitwise-deterministic backward"),
    Part("flex", 70, lambda args: [CHECKS, "flex"], what="bf16 then fp32",
         measures=lambda args: "FlexAttention (eager; compiled + activation checkpointing) vs the dense mask: "
         "log-probs and gradients of a 2-layer model on packed DPO/SFT rows"),
    Part("step", 135, step_argv(), what="bf16 SFT then DPO, AC off", measures=step_measures(False, False)),
    Part("step-ac", 105, step_argv("--activation-checkpointing", "--profile"), what="bf16 SFT then DPO, AC on",
         measures=step_measures(True, True)),
    Part("logprob", 90, logprob_argv, lambda out: table_rows("logprob", out, 3), what="bf16, H 4096 first",
         measures=logprob_measures),
    Part("generate", 70, generate_argv, lambda out: table_rows("generate", out, 1), what="bf16, eager first",
         measures=lambda args: "llama3.2-1b, 16 prompts x 8 samples, prompts 211-256 tokens, 128 new tokens: "
         "samples/s and tokens/s, eager (fan-out) vs generate(compile=True) (compile time noted)"),
]  # fmt: skip


def plan_notes(parts: list[Part]) -> list[str]:
    """What the plan leaves out and why (printed, and written into the results)."""
    notes = []
    if any(p.name == "logprob" for p in parts):
        for method, why in missing_logprob_methods().items():
            notes.append(f"logprob: method {method} left out: {why}")
    if any(p.name == "kernels" for p in parts):
        notes.append(
            "kernels: tests/test_kernels.py -k stats is not run here: its conftest sets TRITON_INTERPRET=1 and its "
            "tensors are on the CPU (the interpreter, not this GPU); the kernels part checks the STATS variant on CUDA"
        )
    if any(p.name == "generate" for p in parts):
        notes.append(
            "generate: HF generate, no-fan-out and per-sample rows left out of the GPU plan (their time); "
            "experiments/bench/generate.py without --methods runs them"
        )
    return notes


# ----------------------------------------------------------------------------- running

_RUNNING: set[int] = set()  # process groups of the parts now running (killed with validate.py on SIGTERM)


def _die_with_parent() -> None:
    """In the part's process, before it runs: SIGKILL it when validate.py dies, even by SIGKILL
    (Linux prctl PR_SET_PDEATHSIG), so a killed command leaves no part holding the GPU."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _on_sigterm(signum, frame) -> None:
    for pgid in list(_RUNNING):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    raise SystemExit(128 + signum)  # --out holds every part that ended and the rows of the one running


def run_command(
    cmd: list[str], timeout: float, env: dict, progress: Callable | None = None
) -> tuple[int | None, str, float]:
    """-> (exit code or None if killed at the timeout, stdout + stderr, seconds). The command runs
    in its own session, so a timeout kills it with every process it started. progress(output so
    far, seconds) is called every PROGRESS_S seconds while it runs."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        _RUNNING.add(proc.pid)
        rc = None
        while True:
            left = timeout - (time.monotonic() - t0)
            try:
                rc = proc.wait(timeout=max(0.0, min(left, PROGRESS_S)))
                break
            except subprocess.TimeoutExpired:
                if left <= PROGRESS_S:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rc = None
                    break
                if progress is not None:
                    log.seek(0)
                    progress(log.read(), time.monotonic() - t0)
                    log.seek(0, os.SEEK_END)
        _RUNNING.discard(proc.pid)
        log.seek(0)
        return rc, log.read(), time.monotonic() - t0


def part_result(part: Part, rc: int | None, output: str, seconds: float, timeout: float) -> Result:
    rows = [json.loads(line[len(ROW) :]) for line in output.splitlines() if line.startswith(ROW)]
    tables = ""
    if part.parse is not None:
        rows += part.parse(output)
        tables = "\n".join(line for line in output.splitlines() if line.startswith(("|", "##", "device:", "command:")))
    failed_rows = sum(r["status"] == "fail" for r in rows)
    if rc is None:
        status, note = "timeout", f"killed after {timeout:.0f} s; rows so far kept"
    elif rc != 0:
        status, note = "fail", f"exit code {rc}"
    elif failed_rows:
        status, note = "fail", f"{failed_rows} failed check(s)"
    else:
        status, note = "pass", ""
    if not rows and status == "pass":
        status, note = "fail", "no results printed"
    tail = "\n".join(output.splitlines()[-40:]) if status != "pass" else ""
    return Result(part.name, status, seconds, timeout, note, rows, tables, tail)


def part_timeout(part: Part, budgets_before: float, elapsed: float, total: float) -> tuple[float, float]:
    """-> (the part's time limit, the seconds of it carried from earlier parts): its budget plus what the
    parts before it (budgets_before, in all) left unused, within what is left of the total. Each later
    part still has its own budget: the total holds every budget, and only unused seconds move forward."""
    spare = max(0.0, budgets_before - elapsed)
    timeout = min(part.budget_s + spare, total - elapsed)
    return timeout, max(0.0, timeout - part.budget_s)


def run_parts(parts: list[Part], args, python: str = sys.executable, report: Callable | None = None) -> list[Result]:
    """Each part in order within its budget plus the seconds earlier parts left unused (`part_timeout`),
    and what is left of the total; -> one Result each. report(results so far, including the running
    part's partial one and the ones not yet run) is called before each part, every PROGRESS_S seconds
    while one runs, and after each."""

    def pending(done: list[Result], current: Result | None = None) -> list[Result]:
        later = parts[len(done) + (current is not None) :]
        waiting = [Result(p.name, "pending", 0.0, p.budget_s, "not started yet") for p in later]
        return done + ([current] if current else []) + waiting

    def tell(rs: list[Result]) -> None:
        if report is not None:
            report(rs)

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real kernels
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start, results, budgets_before = time.monotonic(), [], 0.0
    for part in parts:
        elapsed = time.monotonic() - start
        left = args.budget - elapsed
        timeout, carried = part_timeout(part, budgets_before, elapsed, args.budget)
        budgets_before += part.budget_s
        if timeout < MIN_START_S:
            results.append(
                Result(part.name, "skip", 0.0, part.budget_s, f"only {max(left, 0):.0f} s of the budget left")
            )
            tell(pending(results))
            continue
        extra = f": {part.budget_s} + {carried:.0f} unused by earlier parts" if carried >= 1 else ""
        print(f"== {part.name} (up to {timeout:.0f} s{extra})", flush=True)
        tell(pending(results, Result(part.name, "running", 0.0, timeout, "started; no rows yet")))

        def progress(output: str, seconds: float, part=part, timeout=timeout) -> None:
            r = part_result(part, 0, output, seconds, timeout)
            r.status, r.note, r.tail = "running", f"{seconds:.0f} s so far; rows so far kept", ""
            tell(pending(results, r))

        rc, output, seconds = run_command([python, *part.argv(args)], timeout, env, progress)
        results.append(part_result(part, rc, output, seconds, timeout))
        tell(pending(results))
        r = results[-1]
        print(f"   {r.status} in {seconds:.0f} s {r.note}", flush=True)
        for x in r.rows:  # at once, not only in --out: a failed smoke says here why the rest will fail
            if x["status"] == "fail":
                print(f"   FAIL {x['check']}: {x.get('value', '')}", flush=True)
    return results


# ----------------------------------------------------------------------------- the results file


def cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render(results: list[Result], header: list[str], notes: list[str]) -> str:
    lines = [*header, ""]
    if notes:
        lines += ["notes:", *[f"- {n}" for n in notes], ""]
    lines += ["## summary", "", "| part | status | time (s) | budget (s) | note |", "|---|---|---:|---:|---|"]
    for r in results:
        lines.append(f"| {r.part} | {r.status} | {r.seconds:.0f} | {r.budget_s:.0f} | {cell(r.note)} |")
    lines += ["", "## checks", "", "| part | check | status | value | note |", "|---|---|---|---|---|"]
    for r in results:
        for x in r.rows:
            values = (x.get(k, "") for k in ("part", "check", "status", "value", "note"))
            lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    for r in results:
        if r.tables:
            lines += ["", f"## {r.part}: benchmark output", "", r.tables]
    for r in results:
        if r.tail:
            lines += ["", f"## {r.part}: output tail ({r.status})", "", "```", r.tail, "```"]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def environment_header(argv: list[str]) -> list[str]:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return [
        f"# GPU validation, {datetime.datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"device: {device}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton_version}; "
        f"python {sys.version.split()[0]}",
        f"command: experiments/gpu/validate.sh {' '.join(argv)}".rstrip(),
    ]


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [p.name for p in PARTS]
    ap.add_argument("--parts", nargs="+", choices=names, default=names, help="default: all, in this order")
    ap.add_argument(
        "--budget", type=float, default=BUDGET_S, help=f"total seconds (default {BUDGET_S}: 9 minutes, 60 s margin)"
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "experiments/gpu/results.md",
        help="the results file, rewritten as each part ends (e.g. $OUT/results.md on a lent machine)",
    )
    ap.add_argument("--logprob-hs", type=int, nargs="+", default=[4096, 2048], help="hidden sizes H (8B, 1B)")
    ap.add_argument(
        "--logprob-ns",
        type=int,
        nargs="+",
        default=[32768, 12289, 4096],
        help="token counts N (12289: no tile's multiple)",
    )
    ap.add_argument("--step-tokens", type=int, default=16384, help="tokens per micro-batch of the 1B steps")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error(f"--budget must be positive, got {args.budget}")
    return args


def plan(parts: list[Part], args) -> list[str]:
    """The dry run's lines: each part's budget (cut to what the total leaves it), its dtype order,
    its command; then the total against --budget."""
    lines, start = [f"plan: {len(parts)} part(s), bf16 first in each; total budget {args.budget:.0f} s"], 0.0
    lines.append("(each part's limit: its budget plus the seconds the parts before it leave unused)")
    for p in parts:
        budget = max(0.0, min(p.budget_s, args.budget - start))
        skip = "  (skipped: under MIN_START_S left)" if budget < MIN_START_S else ""
        lines.append(
            f"{p.name:9s} {budget:4.0f} s  at {start:4.0f} s  [{p.what}]  {Path(sys.executable).name} {' '.join(p.argv(args))}{skip}"
        )
        if p.measures is not None:
            lines.append(f"          measures: {p.measures(args)}")
        start += budget
    total = sum(p.budget_s for p in parts)
    lines.append(f"total    {total:4d} s of parts' budgets (--budget {args.budget:.0f} s; one command: 600 s)")
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    parts = [p for p in PARTS if p.name in args.parts]
    notes = plan_notes(parts)
    if args.dry_run:
        print("\n".join(plan(parts, args)))
        if notes:
            print("\n".join(notes))
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("validate.py: no CUDA device here; these are the GPU-only checks (--dry-run shows the plan)")
    header = environment_header(argv)

    def report(results: list[Result]) -> None:  # the table so far, every time a part moves on
        write_atomic(args.out, render(results, header, notes))

    print(f"results (rewritten as each part ends): {args.out}", flush=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    results = run_parts(parts, args, report=report)
    report(results)
    print(f"results: {args.out}")
    return 0 if all(r.status == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
