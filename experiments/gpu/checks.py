"""The GPU-only checks that experiments/gpu/validate.py runs, one per process:

    python experiments/gpu/checks.py kernels      # the Triton kernel on real CUDA, bf16 then fp32
    python experiments/gpu/checks.py flex         # FlexAttention (compiled, activation checkpointing) vs dense
    python experiments/gpu/checks.py step dpo sft # 1-GPU DPO then SFT steps at the llama3.2-1b shape
    python experiments/gpu/checks.py step dpo sft --profile  # and one profiled step each: CUDA time by kernel group

bf16 comes first everywhere, so a part cut at its time budget has lost its fp32 rows, not its bf16 ones.

Each prints its results as lines `@@row {json}` (part, check, status pass/fail/info, value, note)
that validate.py collects into experiments/gpu/results.md. Random weights and random tokens only:
nothing is read from the network or from checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

import torch  # noqa: E402

ROW = "@@row "


def row(part: str, check: str, status: str, value: str = "", note: str = "") -> None:
    print(ROW + json.dumps({"part": part, "check": check, "status": status, "value": value, "note": note}), flush=True)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


# ----------------------------------------------------------------------------- kernels

KERNEL_SIZES = [(37, 24, 101), (64, 48, 300), (5, 16, 33), (130, 40, 517), (1000, 512, 32000), (2048, 4096, 128256)]
# tolerance relative to the largest exact value, as in tests/test_kernels.py; bf16 first
KERNEL_DTYPES = {"bfloat16": (torch.bfloat16, 2**-7), "float32": (torch.float32, 1e-5)}


def _grads(fn, h, w, t, up):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    out = fn(h, w, t)
    return (out, *torch.autograd.grad((out * up).sum(), (h, w)))


def _triton(h, w, t):
    """The kernel with its tile config pinned (deterministic=True): a correctness check compiles each
    kernel once per dtype instead of autotuning 7 configs per shape (the benchmarks autotune)."""
    from llama_posttrain.kernels import target_logprobs

    return target_logprobs(h, w, t, backend="triton", deterministic=True)


def _within_torch_error(ours, same, exact, rel) -> tuple[bool, str]:
    """tests/test_kernels.py's bound: error vs fp64 <= torch's in the same dtype + rel * max |exact|."""
    e_ours, e_torch = (ours.double() - exact).abs().max().item(), (same.double() - exact).abs().max().item()
    return e_ours <= e_torch + rel * exact.abs().max().item(), f"{e_ours:.2e} (torch {e_torch:.2e})"


def kernel_sizes(name: str) -> None:
    from llama_posttrain.kernels import naive_target_logprobs

    dtype, rel = KERNEL_DTYPES[name]
    dev = torch.device("cuda")
    for N, H, V in KERNEL_SIZES:
        g = torch.Generator(dev).manual_seed(N + V)
        h = torch.randn(N, H, generator=g, device=dev).to(dtype)
        w = (torch.randn(V, H, generator=g, device=dev) * (2.0 / H**0.5)).to(dtype)
        t = torch.randint(0, V, (N,), generator=g, device=dev)
        t[::5] = -100  # ignored targets
        up = torch.randn(N, generator=g, device=dev)
        exact = _grads(naive_target_logprobs, h.double(), w.double(), t, up.double())
        same = _grads(naive_target_logprobs, h, w, t, up)
        ours = _grads(_triton, h, w, t, up)
        results = [_within_torch_error(o, s, e, rel) for o, s, e in zip(ours, same, exact)]
        value = "; ".join(f"{what} {text}" for what, (_, text) in zip(("logp", "dH", "dW"), results))
        ok = all(r[0] for r in results)
        row("kernels", f"{name} N={N} H={H} V={V}", "pass" if ok else "fail", value, "max abs error vs fp64")
        del h, w, exact, same, ours
        torch.cuda.empty_cache()


def kernel_edge_cases(name: str) -> None:
    from llama_posttrain.kernels import naive_target_logprobs

    dtype, rel = KERNEL_DTYPES[name]
    dev = torch.device("cuda")
    h = torch.zeros(0, 64, dtype=dtype, device=dev, requires_grad=True)  # an empty micro-batch
    w = torch.randn(100, 64, device=dev).to(dtype).requires_grad_()
    out = _triton(h, w, torch.zeros(0, dtype=torch.long, device=dev))
    gw = torch.autograd.grad(out.sum(), w)[0]
    ok = out.shape == (0,) and torch.equal(gw, torch.zeros_like(w))
    row("kernels", f"{name} empty input (N=0)", "pass" if ok else "fail")

    g = torch.Generator(dev).manual_seed(3)  # tied weights: hidden states from the embedding the head uses
    emb = torch.randn(500, 64, generator=g, device=dev, dtype=torch.float64) * 0.3
    ids, tg = (torch.randint(0, 500, (300,), generator=g, device=dev) for _ in range(2))

    def tied(fn, dt):
        e = emb.to(dt).detach().requires_grad_()
        fn(torch.tanh(e[ids]), e, tg).sum().backward()
        return e.grad

    exact = tied(naive_target_logprobs, torch.float64)
    ok, text = _within_torch_error(tied(_triton, dtype), tied(naive_target_logprobs, dtype), exact, rel)
    row("kernels", f"{name} tied weights", "pass" if ok else "fail", text)

    # no atomics in the backward: two runs give the same bits (the old atomic adds did not)
    h = torch.randn(4096, 1024, generator=g, device=dev).to(dtype)
    w = (torch.randn(32000, 1024, generator=g, device=dev) * 0.06).to(dtype)
    t = torch.randint(0, 32000, (4096,), generator=g, device=dev)
    up = torch.randn(4096, generator=g, device=dev)
    first, second = (_grads(_triton, h, w, t, up) for _ in range(2))
    same = all(torch.equal(a, b) for a, b in zip(first, second))
    row("kernels", f"{name} backward bitwise deterministic", "pass" if same else "fail", "N=4096 H=1024 V=32000")


def kernels() -> None:
    """The Triton kernel on CUDA (not the interpreter) against float64, bf16 then fp32, at odd sizes
    up to the Llama 3 8B head; empty input; tied weights."""
    for name in KERNEL_DTYPES:
        kernel_sizes(name)
        kernel_edge_cases(name)


# ----------------------------------------------------------------------------- FlexAttention


def structured_batch(vocab: int, max_len: int, rows: int, seed: int):
    """Rows packed with DPO-like groups [prompt][chosen][rejected] and SFT-like docs: doc and
    branch ids, positions continuing the prompt; targets on every response / doc token."""
    from llama_posttrain.data.rows import Example, Seq, Target, build_group, pack
    from llama_posttrain.llama.chat import EncodedDialog

    rng = random.Random(seed)

    def enc(n):
        return EncodedDialog([rng.randrange(vocab) for _ in range(n)], [True] * n, [False] * n)

    examples = []
    while sum(len(e) for e in examples) < rows * max_len * 0.9:
        if rng.random() < 0.5:  # at max_len 2048: prompts of 64-682 tokens, responses of 32-512
            prompt, responses = enc(rng.randint(max_len // 32, max_len // 3)), [max_len // 64, max_len // 4]
            ex = build_group(prompt, [enc(rng.randint(*responses)) for _ in range(2)])
        else:
            n = rng.randint(max_len // 20, max_len)
            toks = [rng.randrange(vocab) for _ in range(n)]
            ex = Example(toks, list(range(n)), [0] * n, [Target(i - 1, toks[i], 0, False) for i in range(1, n)])
            ex.seqs = [Seq(n - 1, 0)]
        ex.uid = len(examples)
        examples.append(ex)
    return pack(examples, max_len, rows * max_len)[0]


def flex(precisions=("bf16", "fp32"), modes=((False, False), (True, True)), max_len: int = 2048) -> None:
    """Log-probs and gradients of a small model on structured rows: FlexAttention (compiled blocks,
    activation checkpointing, FSDP2 on one rank: the training path) against the dense-mask path.
    modes: (activation checkpointing, compile) pairs."""
    from llama_posttrain.llama import ModelConfig, Transformer
    from llama_posttrain.llama.model import attention_mask
    from llama_posttrain.train.distributed import init_distributed, parallelize
    from llama_posttrain.train.targets import model_logps

    d = init_distributed()
    config = ModelConfig(dim=512, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=1024, vocab_size=4096, max_seq_len=8192)
    batch = structured_batch(config.vocab_size, max_len, 2, seed=0).to(d.device)

    def run(attention: str, mixed_precision: str, ac: bool, compile: bool):
        torch.manual_seed(0)
        model = parallelize(Transformer(config), d, mixed_precision, activation_checkpointing=ac, compile=compile)
        t0 = time.perf_counter()
        mask = attention_mask(batch.doc_ids, batch.branch_ids, flex=attention == "flex")
        logp = model_logps(model, batch, backend="torch", mask=mask)
        (logp * torch.linspace(-1, 1, logp.numel(), device=d.device)).sum().backward()
        sync(d.device)
        grads = torch.cat([p.grad.full_tensor().flatten().double() for p in model.parameters()])
        return logp.detach().double(), grads, time.perf_counter() - t0

    exact_logp, exact_grads, _ = run("dense", "fp32", False, False)
    for mp in precisions:
        dense = run("dense", mp, False, False)
        for ac, compile in modes:
            flex = run("flex", mp, ac, compile)
            e_logp, e_grad = rel_err(flex[0], exact_logp), rel_err(flex[1], exact_grads)
            d_logp, d_grad = rel_err(dense[0], exact_logp), rel_err(dense[1], exact_grads)
            if mp == "fp32":  # the same arithmetic up to summation order (TF32 is off by default)
                ok = e_logp <= 1e-4 and e_grad <= 1e-3
            else:  # no worse than the dense path in bf16, both against fp32 dense
                ok = e_logp <= 2 * d_logp + 1e-3 and e_grad <= 2 * d_grad + 1e-3
            mode = ("compiled" if compile else "eager") + (" + activation checkpointing" if ac else "")
            value = f"logp {e_logp:.1e}, grads {e_grad:.1e} (dense {mp}: {d_logp:.1e}, {d_grad:.1e})"
            row(
                "flex",
                f"{mp} {mode}",
                "pass" if ok else "fail",
                value,
                f"rel. error vs fp32 dense; {flex[2]:.1f}s incl. compile",
            )


# ----------------------------------------------------------------------------- one training step


SHAPE_BUCKETS = 128  # train.shape_buckets' default with compile: the shapes training compiles


def random_step(kind: str, vocab: int, max_len: int, tokens_per_microbatch: int, rng: random.Random):
    """One optimizer step's data of random tokens, one micro-batch's worth: SFT docs (the last 3/4
    of each a target) or DPO groups [prompt][chosen][rejected], packed as the loader packs them and
    padded to its static shapes (llama_posttrain/data/loader.py with train.shape_buckets 128)."""
    from llama_posttrain.data.loader import Step
    from llama_posttrain.data.rows import Example, Seq, Target, build_group, collate, plan, static_shape
    from llama_posttrain.llama.chat import EncodedDialog

    def enc(n):
        return EncodedDialog([rng.randrange(vocab) for _ in range(n)], [True] * n, [False] * n)

    examples = []
    while sum(len(e) for e in examples) < tokens_per_microbatch * 0.9:
        if kind == "dpo":
            lo, hi = max_len // 16, max_len // 4  # 256 .. 1024 at max_len 4096
            ex = build_group(enc(rng.randint(lo, hi)), [enc(rng.randint(lo, hi)) for _ in range(2)])
        else:
            n = rng.randint(max_len // 8, max_len)
            toks = [rng.randrange(vocab) for _ in range(n)]
            ex = Example(toks, list(range(n)), [0] * n, [Target(i - 1, toks[i], 0, False) for i in range(n // 4, n)])
            ex.seqs = [Seq(n - 1, 0)]
        ex.uid = len(examples)
        examples.append(ex)
    targets = sum(len(e.targets) for e in examples)
    pairs = sum(len(e.seqs) * (len(e.seqs) - 1) // 2 for e in examples)
    best = sum(1 for e in examples for t in e.targets if t.seq == 0)
    batches = []
    for rows in plan([len(e) for e in examples], max_len, tokens_per_microbatch):
        longest = max(sum(len(examples[i]) for i in row) for row in rows)
        shape = static_shape(longest, max_len, tokens_per_microbatch, SHAPE_BUCKETS)
        batches.append(collate([[examples[i] for i in row] for row in rows], shape=shape))
    return Step(batches, targets, pairs, best)


def step(
    kinds: list[str],
    tokens_per_microbatch: int,
    steps: int,
    compile: bool,
    ac: bool,
    preset: str = "llama3.2-1b",
    profile: bool = False,
) -> None:
    """Steps of llama_posttrain/train/loop.py's Trainer at the llama3.2-1b shape (random weights, random tokens), SFT
    and DPO (live bf16 reference) on the same policy, in the order of `kinds`: tokens/s per GPU, MFU
    (llama_posttrain/train/loop.py step_flops over the step time), peak memory. The first step of each (compiles) is
    not timed. profile: then one more step under torch.profiler, its device time by kernel group
    (`BREAKDOWN`)."""
    from llama_posttrain.data.rows import bucket_lengths
    from llama_posttrain.train import dpo, sft
    from llama_posttrain.train.config import Config
    from llama_posttrain.train.distributed import build_model, init_distributed
    from llama_posttrain.train.loop import Trainer

    d = init_distributed()
    cfg = Config()
    cfg.train.mixed_precision, cfg.train.compile, cfg.train.activation_checkpointing = "bf16", compile, ac
    cfg.optim.warmup_steps, cfg.optim.schedule = 0, "constant"
    max_len = min(4096, tokens_per_microbatch)
    shapes = {
        "static_shapes": len(bucket_lengths(max_len, SHAPE_BUCKETS)),
        "compile": compile,
    }  # as llama_posttrain/train/entry.py
    t0 = time.perf_counter()
    model = build_model(d, None, preset, "lm", 0, "bf16", ac, **shapes)
    setup_s = time.perf_counter() - t0
    rng = random.Random(0)
    if profile:
        patterns = "; ".join(f"{g}: {p or '(the rest)'}" for g, p in BREAKDOWN)
        row("step", "step-time breakdown patterns", "info", patterns, "re.search in 'launching op < callers | kernel'")
    for kind in kinds:
        if kind == "dpo":
            t0 = time.perf_counter()
            ref = build_model(
                d, None, preset, "lm", 0, "bf16", trainable=False, **shapes
            )  # compiled, as llama_posttrain/train/dpo.py
            setup_s += time.perf_counter() - t0
            objective = dpo.make_objective(model, ref, dpo.DPOSection(), "auto")
        else:
            objective = sft.make_objective(model, "auto")
        trainer = Trainer(cfg, d, model, objective, None, None, objective)
        data = [
            random_step(kind, model.config.vocab_size, max_len, tokens_per_microbatch, rng)
            for _ in range(steps + 1 + profile)
        ]
        sync(d.device)
        t0 = time.perf_counter()
        trainer.train_step(data[0], 1, timed=True)  # warm-up: compiles
        seen = {tuple(mb.tokens.shape) for mb in data[0].micro_batches}
        for s in data[1:]:  # every other (B, T) the timed steps will meet, compiled before the clock runs
            if not {tuple(mb.tokens.shape) for mb in s.micro_batches} <= seen:
                trainer.train_step(s, 1, timed=True)
                seen |= {tuple(mb.tokens.shape) for mb in s.micro_batches}
        sync(d.device)
        first_s = time.perf_counter() - t0
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        metrics, wall = [], []
        for i, s in enumerate(data[1 : steps + 1], start=2):
            t0 = time.perf_counter()
            metrics.append(trainer.train_step(s, i, timed=True))  # synced: the optimizer's GPU time counted
            sync(d.device)
            wall.append(time.perf_counter() - t0)
        what = f"{kind} {preset} ({tokens_per_microbatch} tokens/micro-batch, compile {compile}, AC {ac})"
        report_step(what, metrics, wall, first_s, setup_s)
        if profile:
            report_breakdown(what, *profiled_step(trainer, data[-1], steps + 2, d.device))
        del trainer


def report_step(what, metrics, wall, first_s, setup_s) -> None:
    def med(key):
        return statistics.median(x[key] for x in metrics)

    mfu = f"{100 * med('mfu'):.1f}%" if all("mfu" in x for x in metrics) else "n/a"
    row(
        "step",
        f"{what}: tokens/s per GPU",
        "info",
        f"{med('tokens_per_s_per_gpu'):,.0f}",
        f"median of {len(metrics)} steps; {med('tokens'):,.0f} tokens/step",
    )
    row(
        "step",
        f"{what}: MFU",
        "info",
        mfu,
        "model FLOPs (llama_posttrain/train/loop.py step_flops) / step time / bf16 dense peak",
    )
    row("step", f"{what}: peak memory", "info", f"{med('peak_memory_gib'):.1f} GiB", "torch.cuda.max_memory_allocated")
    row(
        "step",
        f"{what}: step time",
        "info",
        f"{statistics.median(wall):.3f} s",
        f"synced; warm-up steps (compile each shape) {first_s:.1f} s; model setup {setup_s:.1f} s",
    )
    finite = all(torch.isfinite(torch.tensor(x["loss"])) for x in metrics)
    row("step", f"{what}: finite loss", "pass" if finite else "fail", f"{med('loss'):.4f}")


# ----------------------------------------------------------------------------- step-time breakdown

# Each kernel goes to the first group whose pattern (re.search) is found in "<the op that launched it> <
# its callers < ... | <kernel name>": by name, and by the op only where a name cannot say (the LM head's
# GEMMs inside our log-prob autograd.Functions, the optimizer's kernels inside Optimizer.step, FSDP's
# copies around its collectives). MLP and attention projections are both GEMMs: "matmul" holds both.
BREAKDOWN = [
    ("communication", r"nccl|FSDP::|fsdp::|c10d::"),
    ("log-prob", r"TargetLogprobs|_forward_kernel|_dlogits_kernel"),  # kernels/: the Function, the Triton kernels
    ("optimizer", r"Optimizer\.step|multi_tensor_apply|fused_adam|_foreach_"),  # AdamW and the grad-norm clip
    ("attention", r"flex_attention|flash|fmha|sdpa|scaled_dot_product|cudnn"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|aten::(mm|addmm|bmm|baddbmm)\b"),
    ("other", r""),  # elementwise, norms, RoPE, reductions, copies
]


def kernel_groups(kernels, groups=BREAKDOWN) -> list[str]:
    """[(launching op < its callers ..., kernel name, time)] -> each one's group: the first whose pattern
    is found in "context | name"."""
    patterns = [(g, re.compile(p)) for g, p in groups]
    return [next(g for g, p in patterns if p.search(f"{context} | {name}")) for context, name, _ in kernels]


def group_times(kernels, groups=BREAKDOWN) -> dict[str, float]:
    """[(launching op < its callers ..., kernel name, time)] -> {group: summed time}, in `groups` order."""
    out = {g: 0.0 for g, _ in groups}
    for (_, _, t), g in zip(kernels, kernel_groups(kernels, groups)):
        out[g] += t
    return out


def profiled_kernels(prof) -> list[tuple[str, str, float]]:
    """(launching op < its callers ..., name, microseconds) of every CUDA kernel, memcpy and memset in a
    torch.profiler run; a run without CUDA events (the CPU): its CPU ops and their own (self) time."""
    from torch.autograd import DeviceType

    events = prof.events()
    # the ops (linked to nothing: runtime calls are linked to their op, their ids are CUPTI's)
    ops = {e.id: e for e in events if e.device_type == DeviceType.CPU and e.linked_correlation_id == 0}

    def context(e) -> str:
        names = []
        while e is not None:
            names.append(e.name)
            e = e.cpu_parent
        return " < ".join(names)

    device = [e for e in events if e.device_type == DeviceType.CUDA]
    if device:
        return [(context(ops.get(e.linked_correlation_id)), e.name, e.time_range.elapsed_us()) for e in device]
    cpu = [e for e in ops.values() if not e.is_async]
    return [(context(e.cpu_parent), e.name, e.self_cpu_time_total) for e in cpu]


def profiled_step(trainer, batch, step_number: int, device) -> tuple[list, float]:
    """One more train_step under torch.profiler (CPU + CUDA activity) -> (its kernels, wall seconds)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        trainer.train_step(batch, step_number, timed=True)
        sync(device)
        wall = time.perf_counter() - t0
    return profiled_kernels(prof), wall


def report_breakdown(what: str, kernels: list, wall: float) -> None:
    """Rows: the device time of each group and its share, the total, the largest 'other' kernels."""
    groups, total = group_times(kernels), sum(t for _, _, t in kernels)
    unit = "CUDA kernel" if torch.cuda.is_available() else "CPU op"
    note = f"one profiled step; {unit} time grouped by kernel name and launching op (the patterns row)"
    for g, t in groups.items():
        row("step", f"{what}: breakdown, {g}", "info", f"{t / 1e3:.1f} ms ({100 * t / max(total, 1e-9):.0f}%)", note)
    row(
        "step",
        f"{what}: breakdown, total",
        "info",
        f"{total / 1e3:.1f} ms in {len(kernels)} {unit}s; step {1e3 * wall:.0f} ms under the profiler",
        "kernels of all streams summed (communication may overlap compute)",
    )
    other = {}
    for (_, name, t), g in zip(kernels, kernel_groups(kernels)):
        if g == "other":
            other[name] = other.get(name, 0.0) + t
    top = sorted(other.items(), key=lambda kv: -kv[1])[:3]
    row("step", f"{what}: breakdown, largest 'other'", "info", "; ".join(f"{n[:70]} {t / 1e3:.1f} ms" for n, t in top))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=["kernels", "flex", "step"])
    ap.add_argument("kinds", nargs="*", choices=["sft", "dpo"], help="for `step`, in this order (default: dpo sft)")
    ap.add_argument("--tokens-per-microbatch", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="`step`: one more step profiled, time by kernel group")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("these checks need a CUDA device")
    os.environ.pop("TRITON_INTERPRET", None)  # the real kernels, not the interpreter
    if args.check == "kernels":
        kernels()
    elif args.check == "flex":
        flex()
    else:
        kinds = args.kinds or ["dpo", "sft"]
        compile, ac = not args.no_compile, args.activation_checkpointing
        step(kinds, args.tokens_per_microbatch, args.steps, compile, ac, profile=args.profile)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
