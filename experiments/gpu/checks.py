"""The GPU-only checks that experiments/gpu/validate.py runs, one per process:

    python experiments/gpu/checks.py kernels      # the Triton kernel on real CUDA, bf16 then fp32
    python experiments/gpu/checks.py flex         # FlexAttention (compiled, activation checkpointing) vs dense
    python experiments/gpu/checks.py step dpo sft # 1-GPU DPO then SFT steps at the llama3.2-1b shape

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
    from kernels import target_logprobs

    return target_logprobs(h, w, t, backend="triton", deterministic=True)


def _within_torch_error(ours, same, exact, rel) -> tuple[bool, str]:
    """tests/test_kernels.py's bound: error vs fp64 <= torch's in the same dtype + rel * max |exact|."""
    e_ours, e_torch = (ours.double() - exact).abs().max().item(), (same.double() - exact).abs().max().item()
    return e_ours <= e_torch + rel * exact.abs().max().item(), f"{e_ours:.2e} (torch {e_torch:.2e})"


def kernel_sizes(name: str) -> None:
    from kernels import naive_target_logprobs

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
    from kernels import naive_target_logprobs

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
    from data.rows import Example, Seq, Target, build_group, pack
    from llama.chat import EncodedDialog

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
    from llama import ModelConfig, Transformer
    from llama.model import attention_mask
    from train.distributed import init_distributed, parallelize
    from train.targets import model_logps

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


def random_step(kind: str, vocab: int, max_len: int, tokens_per_microbatch: int, rng: random.Random):
    """One optimizer step's data of random tokens, one micro-batch's worth: SFT docs (the last 3/4
    of each a target) or DPO groups [prompt][chosen][rejected], packed as the loader packs them."""
    from data.loader import Step
    from data.rows import Example, Seq, Target, build_group, pack
    from llama.chat import EncodedDialog

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
    return Step(pack(examples, max_len, tokens_per_microbatch), targets, pairs, best)


def step(
    kinds: list[str], tokens_per_microbatch: int, steps: int, compile: bool, ac: bool, preset: str = "llama3.2-1b"
) -> None:
    """Steps of train/loop.py's Trainer at the llama3.2-1b shape (random weights, random tokens), SFT
    then DPO (live bf16 reference) on the same policy: tokens/s per GPU, MFU (train/loop.py
    step_flops over the step time), peak memory. The first step of each (compiles) is not timed."""
    from train import dpo, sft
    from train.config import Config
    from train.distributed import build_model, init_distributed
    from train.loop import Trainer

    d = init_distributed()
    cfg = Config()
    cfg.train.mixed_precision, cfg.train.compile, cfg.train.activation_checkpointing = "bf16", compile, ac
    cfg.optim.warmup_steps, cfg.optim.schedule = 0, "constant"
    t0 = time.perf_counter()
    model = build_model(d, None, preset, "lm", 0, "bf16", ac, compile)
    setup_s = time.perf_counter() - t0
    rng = random.Random(0)
    for kind in kinds:
        if kind == "dpo":
            t0 = time.perf_counter()
            ref = build_model(d, None, preset, "lm", 0, "bf16", trainable=False)
            setup_s += time.perf_counter() - t0
            objective = dpo.make_objective(model, ref, dpo.DPOSection(), "auto")
        else:
            objective = sft.make_objective(model, "auto")
        trainer = Trainer(cfg, d, model, objective, None, None, objective)
        max_len = min(4096, tokens_per_microbatch)
        data = [
            random_step(kind, model.config.vocab_size, max_len, tokens_per_microbatch, rng) for _ in range(steps + 1)
        ]
        sync(d.device)
        t0 = time.perf_counter()
        trainer.train_step(data[0], 1, timed=True)  # warm-up: compiles
        sync(d.device)
        first_s = time.perf_counter() - t0
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        metrics, wall = [], []
        for i, s in enumerate(data[1:], start=2):
            t0 = time.perf_counter()
            metrics.append(trainer.train_step(s, i, timed=True))  # synced: the optimizer's GPU time counted
            sync(d.device)
            wall.append(time.perf_counter() - t0)
        report_step(f"{kind} {preset}", metrics, wall, first_s, setup_s, tokens_per_microbatch, compile, ac)
        del trainer


def report_step(kind, metrics, wall, first_s, setup_s, tokens_per_microbatch, compile, ac) -> None:
    def med(key):
        return statistics.median(x[key] for x in metrics)

    what = f"{kind} ({tokens_per_microbatch} tokens/micro-batch, compile {compile}, AC {ac})"
    mfu = f"{100 * med('mfu'):.1f}%" if all("mfu" in x for x in metrics) else "n/a"
    row(
        "step",
        f"{what}: tokens/s per GPU",
        "info",
        f"{med('tokens_per_s_per_gpu'):,.0f}",
        f"median of {len(metrics)} steps; {med('tokens'):,.0f} tokens/step",
    )
    row("step", f"{what}: MFU", "info", mfu, "model FLOPs (train/loop.py step_flops) / step time / bf16 dense peak")
    row("step", f"{what}: peak memory", "info", f"{med('peak_memory_gib'):.1f} GiB", "torch.cuda.max_memory_allocated")
    row(
        "step",
        f"{what}: step time",
        "info",
        f"{statistics.median(wall):.3f} s",
        f"synced; first step (compiles) {first_s:.1f} s; model setup {setup_s:.1f} s",
    )
    finite = all(torch.isfinite(torch.tensor(x["loss"])) for x in metrics)
    row("step", f"{what}: finite loss", "pass" if finite else "fail", f"{med('loss'):.4f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("check", choices=["kernels", "flex", "step"])
    ap.add_argument("kinds", nargs="*", choices=["sft", "dpo"], help="for `step`, in this order (default: dpo sft)")
    ap.add_argument("--tokens-per-microbatch", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--activation-checkpointing", action="store_true")
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
        step(kinds, args.tokens_per_microbatch, args.steps, not args.no_compile, args.activation_checkpointing)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
