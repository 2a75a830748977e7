"""Data loading at scale: the in-memory path against the tokenized cache (llama_posttrain/data/prepare.py, llama_posttrain/data/cache.py).

For N synthetic SFT dialogs (1-3 turns of random words, ~400 byte-tokens each on average), each
measured in a fresh process, so that resident memory is the process's own:
  in-memory       load_examples + DataLoader (every rank, every start): time, resident bytes per token
  first start     data.prepare with W tokenizer processes: time, tokens/s, tokens/s per process
  second start    build_loaders finding the cache, up to the first step: time, resident bytes per token
Resident bytes per token: the growth of the process's RSS from before loading to after 20 loader
steps, over the dataset's tokens; `anon` is what the process owns (RssAnon), the rest is file pages
mapped into it (before version 4 the cache was memory-mapped: its touched pages counted here).

--full-pass: the resident set of a run that only iterates the loader, over the whole dataset. Per
N, two fresh processes: the first start (empty cache: tokenizing, writing it) and the second
(reading it); each builds the loader and collates every micro-batch of one epoch (eval_steps: every
example once, in the shuffled order). B/token = (peak RSS - RSS right after the imports) / tokens,
the peak as getrusage's ru_maxrss and /proc's VmHWM; also the total peak, and the anonymous and
file-backed growth at the end. Beside them, in the same run, the baseline: the peak of a fresh process
that only does the pass's imports, then `import torch` (what a training process adds; the loader itself
never imports torch: its batches become tensors when first read, and the pass checks it did not). A
table section is appended to --out.

    python experiments/bench/data_loading.py                                # 10k and 100k dialogs, 2 processes
    python experiments/bench/data_loading.py --dialogs 10000 --workers 1 4 --tokenizer path/to/tokenizer.model
    python experiments/bench/data_loading.py --full-pass --dialogs 36500 --workers 1   # 14.8M tokens

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
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
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
    collate([[Example([1, 2], [0, 1], [0, 0])]])  # warm-up: numpy's first allocations are not the data's
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


def loader_imports():
    """What a run that only iterates the loader imports (torch is not one: llama_posttrain/data/rows.py Batch)."""
    from llama_posttrain.data.loader import build_loaders
    from llama_posttrain.llama.chat import ChatFormat
    from llama_posttrain.llama.tokenizer import load_tokenizer

    return build_loaders, ChatFormat, load_tokenizer


def imports_only(args) -> dict:
    """The baseline, in this (fresh) process: peak resident bytes of the loader's imports (full_pass's), then
    with `import torch` too (what a training process holds besides)."""
    import resource

    loader_imports()
    imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import torch  # noqa: F401

    return {"imports": imports, "with_torch": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def full_pass(args) -> dict:
    """The resident set of a run that only iterates the loader, in this (fresh) process: build_loaders
    (first start: tokenizing into the cache; second start: finding it), then every step of one epoch,
    every micro-batch collated and dropped. -> peak and final resident bytes against those right after
    the imports."""
    import resource

    build_loaders, ChatFormat, load_tokenizer = loader_imports()
    after_imports = memory()
    chat = ChatFormat(load_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer())
    dc = data_config(Path(args.data), Path(args.cache_dir), args.workers[0], True)
    t0 = time.perf_counter()
    loader, _ = build_loaders(dc, "sft", chat, verbose=False)
    start, cpu = time.perf_counter() - t0, time.process_time()
    steps, read = 0, 0
    for step in loader.eval_steps():  # every example once, in epoch 0's order (shuffled)
        read += sum(b.num_tokens for b in step.micro_batches)  # counted on the arrays: no tensor made
        steps += 1
    end = memory()
    return {
        "start_s": start,
        "pass_s": time.perf_counter() - t0 - start,
        "pass_cpu": time.process_time() - cpu,
        "steps": steps,
        "examples": len(loader.data),
        "tokens": int(loader.data.lengths.sum()),
        "tokens_read": read,
        "torch_imported": "torch" in sys.modules,
        "after_imports": after_imports["VmRSS"],
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "hwm": end["VmHWM"],
        "rss": end["VmRSS"],
        "anon": end["RssAnon"],
        "file": end["RssFile"],
        "anon_imports": after_imports["RssAnon"],
        "file_imports": after_imports["RssFile"],
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
    ap.add_argument("--full-pass", action="store_true", help="resident set of a run iterating the whole loader")
    ap.add_argument("--phase", choices=["in-memory", "first", "second", "pass", "imports"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        run = {"pass": full_pass, "imports": imports_only}.get(args.phase, phase)
        print(json.dumps(run(args)))
        return
    if args.full_pass:
        return full_pass_table(args)

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


def full_pass_table(args) -> None:
    """--full-pass: for each N, the first start (empty cache) and the second, each a fresh process."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as work:
        for n in args.dialogs:
            data = Path(work) / f"dialogs_{n}.jsonl"
            synthetic_dialogs(data, n)
            cache_dir = Path(work) / "cache"
            base = run_phase("imports", data, cache_dir, args.workers[0], args.tokenizer)  # the baseline, each N
            print(json.dumps(base), flush=True)
            for start in ("first", "second"):
                cpu0, t0 = os.times(), time.perf_counter()
                r = run_phase("pass", data, cache_dir, args.workers[0], args.tokenizer)
                cpu1 = os.times()
                r.update(dialogs=n, start=start, wall=time.perf_counter() - t0, load=os.getloadavg()[0])
                r.update(imports_only=base["imports"], with_torch=base["with_torch"])
                r["cpu"] = cpu1.children_user + cpu1.children_system - cpu0.children_user - cpu0.children_system
                folder = next(p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
                r["disk"] = sum(f.stat().st_size for f in folder.iterdir())
                r["file_mb"] = data.stat().st_size / 2**20
                rows.append(r)
                print(json.dumps(r), flush=True)
            shutil.rmtree(cache_dir)
            data.unlink()
    import torch

    lines = [
        f"## data loader, whole-dataset pass, {datetime.date.today()}",
        "",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; torch {torch.__version__}",
        f"tokenizer: {args.tokenizer or 'byte tokenizer (llama_posttrain/llama/assets/bytes.tiktoken)'}; SFT, max_len 2048, "
        f"batch 32, 16384 tokens per micro-batch, {args.workers[0]} tokenizer process(es)",
        "command: python experiments/bench/data_loading.py " + " ".join(sys.argv[1:]),
        "",
        "Each start a fresh process that only builds the loader and iterates every step of an epoch. B/token: "
        "(peak resident set - resident set right after the imports) / dataset tokens, the peak as ru_maxrss "
        "and as VmHWM; anon / file: the resident set's anonymous and file-backed parts at the end, less "
        "those after the imports. max RSS / tokens: the whole process's peak, the imports' included. "
        "imports only: the peak of a fresh process, in the same run, that does the loader's imports (those of the "
        "pass) and nothing else, then `import torch` (+ torch: what a training process holds besides; the pass "
        "never imports it, checked); max RSS / tokens: the pass's whole process (16 B/token of 14.78M tokens is "
        "225.5 MiB).",
        "",
        "| dialogs | tokens | start | start (s) | pass: wall / CPU (s) | CPU / wall | load (1 min) "
        "| imports only: loader / + torch (MiB) | imports only / tokens (B) | after imports (MiB) "
        "| max RSS (MiB) | max RSS / tokens (B) | B/token (ru_maxrss) | B/token (VmHWM) | anon / file at end B/token "
        "| disk B/token |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tokens, base, mib = r["tokens"], r["after_imports"], 2**20
        assert r["tokens_read"] == tokens, f"the pass read {r['tokens_read']} of {tokens} tokens"
        assert not r["torch_imported"], "the loader's pass imported torch"
        cells = [f"{r['dialogs']:,}", f"{tokens:,}", r["start"], f"{r['start_s']:.1f}"]
        cells.append(f"{r['pass_s']:.1f} / {r['pass_cpu']:.1f}")
        cells += [f"{r['cpu'] / r['wall']:.2f}", f"{r['load']:.2f}"]
        cells += [f"{r['imports_only'] / mib:.1f} / {r['with_torch'] / mib:.1f}", f"{r['imports_only'] / tokens:.2f}"]
        cells += [f"{base / mib:.0f}", f"{r['ru_maxrss'] / mib:.1f}"]
        cells.append(f"{r['ru_maxrss'] / tokens:.2f}")
        cells += [f"{(r['ru_maxrss'] - base) / tokens:.2f}", f"{(r['hwm'] - base) / tokens:.2f}"]
        anon, file = (r["anon"] - r["anon_imports"]) / tokens, (r["file"] - r["file_imports"]) / tokens
        cells += [f"{anon:.2f} / {file:.2f}", f"{r['disk'] / tokens:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    out = Path(args.out)
    out.write_text((out.read_text() + "\n" if out.exists() else "") + "\n".join(lines) + "\n")
    print("\n".join(lines))


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
    out = Path(args.out)  # a new section after the earlier ones
    out.write_text((out.read_text() + "\n" if out.exists() else "") + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
