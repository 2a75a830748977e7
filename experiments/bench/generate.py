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

A real model instead (--checkpoint DIR, e.g. experiments/smollm2-135m/model): ours loads DIR, HF generate its HF
export (llama.convert), the same weights; the prompts are the step benchmarks' (common.make_records, 140-200
tokens) as user turns rendered with DIR's own chat template (HF's apply_chat_template checked equal to ours);
--temperature and --top-p on both sides; every row exactly --new tokens (ours: no stop token; HF:
min_new_tokens = max_new_tokens). Each method runs in its own process, so its peak memory is its own:

    python experiments/bench/generate.py --checkpoint experiments/smollm2-135m/model --prompts 4 --samples 8 \
        --new 64 --temperature 0.7 --top-p 0.9
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    add_checkpoint_argument,
    add_summary_argument,
    append_summary,
    checkpoint_config,
    export_hf,
    make_records,
    our_chat,
    peak_memory_gib,
    run_child,
    setup_done,
)

from llama_posttrain.llama import Transformer, get_preset, load_model, save_model
from llama_posttrain.llama.generate import generate
from llama_posttrain.llama.heads import model_params

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
        f"\n### {name}: {model_params(config) / 1e6:.1f}M params, {P} prompts x {K} samples, "
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


# ----------------------------------------------------------------------------- a real model (--checkpoint)

LABELS = {
    "fanout": "ours: fan-out",
    "compiled": "ours: fan-out, compiled",
    "no-fanout": "ours: no fan-out",
    "naive": "ours: naive per-sample",
    "hf": "HF generate",
}
# the options a method's process gets from the parent (common.run_child), besides --side/--workdir/--device
CHECKPOINT_OPTIONS = ("checkpoint", "samples", "new", "repeats", "temperature", "top_p", "quick", "threads")


def checkpoint_side(args) -> None:
    """In a method's process (--side): load the model, warm up (not with --quick, always when compiled), time
    --repeats calls; print one JSON line (common.run_child reads it)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    work = Path(args.workdir)
    prompts = json.loads((work / "prompts.json").read_text())  # [{"messages", "ids"}], ids as ours renders them
    ids = [p["ids"] for p in prompts]
    P, K, new = len(ids), args.samples, args.new
    extra = {}
    if args.side == "hf":
        fn, model, extra["same_ids"] = hf_checkpoint_fn(work / "hf", prompts, args, device, dtype)
    else:
        model = load_model(args.checkpoint, dtype=dtype, device=device).eval()
        gen = torch.Generator(device).manual_seed(0)
        kw = dict(max_new_tokens=new, temperature=args.temperature, top_p=args.top_p, generator=gen)  # no stop ids

        def fn():
            if args.side == "naive":
                out = [generate(model, [p], num_samples=1, **kw)[0] for p in ids for _ in range(K)]
            elif args.side == "no-fanout":
                out = generate(model, [p for p in ids for _ in range(K)], num_samples=1, **kw)
            else:
                out = generate(model, ids, num_samples=K, compile=args.side == "compiled", **kw)
            assert sum(len(s) == new for ss in out for s in ss) == P * K

    baseline = setup_done(device, model)
    if args.side == "compiled" or not args.quick:
        t0 = time.perf_counter()
        fn()  # compiles the decode step when compiled
        extra["first_s"] = time.perf_counter() - t0
    times, cpu_times = [], []
    for _ in range(args.repeats):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    out = dict(side=args.side, threads=torch.get_num_threads(), times=times, cpu_times=cpu_times)
    print(json.dumps({**out, "peak_gib": peak_memory_gib(device), "baseline_gib": baseline, **extra}), flush=True)


def hf_checkpoint_fn(hf_dir: Path, prompts: list[dict], args, device, dtype):
    """-> (the timed call, the model, whether transformers' apply_chat_template gives our prompt ids)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    theirs = [
        tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True, tokenize=True, return_dict=False)
        for p in prompts
    ]
    same_ids = theirs == [p["ids"] for p in prompts]
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, attn_implementation="sdpa").to(device).eval()
    P, L, K, new = len(theirs), max(len(p) for p in theirs), args.samples, args.new
    ids = torch.full((P, L), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(P, L, dtype=torch.long)
    for i, p in enumerate(theirs):
        ids[i, L - len(p) :], mask[i, L - len(p) :] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    torch.manual_seed(0)

    def fn():
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature, top_k=0,
                top_p=args.top_p, num_return_sequences=K, max_new_tokens=new, min_new_tokens=new,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        assert out.shape == (P * K, L + new)

    return fn, hf, same_ids


def bench_checkpoint(args, device, dtype) -> str:
    """The methods on --checkpoint, each in its own process -> the markdown table (printed)."""
    config = checkpoint_config(args.checkpoint)
    chat = our_chat(args.checkpoint)
    messages = [[{"role": "user", "content": r["prompt"]}] for r in make_records(args.prompts, seed=0)]
    prompts = [{"messages": m, "ids": chat.encode_dialog(m, add_generation_prompt=True).tokens} for m in messages]
    lengths = [len(p["ids"]) for p in prompts]
    chosen = args.methods or ["fanout"] + ["compiled"] * args.compile + ["no-fanout", "naive"] * (not args.quick)
    chosen += ["hf"] * (not args.methods)
    with tempfile.TemporaryDirectory() as workdir:
        (Path(workdir) / "prompts.json").write_text(json.dumps(prompts))
        if "hf" in chosen:
            export_hf(args.checkpoint, Path(workdir) / "hf")
        results = {m: run_child(__file__, m, args, workdir, CHECKPOINT_OPTIONS) for m in chosen}
    P, K, new = args.prompts, args.samples, args.new
    mem = "peak allocated (GiB)" if device.type == "cuda" else "peak RSS (GiB)"
    lines = [
        f"\n### {args.checkpoint}: {model_params(config) / 1e6:.1f}M params, vocab {config.vocab_size}, {P} prompts x "
        f"{K} samples, prompt {min(lengths)}-{max(lengths)} tokens (its chat template), {new} new tokens, temperature "
        f"{args.temperature}, top-p {args.top_p}, {str(dtype).removeprefix('torch.')}",
        "",
        f"| method | time (s) | samples/s | generated tokens/s | vs fan-out | {mem} | growth over setup (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    ref = min(results[chosen[0]]["times"])
    summary = []
    for method, r in results.items():
        t = min(r["times"])
        summary.append(
            dict(
                side=LABELS[method], peer=method == "hf", time_s=t, throughput=P * K / t, unit="samples/s",
                tokens_per_s=P * K * new / t, peak_gib=r["peak_gib"], growth_gib=r["peak_gib"] - r["baseline_gib"],
            )
        )  # fmt: skip
        label = LABELS[method]
        if method == "compiled":
            label += f" (compile + first call {r['first_s']:.1f} s, untimed)"
        lines.append(
            f"| {label} | {t:.3f} | {P * K / t:,.1f} | {P * K * new / t:,.0f} | {t / ref:.2f}x | {r['peak_gib']:.2f} "
            f"| {r['peak_gib'] - r['baseline_gib']:.2f} |"
        )
    per_wall = ", ".join(f"{m} {sum(r['cpu_times']) / sum(r['times']):.2f}" for m, r in results.items())
    threads = ", ".join(f"{m} {r['threads']}" for m, r in results.items())
    lines += [
        "",
        f"time: the best of {args.repeats} calls{' after one untimed call' if not args.quick else ''}, each method in "
        f"its own process (peak memory its own; growth: over the peak after the model was loaded and read). torch "
        f"threads: {threads}; CPU time / wall time over the timed calls: {per_wall}.",
    ]
    if "hf" in results:
        same = "yes" if results["hf"]["same_ids"] else "NO"
        lines.append(f"same prompt ids (transformers' apply_chat_template == our chat format): {same}")
    lines += ["", f"load average at end (1, 5, 15 min): {_load()}"]
    print("\n".join(lines), flush=True)
    append_summary(args.summary, f"generate, {P} prompts x {K} samples x {new} tokens", summary)
    return "\n".join(lines)


def _hardware(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


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
    add_checkpoint_argument(ap)
    add_summary_argument(ap)
    ap.add_argument("--temperature", type=float, default=1.0, help="--checkpoint: the sampling temperature, both sides")
    ap.add_argument("--top-p", type=float, default=1.0, help="--checkpoint: nucleus sampling's p, both sides")
    ap.add_argument("--threads", type=int, default=None, help="--checkpoint: torch.set_num_threads in each process")
    ap.add_argument("--side", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return checkpoint_side(args)
    if args.summary and not args.checkpoint:
        ap.error("--summary is written for --checkpoint runs only")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.checkpoint:
        header = (
            f"## generate benchmark on a real model, {datetime.date.today()}\n\ndevice: {_hardware(device)}; torch "
            f"{torch.__version__}\ncommand: python experiments/bench/generate.py {' '.join(sys.argv[1:])}\n"
            f"load average at start (1, 5, 15 min): {_load()}"
        )
        print(header, flush=True)
        text = header + "\n" + bench_checkpoint(args, device, dtype)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n\n")
        return
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
