"""Target log-probs, forward + backward: time and peak memory of each implementation.

    log softmax(hidden @ weight.T)[target],  hidden (N, H), weight (V, H), both requiring grad

Methods: the naive torch formula (kernels/reference.py: full [N, V] logits), the same under torch.compile,
torch.nn.functional.linear_cross_entropy (reference path, and its chunked path where the torch has
LinearCrossEntropyOptions), Liger's fused linear cross-entropy where installed, our chunked torch
path (kernels/chunked.py) and our Triton kernel (kernels/triton_logprobs.py, CUDA only).
Throughput counts 6*N*H*V flops (forward logits, backward dH and dW) against a plain bf16 matmul
of the same shape timed in the same run. The memory floor is what a step must hold anyway:
dH (N*H in the input dtype) + fp32 dW (V*H*4) + O(N).

    python experiments/bench/logprob.py                      # GPU: Llama 3 8B shapes, N = 4k..32k
    python experiments/bench/logprob.py --cpu-small          # CPU: the torch paths at small shapes

Every method runs in its own process (so peak memory is its own) and the table is appended to
experiments/bench/results/logprob.md with the device, versions, date and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time

import torch

METHODS = ["matmul", "naive", "compile", "torch_lce", "torch_lce_chunked", "liger", "ours_torch", "ours_triton"]


def make_fn(method: str):
    import torch.nn.functional as F

    from kernels.chunked import target_logprobs as chunked
    from kernels.reference import naive_target_logprobs

    if method == "naive":
        return naive_target_logprobs
    if method == "compile":
        return torch.compile(naive_target_logprobs)
    if method in ("torch_lce", "torch_lce_chunked"):
        if not hasattr(F, "linear_cross_entropy"):
            raise RuntimeError("this torch has no F.linear_cross_entropy")
        options = None
        if method == "torch_lce_chunked":
            from torch.nn.modules.loss import LinearCrossEntropyOptions

            options = LinearCrossEntropyOptions()
        return lambda h, w, t: -F.linear_cross_entropy(h, w, t, reduction="none", options=options)
    if method == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        # Liger returns the mean loss; the benchmark sums per-token log-probs: same work, reduced.
        return lambda h, w, t: -LigerFusedLinearCrossEntropyFunction.apply(h, w, t)[0] * t.numel()
    if method == "ours_torch":
        return chunked
    if method == "ours_triton":
        from kernels.triton_logprobs import target_logprobs

        return target_logprobs
    raise ValueError(method)


def worker(method: str, N: int, H: int, V: int, dtype: str, repeats: int) -> dict:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = getattr(torch, dtype)
    g = torch.Generator(dev).manual_seed(0)
    h = (torch.randn(N, H, device=dev, generator=g) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) * H**-0.5).to(dt).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    up = torch.randn(N, device=dev, generator=g)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

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
    step()  # warm-up (compiles; on the CPU its memory counts, the compiler's included)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    flops = 2 * N * H * V * (1 if method == "matmul" else 3)
    return {
        "time": sorted(times)[len(times) // 2],
        "peak": peak,
        "tflops": flops / sorted(times)[len(times) // 2] / 1e12,
    }


def run_one(method, N, H, V, dtype, repeats):
    cmd = [sys.executable, __file__, "--worker", method, str(N), str(H), str(V), dtype, str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last[:90]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    ap.add_argument("--cpu-small", action="store_true", help="small shapes for a CPU table")
    ap.add_argument("--ns", type=int, nargs="+")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="experiments/bench/results/logprob.md")
    args = ap.parse_args()
    if args.worker:
        method, N, H, V, dtype, repeats = args.worker
        print(json.dumps(worker(method, int(N), int(H), int(V), dtype, int(repeats))))
        return

    cuda = torch.cuda.is_available()
    if args.cpu_small or not cuda:
        H, V, dtype, ns = 512, 32768, "float32", args.ns or [1024, 2048]
        methods = [m for m in args.methods if m not in ("ours_triton", "liger")]
        repeats = min(args.repeats, 3)
    else:
        H, V, dtype, ns, methods, repeats = (
            4096,
            128256,
            "bfloat16",
            args.ns or [4096, 8192, 16384, 32768],
            args.methods,
            args.repeats,
        )
    device = (
        torch.cuda.get_device_name() if cuda else f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"
    )
    import triton

    lines = [
        f"## target log-probs fwd+bwd, {datetime.date.today()}",
        "",
        f"device: {device}; torch {torch.__version__}; triton {triton.__version__}; H={H}, V={V}, {dtype}",
        f"command: python experiments/bench/logprob.py {' '.join(sys.argv[1:])}".rstrip(),
        "",
        "| N | method | time (ms) | TFLOP/s (6NHV) | % of matmul | peak extra (MiB) | vs floor |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    elem = 2 if dtype == "bfloat16" else 4
    for N in ns:
        floor = N * H * elem + V * H * 4 + 16 * N
        rate = None
        for method in methods:
            r = run_one(method, N, H, V, dtype, repeats)
            if "error" in r:
                row = f"| {N} | {method} | n/a: {r['error']} | | | | |"
            else:
                if method == "matmul":
                    rate = r["tflops"]
                pct = f"{100 * r['tflops'] / rate:.0f}%" if rate and method != "matmul" else ""
                vs_floor = "" if method == "matmul" else f"{r['peak'] / floor:.2f}x"
                row = (
                    f"| {N} | {method} | {1000 * r['time']:.1f} | {r['tflops']:.2f} | {pct} | "
                    f"{r['peak'] / 2**20:.0f} | {vs_floor} |"
                )
            lines.append(row)
            print(row, flush=True)
    lines.append(
        f"\nfloor = dH + fp32 dW + O(N) = N*H*{elem} + V*H*4 bytes; matmul = one bf16/fp32 (N,H)x(H,V) product.\n"
    )
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
