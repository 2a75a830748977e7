"""Where the quickstart's wall time goes: the README's main job (2 rounds of the recipe on the tiny model, 2 CPU
ranks), job by job, and what starting a job costs on this machine.

    python experiments/bench/quickstart_time.py                  # runs the quickstart into a temp root, then the tables
    python experiments/bench/quickstart_time.py --run runs/quickstart          # a finished run folder's tables
    python experiments/bench/quickstart_time.py --run A --before B             # folder A against folder B, side by side

A run folder's jobs are read from their logs (llama_posttrain/driver/launch.py): each attempt's first line, its start
and command (torchrun or a plain process), and the line the driver ends it with, its wall time (a folder of an
earlier version, without it: the time to the next thing the driver did, marked ~). A training job's steps are the
sum of its metrics.jsonl rows' tokens / tokens_per_s; the rest of it is its start, model and data loading, the DPO
reference's precompute, checkpoint writes and the export. Driver: the run's wall time less its jobs' (the data
stage, the DONE markers, sampling's verifier, the report and its plots). What a job's start costs is measured
here too, each variant alternated `--repeat` times: Python and torch's import, our package's import for a
rank, torchrun's agent and rendezvous against the plain process a 1-rank job is now (launch.py). The machine is
shared: the 1-minute load average before and after each measurement is printed, with the CPU time of the run.
Writes experiments/bench/results/quickstart_time.md (--out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ATTEMPT = "=== pipeline: "  # llama_posttrain/driver/processes.py: an attempt's first line, and its last
ENDED = re.compile(r"^=== job ended [-\d :]+: exit code (-?\d+) after ([\d.]+) s$")
STARTED = re.compile(r"^=== pipeline: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d): cd \S+ && (.*)$")


def load() -> float:
    return os.getloadavg()[0]


def kind_of(log: Path, command: str) -> str:
    name = log.name
    if name.startswith("variant_"):
        return "training"
    if name.startswith("sample"):
        return "sampling"
    if name.startswith("eval"):
        return "evaluation"
    if name.startswith("average"):
        return "averaging (a copy)" if " cp -a " in f" {command}" else "averaging"
    return "other"


def step_seconds(run_dir: Path) -> float | None:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sum(r["tokens"] / r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))


def jobs_of(folder: Path) -> list[dict]:
    """Every job attempt under a run folder's stages: its stage, log, kind, how it started, start, seconds."""
    jobs = []
    for log in sorted(folder.glob("round_*/*/*.log")):
        lines = log.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            m = STARTED.match(line)
            if not m:
                continue
            start = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
            seconds = None
            for later in lines[i + 1 :]:
                if later.startswith(ATTEMPT):
                    break
                end = ENDED.match(later)
                if end:
                    seconds = float(end.group(2))
            command = m.group(2)
            how = "torchrun" if "torch.distributed.run" in command else "plain"
            ranks = re.search(r"--nproc_per_node=(\d+)", command)
            stage = f"{log.parent.parent.name}/{log.parent.name}"
            job = {"stage": stage, "log": log.name, "kind": kind_of(log, command), "start": start, "seconds": seconds}
            job |= {"how": how, "ranks": int(ranks.group(1)) if ranks else 1}
            if job["kind"] == "training":
                job["steps"] = step_seconds(log.parent / log.stem)
            jobs.append(job)
    jobs.sort(key=lambda j: j["start"])
    report = folder / "summary.md"
    ends = [j["start"] for j in jobs[1:]] + [report.stat().st_mtime if report.is_file() else jobs[-1]["start"]]
    for j, end in zip(jobs, ends):  # an earlier version's log, no end line: to the next job's start (1 s steps)
        if j["seconds"] is None:
            j["seconds"], j["estimated"] = end - j["start"], True
    return jobs


def run_wall(folder: Path) -> tuple[float, float]:
    """(start, end) of a run: its record's time (pipeline.yaml, written first) to its report's."""
    return (folder / "pipeline.yaml").stat().st_mtime, (folder / "summary.md").stat().st_mtime


def breakdown(folder: Path) -> tuple[dict, list[dict], float]:
    jobs = jobs_of(folder)
    t0, t1 = run_wall(folder)
    wall = t1 - t0
    rows: dict[str, float] = {}
    for j in jobs:
        if j["kind"] == "training":
            steps = j.get("steps") or 0.0
            rows["training: steps"] = rows.get("training: steps", 0.0) + steps
            rest = "training: start, loading, reference, checkpoints, export"
            rows[rest] = rows.get(rest, 0.0) + j["seconds"] - steps
        else:
            rows[j["kind"]] = rows.get(j["kind"], 0.0) + j["seconds"]
    rows["driver: data, markers, verifier, report, plots, between jobs"] = wall - sum(j["seconds"] for j in jobs)
    return rows, jobs, wall


# ------------------------------------------------------------------------------------------ job starts

NOOP = """import sys, time
t0 = time.time()
import torch, torch.distributed as dist
{imports}
dist.init_process_group("gloo")
dist.barrier()
dist.destroy_process_group()
"""
PLAIN = "1 rank, plain process: torch, a process group"
AVERAGE = "average of one model: the averaging job (before)"
COPY = "average of one model: the driver's copy (now)"
TORCHRUN = ": torch, a process group"
RANK_IMPORTS = "import llama_posttrain.train.distributed, llama_posttrain.train.loop, llama_posttrain.llama.generate"
# An evaluation or sampling job's start: its modules, then the model it evaluates loaded (weights read into a
# model built on the meta device), as evaluation.py and sampling.py do before their first token.
JOB_IMPORTS = "import llama_posttrain.jobs.evaluation, llama_posttrain.jobs.sampling\nfrom llama_posttrain.llama import load_model"
EVAL_START = "1 rank, plain process: + the evaluation job's modules, its model loaded"


def _timed_call(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed(cmd: list[str], env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def start_costs(repeat: int, folder: Path) -> list[tuple[str, float, float, float]]:
    """(what, median seconds, load before, load after) of each way a job's process starts, alternated; and the
    average of one model (the run's round 1 SFT model) as averaging job and as the driver's copy of it."""
    sys.path.insert(0, str(REPO))
    from llama_posttrain.driver.processes import free_port, single_rank_env
    from llama_posttrain.driver.stage_jobs import copy_folder

    py, work = sys.executable, Path(tempfile.mkdtemp(prefix="qs_time_"))
    bare, ranked = work / "bare.py", work / "ranked.py"
    bare.write_text(NOOP.format(imports=""))
    ranked.write_text(NOOP.format(imports=RANK_IMPORTS))
    one = folder / "round_1" / "sft" / "variant_0" / "model"
    job = work / "job.py"
    job.write_text(NOOP.format(imports=f"{JOB_IMPORTS}\nload_model({str(one)!r})"))
    threads = {"OMP_NUM_THREADS": "1"}
    variants = {
        "python, nothing imported": lambda: timed([py, "-c", "pass"]),
        "python, import torch": lambda: timed([py, "-c", "import torch"]),
        PLAIN: lambda: timed([py, "-u", str(bare)], {**single_rank_env(free_port()), **threads}),
        f"1 rank, torchrun{TORCHRUN}": lambda: timed(
            [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(bare)], threads
        ),
        f"2 ranks, torchrun{TORCHRUN}": lambda: timed(
            [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(bare)], threads
        ),
        "1 rank, plain process: + our training and sampling modules": lambda: timed(
            [py, "-u", str(ranked)], {**single_rank_env(free_port()), **threads}
        ),
    }
    if one.is_dir():
        variants[EVAL_START] = lambda: timed([py, "-u", str(job)], {**single_rank_env(free_port()), **threads})
        average = [py, str(REPO / "llama_posttrain/jobs/average.py"), str(one)]
        variants[AVERAGE] = lambda: timed([*average, "--out", str(work / "average_job")], threads)
        variants[COPY] = lambda: _timed_call(lambda: copy_folder(one, work / "copy"))  # in the driver's process
    times: dict[str, list[float]] = {k: [] for k in variants}
    loads: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeat):
        for name, fn in variants.items():
            before = load()
            times[name].append(fn())
            loads[name] += [before, load()]
    return [(n, statistics.median(times[n]), min(loads[n]), max(loads[n])) for n in variants]


def started(job: dict, costs: dict) -> float:
    """A job's start by the measured costs: its launch (torchrun's agent and workers, or one plain process) with
    torch and a process group, and our modules' import on top (a rank's or the averaging job's)."""
    if job["kind"] == "averaging (a copy)":
        return 0.0
    ours = costs["1 rank, plain process: + our training and sampling modules"] - costs[PLAIN]
    if job["kind"] == "averaging":
        return costs["python, import torch"] + ours
    if job["how"] == "plain":
        return costs[PLAIN] + ours
    return costs[f"{job['ranks']} rank{'s' if job['ranks'] > 1 else ''}, torchrun{TORCHRUN}"] + ours


# ------------------------------------------------------------------------------------------ the report


def per_job_table(jobs: list[dict], before: list[dict] | None) -> list[str]:
    head = "| stage | job | started as | seconds |" + (" before |" if before is not None else "")
    lines = [head, "|---|---|---|---:|" + ("---:|" if before is not None else "")]
    old = {(j["stage"], j["log"]): j for j in before or []}
    for j in jobs:
        secs = f"{'~' if j.get('estimated') else ''}{j['seconds']:.1f}"
        if j.get("steps"):
            secs += f" (steps {j['steps']:.1f})"
        how = "copy, no process" if j["kind"] == "averaging (a copy)" else f"{j['how']}, {j['ranks']} rank(s)"
        if j["kind"] == "averaging" and j["how"] == "plain":
            how = "plain, 1 process"
        row = f"| {j['stage']} | {j['log'].removesuffix('.log')} | {how} | {secs} |"
        if before is not None:
            o = old.get((j["stage"], j["log"]))
            row += f" {'~' if o and o.get('estimated') else ''}{o['seconds']:.1f} |" if o else " - |"
        lines.append(row)
    return lines


def table(folder: Path, before: Path | None, measured: dict | None, costs) -> str:
    rows, jobs, wall = breakdown(folder)
    old = breakdown(before) if before is not None else None
    names = list(dict.fromkeys([*rows, *(old[0] if old else {})]))
    cols = "| component | seconds | share |" + (" before (s) | before share |" if old else "")
    out = [
        f"# Quickstart wall time: where it goes ({datetime.date.today()})",
        "",
        "`python llama_posttrain/driver/pipeline.py --config experiments/quickstart/pipeline.yaml` (2 rounds, tiny "
        f"model, 2 CPU ranks). Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads per rank from the driver. Run folder: `{folder}`"
        + (f", against `{before}`" if before else "")
        + ".",
    ]
    if measured:
        out += [
            "",
            f"Run measured here: wall {measured['wall']:.1f} s, CPU {measured['cpu']:.1f} s (user + sys of every "
            f"process; {measured['cpu'] / measured['wall']:.2f} cores busy on average), 1-minute load average "
            f"{measured['load_before']:.2f} before, {measured['load_after']:.2f} after.",
        ]
    out += ["", cols, "|---|---:|---:|" + ("---:|---:|" if old else "")]
    for n in names:
        s = rows.get(n, 0.0)
        row = f"| {n} | {s:.1f} | {s / wall:.1%} |"
        if old:
            o = old[0].get(n, 0.0)
            row += f" {o:.1f} | {o / old[2]:.1%} |"
        out.append(row)
    total = f"| **total (the run's wall)** | **{wall:.1f}** | 100% |"
    out.append(total + (f" **{old[2]:.1f}** | 100% |" if old else ""))
    count = {}
    for j in jobs:
        count[j["kind"]] = count.get(j["kind"], 0) + 1
    processes = sum(1 for j in jobs if j["kind"] != "averaging (a copy)")
    torchruns = sum(1 for j in jobs if j["how"] == "torchrun")
    out += [
        "",
        f"Jobs: {len(jobs)} ({json.dumps(count)}); {processes} processes started, {torchruns} through torchrun.",
    ]
    if old:
        oc = sum(1 for j in old[1] if j["how"] == "torchrun")
        op = sum(1 for j in old[1] if j["kind"] != "averaging (a copy)")
        out[-1] += f" Before: {len(old[1])} jobs, {op} processes, {oc} through torchrun."
    if any(j.get("estimated") for j in [*jobs, *(old[1] if old else [])]):
        out += [
            "",
            "~: a log without the driver's end line (an earlier version): the time to the next job's start, the driver's work between them included (1 s steps).",
        ]
    if costs:
        out += ["", "What starting a job's process costs here (median of the runs, alternated):", ""]
        out += ["| process | seconds | load (1 min) |", "|---|---:|---|"]
        out += [f"| {n} | {s:.2f} | {lo:.2f}-{hi:.2f} |" for n, s, lo, hi in costs]
        starts = [started(j, {n: s for n, s, *_ in costs}) for j in jobs]
        out += ["", f"Of the jobs' seconds above, about {sum(starts):.0f} s ({sum(starts) / wall:.1%} of the run) are their "
                "processes' starts, by these costs (torchrun or not, ranks, our modules' import)."]  # fmt: skip
        if old:
            before_starts = sum(started(j, {n: s for n, s, *_ in costs}) for j in old[1])
            out[-1] += f" Before: about {before_starts:.0f} s ({before_starts / old[2]:.1%})."
    out += ["", "## Per job", "", *per_job_table(jobs, old[1] if old else None)]
    return "\n".join(out) + "\n"


def run_quickstart(root: Path) -> tuple[Path, dict]:
    cmd = [sys.executable, str(REPO / "llama_posttrain/driver/pipeline.py"), "--config",
           str(REPO / "experiments/quickstart/pipeline.yaml"), f"root={root}"]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    load_before, t0 = load(), time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return root / "quickstart", {
        "wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "load_before": load_before, "load_after": load()
    }  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a finished quickstart run folder (default: run one into --root)")
    ap.add_argument("--root", type=Path, help="where to run it (default: a temp folder)")
    ap.add_argument("--before", type=Path, help="another run folder, shown beside (the version before a change)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each job-start measurement (0: none)")
    ap.add_argument("--out", type=Path, default=REPO / "experiments/bench/results/quickstart_time.md")
    args = ap.parse_args(argv)
    measured = None
    folder = args.run
    if folder is None:
        folder, measured = run_quickstart(args.root or Path(tempfile.mkdtemp(prefix="quickstart_time_")))
        summary = (folder / "summary.md").read_text()
        same = summary == (REPO / "experiments/quickstart/results/summary.md").read_text()
        print(f"summary.md {'equals' if same else 'DIFFERS FROM'} experiments/quickstart/results/summary.md")
    costs = start_costs(args.repeat, folder) if args.repeat else None
    text = table(folder.resolve(), args.before.resolve() if args.before else None, measured, costs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
