"""Throughput of batched sampling, as in rejection sampling: P prompts x K samples each.

Compares, on the same weights and the same sampling settings (temperature 1, no top-k/top-p,
no stop token, so every row produces exactly --new tokens):
  ours: fan-out      prefill each prompt once, copy its KV cache to K rows, decode P*K rows together
  ours: compiled     the same with generate(compile=True): the decode step through torch.compile (--compile);
                     compiled and timed after the other rows are printed (so a run cut during the compile keeps them)
  ours: no fan-out   the P*K rows prefilled separately (each prompt repeated K times), then decoded together
  ours: naive        one sample at a time (P*K calls of batch 1)
  HF generate        transformers' LlamaForCausalLM.generate(num_return_sequences=K), left-padded batch

    python experiments/bench/generate.py                 # CPU table, both model sizes
    python experiments/bench/generate.py --sizes 1b      # on a GPU: a Llama 3.2 1B-size config
    python experiments/bench/generate.py --sizes 1b --prompts 16 --new 128 --methods fanout compiled  # validate.sh's
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

import torch

from llama_posttrain.llama import Transformer, get_preset, save_model
from llama_posttrain.llama.generate import generate

SIZES = {
    "tiny": lambda: get_preset("tiny"),  # 0.8M params, byte vocabulary (512)
    "small": lambda: get_preset("tiny", dim=512, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1536, vocab_size=128256),
    "1b": lambda: get_preset("llama3.2-1b"),
}


_MISSING = object()
METHODS = ["fanout", "compiled", "no-fanout", "naive", "hf"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_interleaved(methods, device, repeats, warm_up=True):
    """[(label, fn, repeats or None)] -> [(label, best time)]: the methods take turns, one run each per
    round, so that load from other jobs on the machine falls on all of them alike."""
    for _, fn, _ in methods if warm_up else ():
        fn()
    sync(device)
    best = {label: float("inf") for label, _, _ in methods}
    for r in range(repeats):
        for label, fn, n in methods:
            if n is not None and r >= n:
                continue
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[label] = min(best[label], time.perf_counter() - t0)
    return [(label, best[label]) for label, _, _ in methods]


def bench_size(name, args, device, dtype):
    config = SIZES[name]()
    torch.manual_seed(0)
    model = Transformer(config).to(device=device, dtype=dtype).eval()
    P, K, new = args.prompts, args.samples, args.new
    g = torch.Generator().manual_seed(0)
    lengths = [args.prompt_len - 3 * i for i in range(P)]  # unequal lengths: padding is exercised
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in lengths]
    gen = torch.Generator(device).manual_seed(0)
    kw = dict(max_new_tokens=new, temperature=1.0, generator=gen)
    title = (
        f"\n### {name}: {config.num_params() / 1e6:.1f}M params, {P} prompts x {K} samples, "
        f"prompt {min(lengths)}-{max(lengths)} tokens, {new} new tokens, {str(dtype).removeprefix('torch.')}"
    )
    if args.profile:
        generate(model, prompts, num_samples=K, **kw)  # warm-up
        restore = []

        def patch(obj, attr, value):
            restore.append(
                (
                    obj,
                    attr,
                    obj.__dict__.get(attr, _MISSING) if isinstance(obj, torch.nn.Module) else getattr(obj, attr),
                )
            )
            setattr(obj, attr, value)

        try:
            table = profile_decode(model, prompts, K, new, patch)
        finally:
            for obj, attr, old in reversed(restore):
                if old is _MISSING:
                    delattr(obj, attr)
                else:
                    setattr(obj, attr, old)
        text = f"{title}, decode profile\n\n{table}"
        print(text, flush=True)
        return text

    def fanout():
        out = generate(model, prompts, num_samples=K, **kw)
        assert all(len(s) == new for ss in out for s in ss)

    def no_fanout():
        generate(model, [p for p in prompts for _ in range(K)], num_samples=1, **kw)

    def naive():
        for p in prompts:
            for _ in range(K):
                generate(model, [p], num_samples=1, **kw)

    chosen = args.methods or (
        ["fanout"] + ["compiled"] * args.compile + ["no-fanout", "naive"] * (not args.quick) + ["hf"]
    )
    methods = []  # eager ones, timed in turns
    if "fanout" in chosen:
        methods.append(("ours: fan-out", fanout, None))
    if "no-fanout" in chosen:
        methods.append(("ours: no fan-out", no_fanout, None))
    if "naive" in chosen:
        methods.append(("ours: naive per-sample", naive, 1))
    if "hf" in chosen:
        try:
            methods.append(("HF generate", hf_generate_fn(model, prompts, K, new, device, dtype), None))
        except ImportError:
            print("HF generate: transformers is not installed, left out")
    n_tokens = P * K * new
    lines = [
        title,
        "",
        "| method | time (s) | samples/s | generated tokens/s | vs fan-out |",
        "|---|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    rows = timed_interleaved(methods, device, args.repeats, warm_up=not args.quick) if methods else []
    ref = rows[0][1] if rows else None

    def line(label, t):
        vs = f"{t / ref:.2f}x" if ref else ""
        lines.append(f"| {label} | {t:.3f} | {P * K / t:,.1f} | {n_tokens / t:,.0f} | {vs} |")
        print(lines[-1], flush=True)

    for label, t in rows:  # printed before the compile starts: a run cut during it keeps them
        line(label, t)
    if "compiled" in chosen:

        def fanout_compiled():
            out = generate(model, prompts, num_samples=K, compile=True, **kw)
            assert all(len(s) == new for ss in out for s in ss)

        t0 = time.perf_counter()
        fanout_compiled()  # compiles the decode step (the timed runs reuse it)
        first = time.perf_counter() - t0
        best = timed_interleaved([("compiled", fanout_compiled, None)], device, args.repeats, warm_up=False)[0][1]
        line(f"ours: fan-out, compiled (compile + first call {first:.1f} s, untimed)", best)
    lines += ["", f"load average at end (1, 5, 15 min): {_load()}"]
    print("\n".join(lines[-2:]), flush=True)
    return "\n".join(lines)


def hf_generate_fn(model, prompts, K, new, device, dtype):
    """transformers' LlamaForCausalLM.generate on the same weights, left-padded, K samples per prompt."""
    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as d:
        save_model(model, d, format="hf")
        hf = LlamaForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    P, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(P, L, dtype=torch.long)
    mask = torch.zeros(P, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :], mask[i, L - len(p) :] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)

    def hf_generate():
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                num_return_sequences=K, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
            )  # fmt: skip
        assert out.shape == (P * K, L + new)

    return hf_generate


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


class StepProfile:
    """Exclusive wall time per category of the decode loop, by wrapping the functions that do each part.
    CPU only (ops are synchronous there). A wrapped call's time goes to its label, minus the time of the
    wrapped calls inside it; what no label covers is the loop's own Python and glue."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.stack: list[float] = []  # time spent in wrapped children of each open call
        self.off = False  # inside the prefill: its parts are not counted as decode work

    def wrap(self, fn, label):
        def timed_fn(*a, **kw):
            if self.off:
                return fn(*a, **kw)
            t0 = time.perf_counter()
            self.stack.append(0.0)
            try:
                return fn(*a, **kw)
            finally:
                elapsed, children = time.perf_counter() - t0, self.stack.pop()
                self.times[label] = self.times.get(label, 0.0) + elapsed - children
                if self.stack:
                    self.stack[-1] += elapsed

        return timed_fn


def profile_decode(model, prompts, K, new, patch) -> str:
    """A markdown table: share of the decode loop's time per part (prefill and the final transfer excluded)."""
    import torch.nn.functional as F

    import llama_posttrain.llama.generate as gen_mod
    import llama_posttrain.llama.model as model_mod

    prof = StepProfile()
    out_w = model.output_weight
    real_linear = F.linear
    vocab = prof.wrap(real_linear, "vocabulary projection")
    patch(F, "linear", lambda x, w, *a: vocab(x, w, *a) if w is out_w else real_linear(x, w, *a))
    real_mm = torch.mm  # the eager decode step projects into a reused buffer: torch.mm(h, W.t(), out=...)
    vocab_mm = prof.wrap(real_mm, "vocabulary projection")
    patch(torch, "mm", lambda x, w, **kw: (vocab_mm if w.data_ptr() == out_w.data_ptr() else real_mm)(x, w, **kw))
    for layer in model.layers:
        patch(layer.attention, "forward", prof.wrap(layer.attention.forward, "attention (QKV, RoPE, SDPA, out proj)"))
        patch(layer.feed_forward, "forward", prof.wrap(layer.feed_forward.forward, "MLP"))
        for norm in (layer.attention_norm, layer.ffn_norm):
            patch(norm, "forward", prof.wrap(norm.forward, "norms, embedding, RoPE tables"))
    patch(model.norm, "forward", prof.wrap(model.norm.forward, "norms, embedding, RoPE tables"))
    patch(model.tok_embeddings, "forward", prof.wrap(model.tok_embeddings.forward, "norms, embedding, RoPE tables"))
    for name in ("rope_cos_sin", "rope_inv_freq"):
        patch(model_mod, name, prof.wrap(getattr(model_mod, name), "norms, embedding, RoPE tables"))
    patch(gen_mod, "rope_cos_sin", prof.wrap(gen_mod.rope_cos_sin, "norms, embedding, RoPE tables"))
    cache_label = "KV-cache bookkeeping (writes, masks, row selection)"
    for cls in (model_mod.KVCache, gen_mod.DecodeCache):
        for name in ("update", "repeat_interleave", "select", "advance"):
            if name in cls.__dict__:
                patch(cls, name, prof.wrap(cls.__dict__[name], cache_label))
    patch(model_mod, "structure_mask", prof.wrap(model_mod.structure_mask, cache_label))
    patch(gen_mod, "sample_next", prof.wrap(gen_mod.sample_next, "sampling"))
    real_trunk = model.trunk

    def trunk(tokens, *a, **kw):  # the prefill (T > 1) is timed as a whole, outside the decode loop
        if tokens.shape[1] == 1:
            return real_trunk(tokens, *a, **kw)
        prof.off, t0 = True, time.perf_counter()
        try:
            return real_trunk(tokens, *a, **kw)
        finally:
            prof.off, prof.prefill = False, time.perf_counter() - t0

    patch(model, "trunk", trunk)
    total_label = "decode loop (total)"
    t0 = time.perf_counter()
    generate(model, prompts, num_samples=K, max_new_tokens=new, temperature=1.0)
    total = time.perf_counter() - t0 - prof.prefill
    parts = dict(prof.times)
    parts["Python and glue (loop, indexing, stop checks)"] = total - sum(parts.values())
    lines = ["| part of the decode loop | time (s) | share |", "|---|---:|---:|"]
    for label, t in sorted(parts.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {label} | {t:.3f} | {100 * t / total:.1f}% |")
    lines.append(f"| **{total_label}** ({new} steps, prefill {prof.prefill:.2f}s excluded) | {total:.3f} | 100% |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=list(SIZES))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--quick", action="store_true", help="only ours (fan-out) against HF generate, no warm-up runs (a loaded CPU)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="append the table to this markdown file")
    ap.add_argument("--profile", action="store_true", help="instead: the share of each part of the decode loop (CPU)")
    ap.add_argument("--compile", action="store_true", help="also time generate(compile=True) (torch.compile'd step)")
    ap.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        help="exactly these rows (instead of --compile / --quick's choice): fanout, compiled (generate(compile=True), "
        "timed after the eager rows are printed), no-fanout, naive, hf",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hw = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    )
    header = (
        f"## generate benchmark, {datetime.date.today()}\n\ndevice: {hw}; torch {torch.__version__}\n"
        f"command: python experiments/bench/generate.py --sizes {' '.join(args.sizes)} --prompts {args.prompts} "
        f"--samples {args.samples} --prompt-len {args.prompt_len} --new {args.new}"
        f"{' --profile' if args.profile else ''}{' --quick' if args.quick else ''}{' --compile' if args.compile else ''}"
        f"{' --methods ' + ' '.join(args.methods) if args.methods else ''}"
        f" --repeats {args.repeats}\n"
        f"load average at start (1, 5, 15 min): {_load()}"
    )
    print(header)
    tables = [header]
    for name in args.sizes:
        tables.append(bench_size(name, args, device, dtype))  # printed as its rows come
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(tables) + "\n\n")


if __name__ == "__main__":
    main()
