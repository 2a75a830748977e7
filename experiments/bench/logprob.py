"""Target log-probs, forward + backward: time and peak memory of each implementation.

    log softmax(hidden @ weight.T)[target],  hidden (N, H), weight (V, H), both requiring grad

Methods (--methods, in the order given; those also named in --once run at the first (H, N) only):
  matmul                one (N, H) x (H, V) product: the achievable rate, timed first at each shape
  ours_triton           our Triton kernel (llama_posttrain/kernels/triton_logprobs.py, CUDA only), tiles autotuned
  ours_torch            our chunked torch path (llama_posttrain/kernels/chunked.py)
  torch_lce             F.linear_cross_entropy(options=None): torch's reference path (the full [N, V] logits)
  torch_lce:<chunking>  F.linear_cross_entropy(options=LinearCrossEntropyOptions(...)), torch's chunked path:
                        `auto` (torch's per-device pick; CUDA bf16: aspect_ratio:2, acc_policy compact),
                        a chunking_method (`aspect_ratio`: chunk logits as large as the input, `aspect_ratio:8`:
                        8x smaller), or `chunk=<rows>` (a fixed batch_chunk_size)
  liger                 Liger's fused linear cross-entropy, where installed
  naive                 llama_posttrain/kernels/reference.py: the full [N, V] logits in eager torch
  compile               the same under torch.compile
Throughput counts 6*N*H*V flops (forward logits, backward dH and dW) against the matmul row of the
same shape, timed in the same run. The memory floor is what a step must hold anyway:
dH (N*H in the input dtype) + fp32 dW (V*H*4) + O(N).

--skip-rate (CUDA, or the CPU under TRITON_INTERPRET=1): the share of (token block, vocabulary tile)
pairs whose logits our Triton backward skips (llama_posttrain/kernels/triton_logprobs.py: softmax below 2^-24 of every
row's largest), and the backward's time, on flat logits (random hidden states), on peaked ones (each
hidden state along its target's row of W, scaled so the target's logit is ~32 above the others: a
near one-hot softmax), and on peaked ones with every 16th row flat (one flat row keeps its whole
token block from skipping), at the first (H, N).

    python experiments/bench/logprob.py                      # GPU: H 4096 and 2048, V 128256, N = 32k, 12289, 4k
    python experiments/bench/logprob.py --cpu-small          # CPU: the torch paths at small shapes

On CUDA one worker process runs the jobs in order (peak memory per job from the allocator; a worker
that dies is restarted after the job it died on); on the CPU each job has its own process (peak RSS).
The tables are appended to --out with the device, versions, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

METHODS = ["matmul", "ours_triton", "ours_torch", "torch_lce:auto", "torch_lce", "liger", "naive", "compile"]
SKIP_LOGITS = ["flat", "peaked", "peaked, every 16th row flat"]
JOB = "@@job "  # a worker's result line
V_GPU = 128256  # Llama 3's vocabulary


def lce_options(spec: str | None):
    """`torch_lce:<spec>`'s LinearCrossEntropyOptions (None: torch's reference path)."""
    if spec is None:
        return None
    Options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if Options is None:
        from torch.nn.modules.loss import LinearCrossEntropyOptions as Options
    if spec == "auto":
        return Options()
    if spec.startswith("chunk="):
        return Options(batch_chunk_size=int(spec.removeprefix("chunk=")), chunking_method=None)
    return Options(chunking_method=spec)


def make_fn(method: str):
    import torch.nn.functional as F

    from llama_posttrain.kernels.chunked import target_logprobs as chunked
    from llama_posttrain.kernels.reference import naive_target_logprobs

    base, _, spec = method.partition(":")
    if method == "naive":
        return naive_target_logprobs
    if method == "compile":
        return torch.compile(naive_target_logprobs)
    if base == "torch_lce":
        options = lce_options(spec or None)
        return lambda h, w, t: -F.linear_cross_entropy(h, w, t, reduction="none", options=options)
    if method == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        # Liger returns the mean loss; the benchmark sums per-token log-probs: same work, reduced.
        return lambda h, w, t: -LigerFusedLinearCrossEntropyFunction.apply(h, w, t)[0] * t.numel()
    if method == "ours_torch":
        return chunked
    if method == "ours_triton":
        from llama_posttrain.kernels.triton_logprobs import target_logprobs

        return target_logprobs
    raise ValueError(method)


def peak_scale(H: int, V: int) -> float:
    """s for hidden = s * W[target] / |W[target]|^2: the target's logit s, the others ~N(0, s^2/H) (W's rows
    have norm ~1), the largest about s * sqrt(2 ln V / H): s puts the target ~32 above them (a near one-hot
    softmax; the backward skips a tile more than 24 ln 2 below every row's largest logit)."""
    return 32.0 / max(0.2, 1.0 - math.sqrt(2 * math.log(V) / H))


def inputs(N: int, H: int, V: int, dtype, dev, logits: str = "flat"):
    """hidden (N, H) and weight (V, H) in `dtype`, requiring grad, targets (N,), upstream gradient (N,)."""
    g = torch.Generator(dev).manual_seed(0)
    h = torch.randn(N, H, device=dev, generator=g) * 0.5
    w = torch.randn(V, H, device=dev, generator=g) * H**-0.5
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    if logits != "flat":  # along the target's row: a near one-hot softmax
        wt = w[t]
        peaked = peak_scale(H, V) * wt / wt.square().sum(1, keepdim=True)  # the target's logit: exactly s
        keep_flat = torch.zeros(N, dtype=torch.bool, device=dev)
        if logits == "peaked, every 16th row flat":
            keep_flat[::16] = True
        h = torch.where(keep_flat[:, None], h, peaked)
    up = torch.randn(N, device=dev, generator=g)
    return h.to(dtype).requires_grad_(), w.to(dtype).requires_grad_(), t, up


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_method(method: str, N: int, H: int, V: int, dtype: str, repeats: int, dev) -> dict:
    """One warm-up (compiles, autotunes) then `repeats` timed fwd+bwd: median time, peak memory over
    the inputs and the warm-up's gradients, TFLOP/s."""
    h, w, t, up = inputs(N, H, V, getattr(torch, dtype), dev)
    if method == "matmul":
        a, b = h.detach(), w.detach()

        def step():
            a @ b.T  # one of the three matmuls of the fused op
    else:
        fn = make_fn(method)

        def step():
            h.grad = w.grad = None
            out = fn(h, w, t)
            (out.float() * up).sum().backward()

    if dev.type == "cpu":  # peak RSS only grows: take the baseline before the first step
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    median = sorted(times)[len(times) // 2]
    flops = 2 * N * H * V * (1 if method == "matmul" else 3)
    return {"time": median, "peak": peak, "tflops": flops / median / 1e12}


def skip_rate(N: int, H: int, V: int, dtype: str, logits: str, repeats: int, dev) -> dict:
    """Our Triton backward on `logits` (SKIP_LOGITS): tiles skipped of all (token block, vocabulary tile)
    pairs, the tiles holding no target of their block (what peaked rows can skip at most: a tile holding a
    row's argmax is never skipped) and the backward's median time. Calls the kernel's forward/backward."""
    from llama_posttrain.kernels.triton_logprobs import backward, forward

    h, w, t, up = inputs(N, H, V, getattr(torch, dtype), dev, logits)
    h, w = h.detach(), w.detach()
    _, lse, row_max, tile_max, cfg = forward(h, w, t)
    times, skipped = [], None
    for _ in range(repeats + 1):  # the first compiles
        sync(dev)
        t0 = time.perf_counter()
        out = backward(h, w, t, lse, row_max, tile_max, cfg, up)
        sync(dev)
        times.append(time.perf_counter() - t0)
        skipped = int(out[-1])  # backward -> (dH, dW, tiles skipped)
    bn, bv = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_V"]
    v_tiles = -(-V // bv)
    tiles = -(-N // bn) * v_tiles
    holding = torch.unique(torch.arange(N, device=dev) // bn * v_tiles + t // bv).numel()
    timed = sorted(times[1:] or times)
    median = timed[len(timed) // 2]
    return {"skipped": skipped, "tiles": tiles, "no_target": tiles - holding, "time": median, "tile": f"{bn}x{bv}"}


def worker(jobs: list[dict]) -> None:
    """Run the jobs in order, one JSON result line each. Out of memory: an error row, and on; any other
    error: an error row and exit (a CUDA error can poison the context; the parent starts a new worker)."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for job in jobs:
        try:
            if job["kind"] == "skip":
                r = skip_rate(job["N"], job["H"], job["V"], job["dtype"], job["logits"], job["repeats"], dev)
            else:
                r = time_method(job["method"], job["N"], job["H"], job["V"], job["dtype"], job["repeats"], dev)
        except torch.OutOfMemoryError:
            r = {"error": "OutOfMemoryError"}
        except Exception as e:  # noqa: BLE001  (reported in the table, then this worker stops)
            print(JOB + json.dumps({"error": f"{type(e).__name__}: {e}".splitlines()[0][:90]}), flush=True)
            sys.exit(1)
        print(JOB + json.dumps(r), flush=True)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def run_jobs(jobs: list[dict], per_process: bool):
    """-> (job, result) in order. One worker for all (per_process: one each); a worker that dies is
    replaced by one that starts after the job it died on."""
    i = 0
    while i < len(jobs):
        batch = jobs[i : i + 1] if per_process else jobs[i:]
        with tempfile.TemporaryFile("w+") as err:
            cmd = [sys.executable, __file__, "--worker", json.dumps(batch)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
            done, last = 0, {}
            for line in proc.stdout:
                if line.startswith(JOB):
                    last = json.loads(line[len(JOB) :])
                    yield batch[done], last
                    done += 1
            rc = proc.wait()
            if done < len(batch) and not (rc == 1 and "error" in last):  # died without a word on batch[done]
                err.seek(0)
                last = (err.read().strip().splitlines() or [f"exit code {rc}"])[-1]
                yield batch[done], {"error": last[:90]}
                done += 1
        i += done


def plan_jobs(hs, ns, V, dtype, methods, once, repeats, skip) -> list[dict]:
    """Every (H, N) in order, each method at it (those in `once` at the first only); the skip-rate rows
    after the first H's."""
    jobs = []
    for hi, H in enumerate(hs):
        for ni, N in enumerate(ns):
            for m in methods:
                if m not in once or (hi == 0 and ni == 0):
                    jobs.append(dict(kind="method", method=m, N=N, H=H, V=V, dtype=dtype, repeats=repeats))
        if hi == 0 and skip:
            for logits in SKIP_LOGITS:
                jobs.append(dict(kind="skip", logits=logits, N=ns[0], H=H, V=V, dtype=dtype, repeats=repeats))
    return jobs


HEADERS = {
    "method": [
        "| H | N | method | time (ms) | TFLOP/s (6NHV) | % of matmul | peak extra (MiB) | vs floor |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ],
    "skip": [
        "| H | N | logits | tiles skipped | of | skip rate | no-target tiles | backward (ms) | tile |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ],
}


def table_row(job: dict, r: dict, rates: dict) -> str:
    """One markdown row; rates: (H, N) -> the matmul row's TFLOP/s, filled in here."""
    H, N = job["H"], job["N"]
    if job["kind"] == "skip":
        if "error" in r:
            return f"| {H} | {N} | {job['logits']} | n/a: {r['error']} | | | | | |"
        return (
            f"| {H} | {N} | {job['logits']} | {r['skipped']} | {r['tiles']} | {100 * r['skipped'] / r['tiles']:.1f}% "
            f"| {r['no_target']} | {1000 * r['time']:.1f} | {r['tile']} |"
        )
    method = job["method"]
    if "error" in r:
        return f"| {H} | {N} | {method} | n/a: {r['error']} | | | | |"
    if method == "matmul":
        rates[H, N] = r["tflops"]
    rate = rates.get((H, N))
    pct = f"{100 * r['tflops'] / rate:.0f}%" if rate and method != "matmul" else ""
    elem = 2 if job["dtype"] == "bfloat16" else 4
    floor = N * H * elem + job["V"] * H * 4 + 16 * N
    vs_floor = "" if method == "matmul" else f"{r['peak'] / floor:.2f}x"
    return (
        f"| {H} | {N} | {method} | {1000 * r['time']:.1f} | {r['tflops']:.2f} | {pct} | "
        f"{r['peak'] / 2**20:.0f} | {vs_floor} |"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cpu-small", action="store_true", help="small shapes for a CPU table")
    ap.add_argument("--hs", type=int, nargs="+", help="hidden sizes H (GPU default: 4096 2048)")
    ap.add_argument("--ns", type=int, nargs="+", help="token counts N (GPU default: 32768 12289 4096)")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--once", nargs="*", default=[], help="of --methods: these at the first (H, N) only")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up (the median is kept)")
    ap.add_argument("--skip-rate", action="store_true", help="also our backward's tile-skip rate (module docstring)")
    ap.add_argument("--out", default="experiments/bench/results/logprob.md")
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return

    cuda = torch.cuda.is_available()
    if args.cpu_small or not cuda:
        hs, V, dtype, ns = args.hs or [512], 32768, "float32", args.ns or [1024, 2048]
        methods = [m for m in args.methods if m not in ("ours_triton", "liger")]
        repeats = min(args.repeats, 3)
    else:
        hs, V, dtype, ns = args.hs or [4096, 2048], V_GPU, "bfloat16", args.ns or [32768, 12289, 4096]
        methods, repeats = args.methods, args.repeats
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    skip = args.skip_rate and (cuda or interpret)
    device = (
        torch.cuda.get_device_name() if cuda else f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"
    )
    import triton

    lines = [
        f"## target log-probs fwd+bwd, {datetime.date.today()}",
        "",
        f"device: {device}; torch {torch.__version__}; triton {triton.__version__}; V={V}, {dtype}",
        f"command: python experiments/bench/logprob.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip(),
    ]
    if args.skip_rate and not skip:
        lines.append("skip rate: left out (needs CUDA or TRITON_INTERPRET=1)")
    print("\n".join(lines), flush=True)
    kind, rates = None, {}
    jobs = plan_jobs(hs, ns, V, dtype, methods, set(args.once), repeats, skip)
    for job, r in run_jobs(jobs, per_process=not cuda):
        if job["kind"] != kind:  # a new table
            kind = job["kind"]
            new = ["", *HEADERS[kind]]
            lines += new
            print("\n".join(new), flush=True)
        lines.append(table_row(job, r, rates))
        print(lines[-1], flush=True)
    elem = 2 if dtype == "bfloat16" else 4
    lines.append(
        f"\nfloor = dH + fp32 dW + O(N) = N*H*{elem} + V*H*4 bytes; matmul = one (N,H)x(H,V) product in {dtype}."
    )
    if skip:
        lines.append(
            "skip rate: (token block, vocabulary tile) pairs our Triton backward skipped / all, one backward; "
            "no-target tiles: those holding no target of their token block (the most peaked rows can skip)."
        )
    print("\n".join(lines[-2 if skip else -1 :]), flush=True)
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
