"""Data loading at scale: the in-memory path against the tokenized cache (llama_posttrain/data/prepare.py, llama_posttrain/data/cache.py).

For N synthetic SFT dialogs (1-3 turns of random words, ~400 byte-tokens each on average), each
measured in a fresh process, so that resident memory is the process's own:
  in-memory       load_examples + DataLoader (every rank, every start): time, resident bytes per token
  first start     data.prepare with W tokenizer processes: time, tokens/s, tokens/s per process
  second start    build_loaders finding the cache, up to the first step: time, resident bytes per token
Resident bytes per token: the growth of the process's RSS from before loading to after 20 loader
steps, over the dataset's tokens; `anon` is what the process owns (RssAnon), the rest is mapped
pages of the cache files (page cache: shared by the ranks of a node, dropped under memory pressure).

    python experiments/bench/data_loading.py                                # 10k and 100k dialogs, 2 processes
    python experiments/bench/data_loading.py --dialogs 10000 --workers 1 4 --tokenizer path/to/tokenizer.model

(Not named data.py: run as a script, it would shadow the `data` package it measures.)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORDS = [
    "the", "model", "answer", "question", "data", "because", "therefore", "we", "compute", "value",
    "first", "then", "result", "function", "number", "example", "python", "list", "sum", "step",
]  # fmt: skip


def synthetic_dialogs(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def text(mean_words):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(mean_words // 2, mean_words * 3 // 2)))

    with open(path, "w") as f:
        for _ in range(n):
            messages = []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": text(8)}, {"role": "assistant", "content": text(20)}]
            f.write(json.dumps({"messages": messages}) + "\n")


def memory() -> dict[str, int]:
    """This process's resident bytes: total, anonymous, file-backed (Linux /proc)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def data_config(data: Path, cache_dir: Path, workers: int, cache: bool):
    from llama_posttrain.train.config import Config

    cfg = Config()
    d = cfg.data
    d.train, d.max_len, d.batch_size, d.tokens_per_microbatch = str(data), 2048, 32, 16384
    d.cache, d.cache_dir, d.num_workers = cache, str(cache_dir), workers
    return d


def phase(args) -> dict:
    """One measurement in this (fresh) process; -> a JSON-able dict."""
    from llama_posttrain.data.loader import build_loaders
    from llama_posttrain.data.prepare import prepare_config
    from llama_posttrain.data.rows import Example, collate
    from llama_posttrain.llama.chat import ChatFormat
    from llama_posttrain.llama.tokenizer import load_tokenizer

    chat = ChatFormat(load_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer())
    dc = data_config(Path(args.data), Path(args.cache_dir), args.workers[0], args.phase != "in-memory")
    collate([[Example([1, 2], [0, 1], [0, 0])]])  # warm-up: torch's first allocations are not the data's
    before = memory()
    t0 = time.perf_counter()
    if args.phase == "first":
        prepare_config(dc, "sft", chat, verbose=False)
        return {"seconds": time.perf_counter() - t0}
    loader, _ = build_loaders(dc, "sft", chat, verbose=False)
    it = iter(loader)
    next(it)
    seconds = time.perf_counter() - t0
    for _ in range(19):
        next(it)
    after = memory()
    return {
        "seconds": seconds,
        "tokens": int(loader.data.lengths.sum()),
        "rss": after["VmRSS"] - before["VmRSS"],
        "anon": after["RssAnon"] - before["RssAnon"],
    }


def run_phase(name: str, data: Path, cache_dir: Path, workers: int, tokenizer: str | None) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--data", str(data), "--cache-dir", str(cache_dir)]
    cmd += ["--workers", str(workers)] + (["--tokenizer", tokenizer] if tokenizer else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dialogs", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--workers", type=int, nargs="+", default=[2], help="tokenizer processes for the first start")
    ap.add_argument("--in-memory-max", type=int, default=10_000, help="largest N measured on the in-memory path")
    ap.add_argument("--tokenizer", help="tokenizer file (default: the byte tokenizer)")
    ap.add_argument("--out", default=str(ROOT / "experiments/bench/results/data.md"))
    ap.add_argument("--phase", choices=["in-memory", "first", "second"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as work:
        for n in args.dialogs:
            data = Path(work) / f"dialogs_{n}.jsonl"
            synthetic_dialogs(data, n)
            row = {"dialogs": n, "file_mb": data.stat().st_size / 2**20}
            if n <= args.in_memory_max:
                row["in-memory"] = run_phase("in-memory", data, Path(work), 1, args.tokenizer)
            cache_dir = Path(work) / "cache"
            for w in args.workers:  # each from scratch
                shutil.rmtree(cache_dir, ignore_errors=True)
                row[f"first_{w}"] = run_phase("first", data, cache_dir, w, args.tokenizer)
            row["second"] = run_phase("second", data, cache_dir, args.workers[-1], args.tokenizer)
            folder = next(p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
            row["disk"] = sum(f.stat().st_size for f in folder.iterdir())
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(cache_dir)
            data.unlink()
    write_table(rows, args)


def write_table(rows: list[dict], args) -> None:
    import torch

    lines = [
        f"## data loading benchmark, {datetime.date.today()}",
        "",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}",
        f"tokenizer: {args.tokenizer or 'byte tokenizer (llama_posttrain/llama/assets/bytes.tiktoken)'}; SFT, max_len 2048",
        "command: python experiments/bench/data_loading.py " + " ".join(sys.argv[1:]),
        "",
        "| dialogs | tokens | in-memory: start (s) | in-memory: resident B/token | "
        + " | ".join(f"first start, {w} proc.: s / tokens/s / per proc." for w in args.workers)
        + " | second start (s) | cached: resident B/token (anon) | cache on disk B/token |",
        "|---:|---:|---:|---:|" + "---:|" * len(args.workers) + "---:|---:|---:|",
    ]
    for r in rows:
        tokens = r["second"]["tokens"]
        mem = r.get("in-memory")
        cells = [f"{r['dialogs']:,}", f"{tokens:,}"]
        cells += [f"{mem['seconds']:.1f}", f"{mem['rss'] / tokens:.0f}"] if mem else ["-", "-"]
        for w in args.workers:
            s = r[f"first_{w}"]["seconds"]
            cells.append(f"{s:.1f} / {tokens / s:,.0f} / {tokens / s / w:,.0f}")
        sec = r["second"]
        cells += [f"{sec['seconds']:.2f}", f"{sec['rss'] / tokens:.2f} ({sec['anon'] / tokens:.2f})"]
        cells.append(f"{r['disk'] / tokens:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
