"""One markdown table of several benchmarks' `--summary` lines (generate.py, sft_step.py, dpo_step.py):
per benchmark and side its time, throughput, tokens/s and peak memory, with ours against the peer (HF
generate, TRL) of the same benchmark.

    python experiments/bench/summary_table.py SUMMARY.jsonl      # the table, to stdout
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path}:{i}: not a JSON line: {e}") from None
    return rows


def table(rows: list[dict], memory: str = "peak RSS (GiB)") -> list[str]:
    """Rows in the order given; the ratio columns against the benchmark's peer row (throughput: peer's time /
    this one's; peak: this one's / peer's), empty where the benchmark has no peer."""
    peers = {r["benchmark"]: r for r in rows if r["peer"]}
    out = [
        f"| benchmark | side | time (s) | throughput | tokens/s | {memory} | growth over setup (GiB) "
        "| throughput vs peer | peak vs peer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        peer = peers.get(r["benchmark"])
        vs = f"{peer['time_s'] / r['time_s']:.2f}x | {r['peak_gib'] / peer['peak_gib']:.2f}x" if peer else " | "
        out.append(
            f"| {r['benchmark']} | {r['side']} | {r['time_s']:.3f} | {r['throughput']:.2f} {r['unit']} "
            f"| {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {r['growth_gib']:.2f} | {vs} |"
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summary", type=Path, help="the JSON lines the benchmarks' --summary appended")
    ap.add_argument("--memory", default="peak RSS (GiB)", help="the memory column's name (on a GPU: peak allocated)")
    args = ap.parse_args()
    print("\n".join(table(read(args.summary), args.memory)))


if __name__ == "__main__":
    main()
