"""The GPU-only checks that experiments/gpu/validate.py runs, one per process:

    python experiments/gpu/checks.py smoke        # a Triton kernel and a torch.compile built and run: the toolchain
    python experiments/gpu/checks.py kernels      # the Triton kernel on real CUDA, bf16 then fp32
    python experiments/gpu/checks.py flex         # FlexAttention (compiled, activation checkpointing) vs dense
    python experiments/gpu/checks.py step sft dpo # 1-GPU SFT then DPO steps at the llama3.2-1b shape
    python experiments/gpu/checks.py step sft dpo --profile  # and one profiled step each: CUDA time by kernel group

The step check runs its steps under torch.cuda.set_sync_debug_mode("warn") and counts the host syncs: a
logged step reads its metrics (a few, expected), an unlogged step (most of training's) should have none.

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
import traceback
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

import torch  # noqa: E402

try:  # the smoke's own kernel (it needs nothing of llama_posttrain); without Triton the smoke says why
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one_kernel(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) + 1, mask=offs < n)

    TRITON_ERROR = ""
except Exception as e:  # not installed, or an install that fails to import
    triton, TRITON_ERROR = None, f"{type(e).__name__}: {e}"

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


# ----------------------------------------------------------------------------- the toolchain


def toolchain() -> tuple[str | None, Path]:
    """(the C compiler Triton and Inductor would use, or None; this Python's Python.h): Triton builds a
    C launcher for each kernel with them, so without either every compiled part fails."""
    import shutil
    import sysconfig

    cc = os.environ.get("CC") or next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    return cc, Path(sysconfig.get_paths()["include"]) / "Python.h"


def _add_one(x: torch.Tensor) -> torch.Tensor:
    """x + 1 by a Triton kernel."""
    if triton is None:
        raise ImportError(f"Triton did not import: {TRITON_ERROR}")
    y = torch.empty_like(x)
    _add_one_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256)
    return y


def smoke(device: str = "cuda", backend: str = "inductor") -> None:
    """Seconds, before the parts that compile: is there a C compiler and Python.h, does a Triton kernel
    build and run, does torch.compile (`backend`) build and run. A machine that lacks one says so here, at
    once, with the reason, instead of in every compiled part's output tail."""
    cc, headers = toolchain()
    ok = cc is not None and headers.exists()
    value = (
        f"C compiler {cc or 'none found (cc, gcc, clang, $CC)'}; {headers} {'found' if headers.exists() else 'missing'}"
    )
    row("smoke", "C compiler and Python headers", "pass" if ok else "fail", value, "Triton and Inductor build C code")
    if triton is not None and device != "cpu" and type(_add_one_kernel).__name__ == "InterpretedFunction":
        row("smoke", "Triton kernel built and run", "fail", "TRITON_INTERPRET was set when checks.py was imported")
        return
    x = torch.arange(1000, dtype=torch.float32, device=device)
    for what, fn in (
        ("Triton kernel built and run", _add_one),
        (f"torch.compile ({backend}) built and run", torch.compile(lambda t: t + 1, backend=backend, dynamic=False)),
    ):
        t0 = time.perf_counter()
        try:
            y = fn(x)
            sync(x.device)
            ok, value = torch.equal(y, x + 1), f"{time.perf_counter() - t0:.1f} s"
        except Exception as e:  # the reason, in the results table: the point of this check
            ok, value = False, f"{type(e).__name__}: {str(e).strip()[:300]}"
        row("smoke", what, "pass" if ok else "fail", value, "" if ok else "every compiled part will fail the same way")


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


STATS_SIZES = [(300, 64, 128256), (1000, 512, 32000)]  # N, H, V: the vocabulary split over several programs


def kernel_stats(name: str, device: str = "cuda", sizes=STATS_SIZES) -> None:
    """The kernel's STATS variant (stats=True: argmax hits, logit sums, entropies; a compile of its own)
    against float64, as tests/test_kernels.py -k stats checks it under the interpreter. Integer-valued
    inputs: every logit is exact in fp32 accumulation, so the hits must equal float64's (ties included)
    and the log-probs must be bitwise those of stats=False; sums and entropies within torch's error."""
    from llama_posttrain.kernels import naive_target_logprobs, target_logprobs

    dtype, rel = KERNEL_DTYPES[name]
    dev = torch.device(device)
    for N, H, V in sizes:
        g = torch.Generator(dev).manual_seed(N + V)
        h = torch.randint(-3, 4, (N, H), generator=g, device=dev).to(dtype)
        w = torch.randint(-3, 4, (V, H), generator=g, device=dev).to(dtype)
        t = torch.randint(0, V, (N,), generator=g, device=dev)
        t[::3] = (h.double() @ w.double().T)[::3].argmax(-1)  # some hits
        t[::5] = -100  # ignored targets
        exact = naive_target_logprobs(h.double(), w.double(), t, stats=True)
        same = naive_target_logprobs(h, w, t, stats=True)
        ours = target_logprobs(h, w, t, backend="triton", deterministic=True, stats=True)
        plain = target_logprobs(h, w, t, backend="triton", deterministic=True)
        hits = torch.equal(ours.is_argmax, exact.is_argmax) and bool(exact.is_argmax.any())
        bitwise = torch.equal(ours.logprobs, plain)
        sums = _within_torch_error(ours.logit_sum, same.logit_sum, exact.logit_sum, rel)
        entropy = _within_torch_error(ours.entropy, same.entropy, exact.entropy, rel)
        ok = hits and bitwise and sums[0] and entropy[0]
        value = (
            f"hits {'equal' if hits else 'differ'} ({int(exact.is_argmax.sum())}); logp {'bitwise' if bitwise else 'differs'}"
            f" vs stats=False; logit sums {sums[1]}; entropy {entropy[1]}"
        )
        row("kernels", f"{name} stats N={N} H={H} V={V}", "pass" if ok else "fail", value, "max abs error vs fp64")


def kernels() -> None:
    """The Triton kernel on CUDA (not the interpreter) against float64, bf16 then fp32, at odd sizes
    up to the Llama 3 8B head; its STATS variant; empty input; tied weights."""
    for name in KERNEL_DTYPES:
        kernel_sizes(name)
        kernel_stats(name)
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
        mask = attention_mask(batch.doc_ids, batch.branch_ids, kind="flex" if attention == "flex" else "dense")
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


def random_example(kind: str, vocab: int, max_len: int, rng: random.Random):
    """Random tokens shaped like training data: an SFT doc (its last 3/4 targets) or a DPO group
    [prompt][chosen][rejected] (llama_posttrain/data/rows.py build_group)."""
    from llama_posttrain.data.rows import Example, Seq, Target, build_group
    from llama_posttrain.llama.chat import EncodedDialog

    def enc(n):
        return EncodedDialog([rng.randrange(vocab) for _ in range(n)], [True] * n, [False] * n)

    if kind == "dpo":
        lo, hi = max_len // 16, max_len // 4  # 256 .. 1024 at max_len 4096
        return build_group(enc(rng.randint(lo, hi)), [enc(rng.randint(lo, hi)) for _ in range(2)])
    n = rng.randint(max_len // 8, max_len)
    toks = [rng.randrange(vocab) for _ in range(n)]
    ex = Example(toks, list(range(n)), [0] * n, [Target(i - 1, toks[i], 0, False) for i in range(n // 4, n)])
    ex.seqs = [Seq(n - 1, 0)]
    return ex


def training_steps(kind: str, vocab: int, max_len: int, tokens_per_microbatch: int, n: int, rng: random.Random):
    """n optimizer steps of random examples, each one micro-batch filled as training fills one: a stream of
    examples packed first-fit (llama_posttrain/data/rows.py `plan`) until the next does not fit, and those
    examples made a step by training's DataLoader (static shapes, train.shape_buckets 128), so that the
    micro-batch's shape, padding and the counts its loss divides by are training's. One compiled shape per
    kind, as training on long data has: a micro-batch whose longest row falls in a shorter bucket is
    dropped, counted and printed. -> (steps, {"dropped": micro-batches dropped, "fill": real tokens / slots})."""
    from llama_posttrain.data.loader import DataLoader
    from llama_posttrain.data.rows import bucket_lengths, plan, rows_per_microbatch

    full = (rows_per_microbatch(max_len, tokens_per_microbatch), bucket_lengths(max_len, SHAPE_BUCKETS)[-1])
    steps, dropped, stream = [], 0, []
    while len(steps) < n:
        stream.append(random_example(kind, vocab, max_len, rng))
        batches = plan([len(e) for e in stream], max_len, tokens_per_microbatch)
        if len(batches) < 2:  # the micro-batch is not closed until an example spills into the next
            continue
        count = sum(len(r) for r in batches[0])  # plan keeps order: the first micro-batch's examples lead
        examples, stream = stream[:count], stream[count:]
        for i, ex in enumerate(examples):
            ex.uid = i
        loader = DataLoader(
            examples, len(examples), max_len, tokens_per_microbatch, shuffle=False, shape_buckets=SHAPE_BUCKETS
        )
        s = loader.build_step(0, 0)
        if len(s.micro_batches) != 1:
            raise AssertionError(f"{len(examples)} examples of one micro-batch packed into {len(s.micro_batches)}")
        if tuple(s.micro_batches[0].tokens.shape) != full:
            dropped += 1
            if dropped > 10 * n:
                raise RuntimeError(f"{kind}: {dropped} micro-batches short of the full shape {full}; {len(steps)} kept")
            continue
        steps.append(s)
    slots = sum(mb.tokens.numel() for s in steps for mb in s.micro_batches)
    real = sum(int((mb.doc_ids >= 0).sum()) for s in steps for mb in s.micro_batches)
    if dropped:
        print(f"{kind}: {dropped} micro-batch(es) dropped, their longest row under the full shape {full}", flush=True)
    return steps, {"dropped": dropped, "fill": real / max(slots, 1)}


def device_model(d, preset: str, trainable: bool, ac: bool, compile: bool, static_shapes: int):
    """train/distributed.py build_model (its meta model, parallelize, broadcast of the full weights), the
    random init on the device: seconds, not a CPU minute per 1B model (fp32 init of 1.2B weights)."""
    from llama_posttrain.train.distributed import build_model

    with torch.device(d.device):
        if trainable:
            return build_model(d, None, preset, "lm", 0, "bf16", ac, compile, static_shapes=static_shapes)
        return build_model(
            d, None, preset, "lm", 0, "bf16", compile=compile, trainable=False, static_shapes=static_shapes
        )


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
    and DPO (live bf16 reference) on the same policy, in the order of `kinds` (SFT first: DPO's policy then
    runs the blocks SFT compiled, the same (B, T)): tokens/s per GPU, MFU (llama_posttrain/train/loop.py
    step_flops over the step time), peak memory. Each step is one full micro-batch (`training_steps`). The
    first step of each kind (compiles) and a step for each new shape or log-prob N bucket are not timed.
    profile: then one more step under torch.profiler, its device time by kernel group (`BREAKDOWN`); a
    failure there costs only those rows. Each kind's objects (trainer, optimizer state, objective, the DPO
    reference) are freed before the next kind starts, so a peak counts only its own kind."""
    import gc

    from llama_posttrain.data.rows import bucket_lengths
    from llama_posttrain.train.config import Config
    from llama_posttrain.train.distributed import init_distributed

    d = init_distributed()
    cfg = Config()
    cfg.train.mixed_precision, cfg.train.compile, cfg.train.activation_checkpointing = "bf16", compile, ac
    cfg.optim.warmup_steps, cfg.optim.schedule = 0, "constant"
    max_len = min(4096, tokens_per_microbatch)
    shapes = len(bucket_lengths(max_len, SHAPE_BUCKETS))  # as llama_posttrain/train/run_setup.py
    t0 = time.perf_counter()
    model = device_model(d, preset, True, ac, compile, shapes)
    setup_s = time.perf_counter() - t0
    rng = random.Random(0)
    if profile:
        patterns = "; ".join(f"{g}: {p or '(the rest)'}" for g, p in BREAKDOWN)
        row("step", "step-time breakdown patterns", "info", patterns, "re.search in 'launching op < callers | kernel'")
    for kind in kinds:
        step_kind(
            kind,
            model,
            cfg,
            d,
            preset,
            tokens_per_microbatch,
            max_len,
            steps,
            compile,
            ac,
            profile,
            shapes,
            rng,
            setup_s,
        )
        gc.collect()  # the kind's trainer, optimizer state, objective and reference: gone before the next kind
        if d.device.type == "cuda":
            torch.cuda.empty_cache()


def step_kind(
    kind, model, cfg, d, preset, tokens_per_microbatch, max_len, steps, compile, ac, profile, shapes, rng, setup_s
):
    """One kind's rows of `step`; everything it builds is local, freed when it returns."""
    from llama_posttrain.kernels.triton_logprobs import n_bucket
    from llama_posttrain.train import dpo, dpo_objective, sft_objective
    from llama_posttrain.train.loop import Trainer
    from llama_posttrain.train.targets import LiveReference

    if kind == "dpo":
        t0 = time.perf_counter()
        ref = device_model(d, preset, False, False, compile, shapes)  # compiled, as llama_posttrain/train/dpo.py
        setup_s += time.perf_counter() - t0
        objective = dpo_objective.make_objective(model, LiveReference(ref, "auto"), dpo.DPOSection(), "auto")
    else:
        objective = sft_objective.make_objective(model, "auto")
    trainer = Trainer(cfg, d, model, objective, None, None, objective)
    data, fill = training_steps(kind, model.config.vocab_size, max_len, tokens_per_microbatch, steps + 1 + profile, rng)

    def compiles(s):  # what a step may compile or autotune: its (B, T) shapes, the log-prob kernel's N buckets
        return {(tuple(mb.tokens.shape), n_bucket(mb.num_targets)) for mb in s.micro_batches}

    sync(d.device)
    t0 = time.perf_counter()
    trainer.train_step(data[0], 1, timed=True)  # warm-up: compiles
    seen = compiles(data[0])
    for s in data[1:]:  # every other shape and N bucket the timed steps will meet, before the clock runs
        if not compiles(s) <= seen:
            trainer.train_step(s, 1, timed=True)
            seen |= compiles(s)
    sync(d.device)
    first_s = time.perf_counter() - t0
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    metrics, wall, logged = [], [], []
    for i, s in enumerate(data[1 : steps + 1], start=2):
        t0 = time.perf_counter()
        m, found = host_syncs(d.device, trainer.train_step, s, i, timed=True)
        metrics.append(m)
        logged.append(found)
        sync(d.device)  # synced: the optimizer's GPU time counted
        wall.append(time.perf_counter() - t0)
    what = f"{kind} {preset} ({tokens_per_microbatch} tokens/micro-batch, compile {compile}, AC {ac})"
    report_step(what, metrics, wall, first_s, setup_s, fill)
    _, unlogged = host_syncs(d.device, trainer.train_step, data[1], steps + 2, timed=False)  # a shape seen
    sync(d.device)
    report_syncs(what, logged, unlogged, len(data[1].micro_batches), d.device)
    if profile:
        breakdown(what, trainer, data[-1], steps + 3, d.device)


def report_step(what, metrics, wall, first_s, setup_s, fill=None) -> None:
    def med(key):
        return statistics.median(x[key] for x in metrics)

    mfu = f"{100 * med('mfu'):.1f}%" if all("mfu" in x for x in metrics) else "n/a"
    row(
        "step",
        f"{what}: tokens/s per GPU",
        "info",
        f"{med('tokens_per_s_per_gpu'):,.0f}",
        f"median of {len(metrics)} steps; {med('tokens'):,.0f} tokens/step"
        + (f"; one micro-batch a step, {100 * fill['fill']:.0f}% of its slots real tokens" if fill else "")
        + (f"; {fill['dropped']} micro-batch(es) of a shorter shape dropped" if fill and fill["dropped"] else ""),
    )
    row(
        "step",
        f"{what}: MFU",
        "info",
        mfu,
        "model FLOPs (llama_posttrain/train/flops.py step_flops) / step time / bf16 dense peak",
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


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's warning under set_sync_debug_mode("warn")


def _where() -> str:
    """The innermost frame of this repository's package on the stack (else of this file): where a call was."""
    root = Path(__file__).resolve().parents[2]
    frames = [f for f in traceback.extract_stack()[:-2] if Path(f.filename).resolve().is_relative_to(root)]
    ours = [f for f in frames if "llama_posttrain" in Path(f.filename).parts] or frames
    if not ours:
        return "outside this repository"
    f = ours[-1]
    return f"{Path(f.filename).resolve().relative_to(root)}:{f.lineno} {f.name}"


def host_syncs(device, fn, *args, **kwargs) -> tuple:
    """fn(*args, **kwargs) under torch.cuda.set_sync_debug_mode("warn") -> (its result, where each
    synchronizing CUDA call it made was: one entry per call, torch warns at each). The CPU has no syncs to
    see: fn runs as is, none found. Other warnings are shown as usual."""
    if device.type != "cuda":
        return fn(*args, **kwargs), []
    found, others = [], []

    def show(message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING in str(message):
            found.append(_where())
        else:
            others.append((message, category, filename, lineno))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show  # restored by catch_warnings
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(before)
    for message, category, filename, lineno in others:
        warnings.warn_explicit(message, category, filename, lineno)
    return out, found


def _places(found: list[str], top: int = 4) -> str:
    counts = {w: found.count(w) for w in dict.fromkeys(found)}
    shown = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    more = len(counts) - len(shown)
    return "; ".join(f"{n}x {w}" for w, n in shown) + (f"; {more} more place(s)" if more else "")


def report_syncs(what: str, logged: list[list[str]], unlogged: list[str], micro_batches: int, device) -> None:
    """Rows: the host syncs of a logged step (its metrics read to the host: expected) and of an unlogged
    one (none expected: llama_posttrain/train/loop.py Trainer.train_step)."""
    if device.type != "cuda":
        row("step", f"{what}: host syncs, an unlogged step", "info", "not checked", "CUDA only (sync debug mode)")
        return
    per_step = statistics.median(len(f) for f in logged)
    row(
        "step",
        f"{what}: host syncs, a logged step",
        "info",
        f"{per_step:g}",
        "median over the timed steps (the step clock's synchronize, the metrics read back); "
        + (_places(logged[0]) or "none"),
    )
    row(
        "step",
        f"{what}: host syncs, an unlogged step",
        "pass" if not unlogged else "fail",
        f"{len(unlogged)}",
        f"torch.cuda.set_sync_debug_mode('warn') over train_step(timed=False), {micro_batches} micro-batch(es); "
        + (_places(unlogged) or "none expected"),
    )


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


def _context(e) -> str:
    """An op and its callers: "op < caller < ..."."""
    names = []
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    return " < ".join(names)


def profiled_kernels(prof) -> list[tuple[str, str, float]]:
    """(launching op < its callers ..., name, microseconds) of every CUDA kernel, memcpy and memset in a
    torch.profiler run; a run without CUDA events (the CPU): its CPU ops and their own (self) time.

    Read with what torch 2.11 (the GPU machines') has: the device events, and each CPU op's `kernels`
    (name, device, duration of the device events torch linked to that op); FunctionEvent's
    linked_correlation_id came after 2.11. A device event goes to an op whose `kernels` lists its name and
    duration (the earliest such op first: events come in start order); one that no op lists (launched outside any op) gets no context. A GPU user annotation (the
    device-side span of a record_function, is_user_annotation) is no kernel: left out, as torch's tables do."""
    from torch.autograd import DeviceType

    events = prof.events()
    ops = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    device = [e for e in events if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
    if not device:
        return [(_context(e.cpu_parent), e.name, e.self_cpu_time_total) for e in ops]
    launched_by: dict[tuple[str, float], list] = {}  # (kernel name, duration) -> the ops that list one
    for op in ops:
        for k in op.kernels:
            launched_by.setdefault((k.name, k.duration), []).append(op)
    out = []
    for e in device:
        us = e.time_range.elapsed_us()
        ops_ = launched_by.get((e.name, us))
        out.append((_context(ops_.pop(0)) if ops_ else "", e.name, us))
    return out


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


def breakdown(what: str, trainer, batch, step_number: int, device) -> None:
    """report_breakdown of one profiled step. A failure here (a profiler API this torch lacks, the
    profiler's memory) costs only the breakdown: one fail row with the error; the rows before it stand and
    the part goes on."""
    try:
        report_breakdown(what, *profiled_step(trainer, batch, step_number, device))
    except Exception as e:
        traceback.print_exc()
        row("step", f"{what}: breakdown", "fail", f"{type(e).__name__}: {str(e).strip()[:300]}", "no breakdown")


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
    ap.add_argument("check", choices=["smoke", "kernels", "flex", "step"])
    ap.add_argument("kinds", nargs="*", choices=["sft", "dpo"], help="for `step`, in this order (default: sft dpo)")
    ap.add_argument("--tokens-per-microbatch", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--profile", action="store_true", help="`step`: one more step profiled, time by kernel group")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("these checks need a CUDA device")
    os.environ.pop("TRITON_INTERPRET", None)  # the real kernels, not the interpreter
    if args.check == "smoke":
        smoke()
    elif args.check == "kernels":
        kernels()
    elif args.check == "flex":
        flex()
    else:
        kinds = args.kinds or ["sft", "dpo"]
        compile, ac = not args.no_compile, args.activation_checkpointing
        step(kinds, args.tokens_per_microbatch, args.steps, compile, ac, profile=args.profile)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
