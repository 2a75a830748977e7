"""Every CPU benchmark of the training path in one run, and one table of them: each benchmark's ratio against
its peer (TRL) and against this machine's limit (MFU: model FLOPs over step time x a 2048^3 fp32 matmul's rate
in the same process), the command that made each row and the machine's 1-minute load before and after it.

    python experiments/bench/run_all.py --out experiments/bench/results/summary.md
    python experiments/bench/run_all.py --quickstart RUN_FOLDER ...   # also a finished quickstart run's wall

Runs, one after the other (each writes its own detailed table in experiments/bench/results/ too):
  dpo_step.py     ours vs TRL's DPOTrainer, a live reference and a precomputed one (`--reference both`)
  sft_step.py     ours vs TRL's SFTTrainer
  rm_step.py      ours vs TRL's RewardTrainer
  mfu.py          our side of the three: MFU and where the rest of the step goes
  data_loading.py the loader's resident bytes per token over a 14.78M-token pass, first and second start
Numbers from a machine with other work running are not comparable: read the load columns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESULTS = "experiments/bench/results"
STEPS = ["--warmup", "1", "--steps", "3"]


def run(cmd: list[str]) -> tuple[str, float, float]:
    """cmd from the repository root -> (its stdout, the 1-minute load before, after); exits if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    before = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, *cmd[1:]], cwd=REPO, capture_output=True, text=True)
    after = os.getloadavg()[0]
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"failed (exit code {proc.returncode}): {' '.join(cmd)}")
    return proc.stdout, before, after


def step_rows(summary: Path, command: str, load: tuple[float, float], mfu: dict[str, float]) -> list[str]:
    rows = [json.loads(line) for line in summary.read_text().splitlines()]
    peers = {r["benchmark"]: r for r in rows if r["peer"]}
    out = []
    for r in rows:
        peer = peers[r["benchmark"]]
        vs = f"{peer['time_s'] / r['time_s']:.2f}x / {r['peak_gib'] / peer['peak_gib']:.2f}x"
        m = mfu.get(r["benchmark"]) if r["side"].startswith("ours (") else None  # mfu.py runs our default side
        out.append(
            f"| {r['benchmark']} | {r['side']} | {r['time_s']:.3f} s/step, {r['throughput']:.2f} {r['unit']} "
            f"| {r['peak_gib']:.2f} GiB | {'-' if r['peer'] else vs} | {f'{m:.1%}' if m is not None else '-'} "
            f"| `{command}` | {load[0]:.2f} / {load[1]:.2f} |"
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=f"{RESULTS}/summary.md", help="the table (replaced)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["dpo", "sft", "rm", "mfu", "data"])
    ap.add_argument("--quickstart", type=Path, help="a finished quickstart run folder: its wall time, a row")
    ap.add_argument("--quickstart-before", type=float, help="the wall time (s) it is compared with")
    args = ap.parse_args()
    lines, mfu = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        if "mfu" not in args.skip:  # first: its numbers go into the step rows
            cmd = ["python", "experiments/bench/mfu.py", "--out", f"{RESULTS}/mfu.md", "--json", f"{tmp}/mfu.json"]
            _, *mfu_load = run(cmd)
            got = json.loads(Path(f"{tmp}/mfu.json").read_text())
            names = {
                "sft": "SFT step",
                "rm": "RM step",
                "dpo": "DPO step",
                "dpo-precomputed": "DPO step (precomputed reference)",
            }
            mfu = {names[k]: v for k, v in got.items()}
            lines.append(
                "| MFU of our steps | SFT / RM / DPO live / DPO precomputed | "
                + " / ".join(f"{v:.1%}" for v in got.values())
                + f" | - | - | - | `{' '.join(cmd[:-2])}` | {mfu_load[0]:.2f} / {mfu_load[1]:.2f} |"
            )
        for name, script, extra in (
            ("dpo", "dpo_step.py", ["--reference", "both"]),
            ("sft", "sft_step.py", []),
            ("rm", "rm_step.py", []),
        ):
            if name in args.skip:
                continue
            summary = Path(tmp) / f"{name}.jsonl"
            cmd = ["python", f"experiments/bench/{script}", *STEPS, *extra, "--out", f"{RESULTS}/{script[:-3]}.md"]
            _, *load = run([*cmd, "--summary", str(summary)])
            lines += step_rows(summary, " ".join(cmd), load, mfu)
        if "data" not in args.skip:
            cmd = ["python", "experiments/bench/data_loading.py", "--full-pass", "--dialogs", "36500", "--workers", "1"]
            stdout, *load = run(cmd)
            for r in (json.loads(x) for x in stdout.splitlines() if x.startswith("{")):
                if "start" not in r:
                    continue
                own = (r["ru_maxrss"] - r["after_imports"]) / r["tokens"]
                lines.append(
                    f"| data loader, {r['tokens'] / 1e6:.2f}M tokens | {r['start']} start | {own:.2f} B/token over "
                    f"the imports; whole process {r['ru_maxrss'] / r['tokens']:.2f} (imports alone "
                    f"{r['imports_only'] / r['tokens']:.2f}) | {r['ru_maxrss'] / 2**30:.2f} GiB | goal <= 16 B/token "
                    f"| - | `{' '.join(cmd)}` | {load[0]:.2f} / {load[1]:.2f} |"
                )
    if args.quickstart:
        from quickstart_time import run_wall

        t0, t1 = run_wall(
            args.quickstart / "quickstart" if (args.quickstart / "quickstart").is_dir() else args.quickstart
        )
        before = (
            f"{args.quickstart_before / (t1 - t0):.2f}x faster than {args.quickstart_before:.0f} s"
            if args.quickstart_before
            else "-"
        )
        lines.append(
            f"| quickstart main job | ours | {t1 - t0:.0f} s wall | - | {before} | - "
            "| `python llama_posttrain/driver/pipeline.py --config experiments/quickstart/pipeline.yaml` | - |"
        )
    import torch

    text = [
        f"# CPU benchmarks, one table ({datetime.date.today()})",
        "",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"made by `python experiments/bench/run_all.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "vs peer: the peer's step time / ours (throughput ratio), our peak memory / the peer's. MFU: model FLOPs "
        "(llama_posttrain/train/flops.py) / (step time x this machine's fp32 2048^3 matmul rate, same threads, same "
        "process), from mfu.py's own timed steps. Details in each benchmark's file beside this one.",
        "",
        "| benchmark | side | time, throughput | peak memory | vs peer: throughput / memory | MFU | command "
        "| load (1 min) before / after |",
        "|---|---|---|---:|---:|---:|---|---:|",
        *lines,
    ]
    Path(REPO / args.out).write_text("\n".join(text) + "\n", encoding="utf-8")
    print("\n".join(text))


if __name__ == "__main__":
    main()
