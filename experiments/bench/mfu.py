"""Each training step's share of this CPU's limit: MFU, for our side of the SFT, RM and DPO step benchmarks.

For each benchmark (sft_step.py, rm_step.py, dpo_step.py with a live reference and with a precomputed one) its
own `ours` child runs (the same tiny Llama 3, data, options and timed step as the benchmark; TRL is not run),
with common.py's timed steps wrapped to also measure, in the same process and with the same threads:

  model FLOPs   llama_posttrain/train/flops.py step_flops_parts of every timed step: the trunk's matmuls on
                real tokens, attention over the attended (query, key) pairs, the head at its positions (LM:
                the listed targets; RM: every position), x3 for forward + backward, + a live reference's
                forward. What the trainer logs as MFU's numerator on a GPU.
  executed      what the CPU step runs (`executed_flops`): the trunk on every position (pads too), every
                (query, key) score of the model's segments (llama_posttrain/llama/segments.py: one SDPA per batch
                of similar-length documents, each document's L x L grid whole, masked pairs and a short
                document's padded tail too; its flash backward recomputes the scores: 5 matmuls), the chunked
                LM head's 4 matmuls (forward, recomputed logits, grad of the hidden states, grad of the weight).
  profiler      one more step (--profile-steps) under torch.profiler(with_flops=True, record_shapes=True):
                its FLOP count (aten::mm/addmm/bmm and elementwise mul/add; not SDPA, not addmm_), and
                common.py's attribution of every op's self time to where it ran, split by op kind.
  machine rate  a 2048^3 fp32 torch.mm (median of 5), before and after the timed steps; also the rate of
                one trunk-shaped and one head-shaped matmul (what a GEMM of these shapes can reach here).
  MFU           model FLOPs / (step time x the 2048^3 rate, the faster of the two), over the timed steps.
  padding       computed scores (the dense mask's B x T x T per micro-batch, the segments' Segments.scores())
                against attended pairs, and attention's forward + backward on the step's real shapes and masks:
                segments (attention_mask(kind="segments"), as the model runs it) against the dense mask (kind=
                "dense", the reference form: one SDPA over whole rows, every score computed).

    python experiments/bench/mfu.py --out experiments/bench/results/mfu.md
    python experiments/bench/mfu.py --benches dpo --warmup 1 --steps 2      # quicker
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# name -> (benchmark script, the options its child gets beyond the common ones)
BENCHES = {
    "sft": ("sft_step", []),
    "rm": ("rm_step", []),
    "dpo": ("dpo_step", ["--reference", "live"]),
    "dpo-precomputed": ("dpo_step", ["--reference", "precompute"]),
}
LABELS = {
    "sft": "SFT",
    "rm": "RM (one row)",
    "dpo": "DPO, live reference",
    "dpo-precomputed": "DPO, precomputed reference",
}
PARTS = ("trunk matmuls", "attention", "head", "reference forward")


# ----------------------------------------------------------------------------- counting


def executed_scores(mb) -> int:
    """The (query, key) scores per head and layer the CPU model computes on a micro-batch: its attention mask's
    Segments.scores() (each batch's n x L x L: masked pairs and a short document's padded tail too), or, for plain
    causal rows (no ids: SDPA's causal kernel over whole rows), B x T x T, counted whole as scores() counts a
    causal batch."""
    from llama_posttrain.llama.model import attention_mask

    seg = attention_mask(mb.doc_ids, mb.branch_ids, kind="segments")
    return mb.tokens.numel() * mb.tokens.shape[1] if seg is None else seg.scores()


def executed_flops(config, head: str, micro_batches, reference_forward: bool) -> dict[str, int]:
    """The FLOPs our CPU step executes, by the parts of step_flops_parts: the trunk's matmuls on every position
    (pads too), x3; attention over every score the model's segments compute (`executed_scores`): forward QK^T and
    PV (4 n_heads head_dim per score), flash backward 5 matmuls (recomputed QK^T, dV, dP, dQ, dK: 10); the LM head
    chunked (llama_posttrain/kernels/chunked.py): 4 matmuls per listed target (forward, the backward's recomputed
    logits, grad of the hidden states, grad of the weight), the reward head 3 on every position; a live
    reference's forward (trunk, the same segments' attention, LM head) once."""
    from llama_posttrain.llama.heads import HEADS, get_head

    c, head = config, get_head(head)
    block = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.ffn_dim
    width = c.n_heads * c.head_dim
    passes = 4 if head is HEADS["lm"] else 3
    out = dict.fromkeys(PARTS, 0)
    for mb in micro_batches:
        B, T = mb.tokens.shape
        matmuls = 2 * c.n_layers * block * B * T
        scores = c.n_layers * width * executed_scores(mb)
        out["trunk matmuls"] += 3 * matmuls
        out["attention"] += 14 * scores
        out["head"] += passes * head.flops(c, B * T, mb.target_token.numel())
        if reference_forward:
            out["reference forward"] += matmuls + 4 * scores + HEADS["lm"].flops(c, B * T, mb.target_token.numel())
    return out


def addmm_flops(config, head: str, micro_batches, reference_forward: bool) -> dict[str, int]:
    """Of executed_flops, what runs as aten::addmm_, which the profiler has no formula for: the LM head's weight
    gradient of every row chunk after a micro-batch's first (chunked.py: the first writes each block's gradient
    with aten::mm; later ones, past MAX_ROWS targets, add to it)."""
    from llama_posttrain.kernels.chunked import MAX_ROWS

    out = dict.fromkeys(PARTS, 0)
    if head == "lm":
        c = config
        out["head"] = sum(2 * max(0, mb.target_token.numel() - MAX_ROWS) * c.vocab_size * c.dim for mb in micro_batches)
    return out


def head_block(micro_batches, config) -> tuple[int, int]:
    """(rows, vocabulary columns) of one block of the chunked LM head on the first micro-batch's targets."""
    from llama_posttrain.kernels.chunked import _blocks

    n = max(1, micro_batches[0].target_token.numel())
    return _blocks(n, config.vocab_size, torch.device("cpu"), None, None)


def mm_rate(m: int, k: int, n: int, repeats: int = 5) -> float:
    """FLOP/s of an fp32 (m, k) @ (k, n) torch.mm here: the median of `repeats` after one untimed."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times)


# ----------------------------------------------------------------------------- attention over padding


def attention_variants(config, micro_batches, repeats: int = 3) -> dict:
    """One layer's attention forward + backward on these micro-batches' shapes and masks (random q, k, v laid out
    as the model's, (B, T, heads, head_dim) underneath): segments, attention_mask(kind="segments") as
    llama.model.attend runs it on the CPU, against the dense mask (kind="dense", the reference form: one SDPA over
    whole rows). -> seconds per step for all layers (medians, the two alternated), the SDPA calls of the segments
    (batches), and the largest difference of the segments' outputs from the dense ones on real tokens."""
    g = torch.Generator().manual_seed(0)
    runs = [_attention_pair(config, mb, g, repeats) for mb in micro_batches]
    return {
        "dense_s": config.n_layers * sum(r[0] for r in runs),
        "segments_s": config.n_layers * sum(r[1] for r in runs),
        "max_diff": max(r[2] for r in runs),
        "identical": all(r[3] for r in runs),
        "batches": sum(r[4] for r in runs),
    }


def _attention_pair(c, mb, g, repeats: int) -> tuple[float, float, float, bool, int]:
    """attention_variants on one micro-batch: (dense s, segments s, largest difference, bit-identical, batches)."""
    from llama_posttrain.llama.model import attend, attention_mask

    B, T = mb.tokens.shape
    q = torch.randn(B, T, c.n_heads, c.head_dim, generator=g).requires_grad_()
    k = torch.randn(B, T, c.n_kv_heads, c.head_dim, generator=g).requires_grad_()
    v = torch.randn(B, T, c.n_kv_heads, c.head_dim, generator=g).requires_grad_()
    grad = torch.randn(B, c.n_heads, T, c.head_dim, generator=g)
    masks = {kind: attention_mask(mb.doc_ids, mb.branch_ids, kind=kind) for kind in ("dense", "segments")}
    seg = masks["segments"]  # None for plain causal rows: both are SDPA's causal kernel, one call

    def run(kind):
        y = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), masks[kind])
        (y * grad).sum().backward()
        return y.detach()

    real = torch.ones(B, T, dtype=torch.bool) if mb.doc_ids is None else mb.doc_ids >= 0
    real = real[:, None, :, None].expand(B, c.n_heads, T, c.head_dim)
    times: dict = {"dense": [], "segments": []}
    outputs = {}
    for _ in range(repeats):
        for kind in times:
            q.grad = k.grad = v.grad = None
            t0 = time.perf_counter()
            outputs[kind] = run(kind)
            times[kind].append(time.perf_counter() - t0)
    y_dense, y_seg = outputs["dense"][real], outputs["segments"][real]
    diff = float((y_seg - y_dense).abs().max()) if y_dense.numel() else 0.0
    return (
        statistics.median(times["dense"]), statistics.median(times["segments"]), diff, torch.equal(y_seg, y_dense),
        1 if seg is None else len(seg.batches),
    )  # fmt: skip


# ----------------------------------------------------------------------------- the child


class Recorder:
    """The loader's steps, in order, remembered; a new epoch when one ends."""

    def __init__(self, loader):
        self.loader, self.it, self.seen = loader, None, []

    def __iter__(self):
        return self

    def __next__(self):
        if self.it is None:
            self.it = iter(self.loader)
        try:
            step = next(self.it)
        except StopIteration:
            self.it = iter(self.loader)
            step = next(self.it)
        self.seen.append(step)
        return step


def child(name: str, rest: list[str]) -> None:
    """The benchmark's `ours` child (its own argument parsing and setup), with common.time_our_steps wrapped to
    measure; prints one JSON line {"mfu": ...}."""
    import common
    from torch.profiler import ProfilerActivity, profile

    from llama_posttrain.llama import Transformer
    from llama_posttrain.train.flops import attended_keys, step_flops_parts

    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--profile-steps", type=int, required=True)
    known, rest = ap.parse_known_args(rest)
    known.warmup = int(rest[rest.index("--warmup") + 1])
    timed_steps = common.time_our_steps
    result: dict = {}

    def measured(objective, loader, params, optimizer, device, n, **options):
        if device.type != "cpu":
            raise SystemExit("mfu.py measures the CPU (--device cpu)")
        steps = Recorder(loader)
        rates = [mm_rate(2048, 2048, 2048)]
        r = timed_steps(objective, steps, params, optimizer, device, n, **options)
        rates.append(mm_rate(2048, 2048, 2048))
        first = params[0]
        model = next(o for o in gc.get_objects() if type(o) is Transformer and next(o.parameters()) is first)
        c, head, ref = model.config, model.head, objective.reference_forward
        timed = steps.seen[known.warmup : n]
        model_parts = [step_flops_parts(c, head, s.micro_batches, ref) for s in timed]
        executed = [executed_flops(c, head, s.micro_batches, ref) for s in timed]
        computed = [sum(mb.tokens.numel() * mb.tokens.shape[1] for mb in s.micro_batches) for s in timed]
        segment_scores = [sum(executed_scores(mb) for mb in s.micro_batches) for s in timed]
        attended = [sum(attended_keys(mb.doc_ids, mb.branch_ids) for mb in s.micro_batches) for s in timed]

        # the profiled steps: after the timed ones, with common.py's scopes
        common._patch_scopes()
        common._scope_modules()
        prof = profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True)
        k = known.profile_steps
        before = len(steps.seen)
        t0 = time.perf_counter_ns()
        with prof:
            timed_steps(objective, steps, params, optimizer, device, k, **options)
        window = time.perf_counter_ns() - t0
        profiled = steps.seen[before:]
        attribution = common._attribute(prof.profiler.kineto_results.experimental_event_tree(), window, k)
        averages = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)
        top_ops = [(a.key, a.self_cpu_time_total / 1e6 / k, a.count // k) for a in averages[:8]]
        profiler_flops: dict[str, float] = {}
        for e in prof.events():
            if e.flops:
                profiler_flops[e.name] = profiler_flops.get(e.name, 0) + e.flops / k

        def per_profiled_step(count):  # a count's parts, the mean over the profiled steps
            return {p: sum(count(c, head, s.micro_batches, ref)[p] for s in profiled) / k for p in PARTS}

        first_mbs = timed[0].micro_batches
        result.update(
            name=name,
            threads=torch.get_num_threads(),
            config=dict(
                dim=c.dim, layers=c.n_layers, heads=c.n_heads, kv_heads=c.n_kv_heads, ffn=c.ffn_dim, vocab=c.vocab_size
            ),
            head=head,  # the head's name (Transformer.head)
            reference_forward=bool(ref),
            times=r["times"][known.warmup :],
            cpu_times=r["cpu_times"][known.warmup :],
            tokens=r["tokens"][known.warmup :],
            padded=r["padded"][known.warmup :],
            targets=[sum(mb.target_token.numel() for mb in s.micro_batches) for s in timed],
            shapes=sorted({tuple(mb.tokens.shape) for s in timed for mb in s.micro_batches}),
            model=model_parts,
            executed=executed,
            computed_scores=computed,
            segment_scores=segment_scores,
            attended_pairs=attended,
            rate_2048=rates,
            rate_trunk=mm_rate(8192, c.dim, c.ffn_dim),
            rate_head=mm_rate(head_block(first_mbs, c)[0], c.dim, head_block(first_mbs, c)[1]),
            head_block=head_block(first_mbs, c),
            profile=dict(
                steps=k,
                window_s=window / 1e9 / k,
                top_ops=top_ops,
                ops=attribution["ops"],
                profiler_flops=profiler_flops,
                model=per_profiled_step(step_flops_parts),
                executed=per_profiled_step(executed_flops),
                addmm_=per_profiled_step(addmm_flops),
            ),
            attention=attention_variants(c, first_mbs),
            attention_shapes=[tuple(mb.tokens.shape) for mb in first_mbs],
            load=os.getloadavg()[0],
        )
        return r

    common.time_our_steps = measured
    script = str(HERE / f"{BENCHES[name][0]}.py")
    sys.argv = [script, "--side", "ours", *rest]
    runpy.run_path(script, run_name="__main__")
    print(json.dumps({"mfu": result}), flush=True)


# ----------------------------------------------------------------------------- the parent


def prepare(name: str, args, workdir: Path) -> None:
    """The model and data the benchmark's parent writes for its children (its main())."""
    import common

    from llama_posttrain.llama import Transformer, save_model

    script = BENCHES[name][0]
    config = common.model_config(args)
    torch.manual_seed(0)
    if script == "rm_step":
        from rm_step import make_ranked

        save_model(Transformer(config, head="reward"), workdir / "model", format="hf")
        common.write_jsonl(workdir / "ranked.jsonl", make_ranked(args.records, 4, seed=0))
    elif script == "sft_step":
        from sft_step import make_dialogs

        save_model(Transformer(config), workdir / "model", format="hf")
        common.write_jsonl(workdir / "dialogs.jsonl", make_dialogs(args.records, seed=0))
    else:
        save_model(Transformer(config), workdir / "model", format="hf")
        common.write_jsonl(workdir / "pairs.jsonl", common.make_records(args.records, seed=0))


def run_bench(name: str, args) -> dict:
    with tempfile.TemporaryDirectory() as workdir:
        prepare(name, args, Path(workdir))
        options = ["--warmup", str(args.warmup), "--steps", str(args.steps), "--dim", str(args.dim)]
        options += ["--layers", str(args.layers), "--workdir", workdir, "--device", "cpu"]
        options += ["--profile-steps", str(args.profile_steps)]
        if args.threads:
            options += ["--threads", str(args.threads)]
        cmd = [sys.executable, __file__, "--child", name, *options, *BENCHES[name][1]]
        from common import child_json

        return child_json(cmd, name, "mfu")["mfu"]


def g(x: float) -> str:
    return f"{x / 1e9:,.2f}"


# the profile's classes, from common.py's components and op kinds (`op_class`)
TRUNK_MM, SDPA, HEAD_MM, AUTOGRAD, PYTHON = (
    "trunk matmuls (QKV, out, MLP)",
    "attention (SDPA)",
    "head matmuls (LM: log-probs, chunked; RM: score)",
    "framework: autograd engine and nodes",
    "framework: Python (loop, module calls, hooks)",
)
CLASSES = [
    TRUNK_MM,
    SDPA,
    "attention mask",
    "attention, other ops (RoPE, GQA reshapes)",
    "MLP, other ops (SiLU, gating)",
    "norms, embedding, RoPE tables",
    HEAD_MM,
    "head, other ops (logsumexp, exp, scatter)",
    "loss, indexing, other ops",
    "optimizer (clip, AdamW, zero_grad)",
    "data (collate, batching)",
    AUTOGRAD,
    PYTHON,
]


def op_class(component: str, kind: str) -> str:
    """common.py's (component, op kind) -> a row of the profile table (CLASSES)."""
    import common

    if component in (common.OPTIMIZER, common.DATA):
        return component
    if component == common.MASK:
        return "attention mask"
    if component.startswith("Python outside ops") or kind == "python":
        return PYTHON
    if kind == "autograd":
        return AUTOGRAD
    if kind == "attention kernel":
        return SDPA
    if component == common.HEAD:
        return HEAD_MM if kind == "matmul" else "head, other ops (logsumexp, exp, scatter)"
    if component in (common.ATTN_PROJ, "MLP") and kind == "matmul":
        return TRUNK_MM
    if component in (common.ATTN_PROJ, "attention core (RoPE, SDPA)"):
        return "attention, other ops (RoPE, GQA reshapes)"
    if component == "MLP":
        return "MLP, other ops (SiLU, gating)"
    if component == "norms, embedding, RoPE tables":
        return component
    return "loss, indexing, other ops"


def tables(results: dict[str, dict], args, load_before: float) -> list[str]:
    first = next(iter(results.values()))
    cfg = first["config"]
    argv = " ".join(sys.argv[1:])
    out = [
        f"## MFU on the CPU, {datetime.date.today()}",
        "",
        f"command: python experiments/bench/mfu.py {argv}".rstrip(),
        "",
        f"CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, {first['threads']} threads; "
        f"1-minute load average before: {load_before:.2f}, after each benchmark: "
        + ", ".join(f"{n} {r['load']:.2f}" for n, r in results.items())
        + f". Model: dim {cfg['dim']}, {cfg['layers']} layers, {cfg['heads']} heads / {cfg['kv_heads']} kv, ffn "
        f"{cfg['ffn']}, vocab {cfg['vocab']}, float32; each benchmark's own data and step, median of {args.steps} "
        f"timed steps after {args.warmup} warm-up step(s).",
        "",
        "machine rate: fp32 torch.mm 2048^3 in each child, before and after its timed steps (GFLOP/s): "
        + "; ".join(f"{n} " + " / ".join(f"{x / 1e9:.1f}" for x in r["rate_2048"]) for n, r in results.items())
        + "; each benchmark's MFU is over its own child's faster one (the less disturbed). A trunk-shaped matmul "
        f"(8192 x {cfg['dim']} @ "
        f"{cfg['dim']} x {cfg['ffn']}) reaches "
        + ", ".join(f"{r['rate_trunk'] / 1e9:.1f}" for r in results.values())
        + f"; a head-shaped one (a block of the chunked head: rows x {cfg['dim']} @ {cfg['dim']} x columns) "
        + ", ".join(
            f"{r['rate_head'] / 1e9:.1f} ({r['head_block'][0]} x {r['head_block'][1]})" for r in results.values()
        )
        + " GFLOP/s.",
        "",
        "### MFU: model FLOPs / (step time x machine rate)",
        "",
        "| benchmark | median step (s) | CPU s / wall s | machine rate (GFLOP/s) | tokens / positions per step "
        "| model GFLOP/step: trunk / "
        "attention / head / reference = total | MFU | executed GFLOP/step (the CPU's work) | executed / (time x rate) "
        "| profiler's GFLOP/step (matmuls + elementwise) | profiler / model | profiler's matmuls / executed's that "
        "it counts | matmuls by shape / executed's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    starved = []
    for name, r in results.items():
        rate = max(r["rate_2048"])  # the less disturbed of the two: the machine's limit
        model = {p: statistics.mean(m[p] for m in r["model"]) for p in PARTS}
        executed = {p: statistics.mean(m[p] for m in r["executed"]) for p in PARTS}
        total_t = sum(r["times"])
        mfu = sum(sum(m.values()) for m in r["model"]) / total_t / rate
        hfu = sum(sum(m.values()) for m in r["executed"]) / total_t / rate
        pf = r["profile"]
        prof_total = sum(pf["profiler_flops"].values())
        prof_mm = sum(v for k, v in pf["profiler_flops"].items() if k in ("aten::mm", "aten::addmm", "aten::bmm"))
        # the executed matmuls outside SDPA (the reference's scores, 4 of the policy's 14, are in its part)
        sdpa = pf["executed"]["attention"] * (1 + 4 / 14 * r["reference_forward"])
        by_shape = sum(x[4] for x in pf["ops"])
        outside = sum(pf["executed"].values()) - sdpa
        # of those, what the profiler has no formula for: the LM head's weight gradient past a first row chunk
        uncounted = pf["addmm_"]["head"]
        cpu = sum(r["cpu_times"]) / total_t
        if cpu < 0.8 * r["threads"]:
            starved.append(LABELS[name])
        out.append(
            f"| {LABELS[name]} | {statistics.median(r['times']):.3f} | {cpu:.2f} | {rate / 1e9:.1f} | "
            f"{statistics.mean(r['tokens']):,.0f} / {statistics.mean(r['padded']):,.0f} | "
            + " / ".join(g(model[p]) for p in PARTS)
            + f" = {g(sum(model.values()))} | **{mfu:.1%}** | {g(sum(executed.values()))} | {hfu:.1%} | "
            f"{g(prof_total)} | {prof_total / sum(pf['model'].values()):.2f} | {prof_mm / (outside - uncounted):.3f} | "
            f"{by_shape / outside:.3f} |"
        )
    if starved:
        out += [
            "",
            f"**warning: {', '.join(starved)} got well under {first['threads']} cores of CPU time per wall second: "
            "other work shared the machine, so those step times (and their MFU) are off; rerun on an idle machine.**",
        ]
    out += [
        "",
        "model FLOPs: llama_posttrain/train/flops.py step_flops_parts (what the trainer logs as MFU's numerator): "
        "trunk matmuls on real tokens, attention over attended pairs, the head at its positions, x3, + a live "
        "reference's forward. executed: `executed_flops` in this script (pads, every score of the model's segments: "
        "each batch's documents' L x L grids whole, masked pairs and padded tails too; flash backward's "
        "recomputed scores, the chunked head's recomputed logits). The profiler's count (torch.profiler "
        "with_flops=True on the profiled steps) has formulas for aten::mm/addmm/bmm and elementwise mul/add only: "
        "it leaves out SDPA (the CPU flash kernel) and the head's weight gradient (aten::addmm_), and adds the "
        "elementwise ops; per op (GFLOP/step): "
        + "; ".join(
            f"{n} " + ", ".join(f"{k} {g(v)}" for k, v in sorted(r["profile"]["profiler_flops"].items()))
            for n, r in results.items()
        )
        + ".",
        "",
    ]

    # the profile: where the step goes
    out += [
        "### where the step goes (profiled steps; time per step, share, and the matmuls' achieved rate)",
        "",
        "torch.profiler (CPU, record_shapes) over the profiled step(s) after the timed ones; every op's self time "
        "by where it ran (common.py's attribution: modules, the head, the mask, optimizer, data; a backward op goes "
        "to the forward op that made its autograd node) and by kind (matmul ops, SDPA, the autograd engine's and "
        "nodes' own time, other ops); framework Python: the steps' wall time outside any op plus each scope's own "
        "time between its ops (the loop, module calls, hooks: the profiler's own hooks inflate it). The profiler "
        "slows small ops: read shares. GFLOP/s: the matmul ops' FLOPs "
        "from their recorded shapes (aten::addmm_ included) over their time; attention: the executed count's "
        "segment scores over SDPA's time.",
        "",
    ]
    names = list(results)
    head = "| class | " + " | ".join(f"{LABELS[n]}: s/step, share, GFLOP/s" for n in names) + " |"
    out += [head, "|---|" + "---:|" * len(names)]
    cells: dict[str, dict[str, str]] = {c: {} for c in CLASSES}
    totals = {}
    for n, r in results.items():
        pf = r["profile"]
        by: dict[str, list[float]] = {}
        for comp, _phase, kind, s, f in pf["ops"]:
            cls = op_class(comp, kind)
            by.setdefault(cls, [0.0, 0.0])
            by[cls][0] += s
            by[cls][1] += f
        by.setdefault(SDPA, [0.0, 0.0])[1] = pf["executed"]["attention"]
        total = sum(v[0] for v in by.values())
        totals[n] = total
        for cls in CLASSES:
            s, f = by.get(cls, (0.0, 0.0))
            rate_s = f" {f / s / 1e9:,.1f}" if f and s else ""
            cells[cls][n] = f"{s:.3f}, {s / total:.0%}{',' if rate_s else ''}{rate_s}"
    for cls in CLASSES:
        out.append(f"| {cls} | " + " | ".join(cells[cls][n] for n in names) + " |")
    out.append("| **step (profiled)** | " + " | ".join(f"**{totals[n]:.3f}**" for n in names) + " |")
    out.append(
        "| profiled wall time per step (s) | "
        + " | ".join(f"{results[n]['profile']['window_s']:.3f}" for n in names)
        + " |"
    )
    out += ["", "largest ops by self time (s/step, calls/step):", ""]
    for n in names:
        ops = results[n]["profile"]["top_ops"]
        out.append(f"- {LABELS[n]}: " + ", ".join(f"{name} {t:.3f} ({c})" for name, t, c in ops))
    out += [
        "",
        "### attention over padding and masked pairs",
        "",
        "On the CPU the model gathers each micro-batch's documents into padded batches of similar length and runs "
        'one SDPA per batch (llama_posttrain/llama/segments.py; attention_mask(kind="segments")): every score '
        "of a batch's documents' L x L grids is computed (later tokens, the other response, a short document's "
        'padded tail). The dense mask (B, 1, T, T; kind="dense", the reference form) computes every score of a '
        "row, masked or not (other documents of the row, pads too). Scores per step and layer: the dense mask's "
        "B x T x T, the segments' Segments.scores(); attended: the pairs the row rule lets attend "
        "(flops.attended_keys); wasted: the share of the segments' scores not attended. dense / segments: one "
        "layer's attend forward + backward on the first timed step's micro-batches (random q, k, v of the real "
        "shapes, the real masks), x layers, median of 3 alternated; batches: the segments' SDPA calls per layer.",
        "",
        "| benchmark | micro-batch shapes (B x T) | dense mask's scores / step | segments' scores / step | "
        "attended pairs / step | segments' wasted share | SDPA time share of the step (profiled) | "
        "dense SDPA fwd+bwd (s) | segments fwd+bwd (s) | batches | speed-up | largest difference (real tokens) | "
        "bit-identical |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, r in results.items():
        a = r["attention"]
        computed, attended = statistics.mean(r["computed_scores"]), statistics.mean(r["attended_pairs"])
        segment = statistics.mean(r["segment_scores"])
        sdpa = sum(s for comp, _p, kind, s, _f in r["profile"]["ops"] if kind == "attention kernel")
        shapes = ", ".join(f"{b}x{t}" for b, t in r["attention_shapes"])
        out.append(
            f"| {LABELS[n]} | {shapes} | {computed:,.0f} | {segment:,.0f} | {attended:,.0f} | "
            f"{1 - attended / segment:.0%} | {sdpa / totals[n]:.0%} | {a['dense_s']:.3f} | {a['segments_s']:.3f} | "
            f"{a['batches']} | {a['dense_s'] / a['segments_s']:.2f}x | {a['max_diff']:.1e} | "
            f"{'yes' if a['identical'] else 'no'} |"
        )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benches", nargs="+", choices=tuple(BENCHES), default=list(BENCHES))
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--profile-steps", type=int, default=1, help="profiled steps after the timed ones")
    ap.add_argument("--records", type=int, default=64, help="the data set of each benchmark (its default)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the children")
    ap.add_argument("--out", help="write the tables to this markdown file (replacing it)")
    ap.add_argument("--json", help="also write {benchmark: MFU} to this file (run_all.py's table)")
    args = ap.parse_args()
    if args.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the first step pays one-time costs)")
    load_before = os.getloadavg()[0]
    results = {name: run_bench(name, args) for name in args.benches}
    text = "\n".join(tables(results, args, load_before))
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    if args.json:
        mfu = {
            n: sum(sum(m.values()) for m in r["model"]) / sum(r["times"]) / max(r["rate_2048"])
            for n, r in results.items()
        }
        Path(args.json).write_text(json.dumps(mfu), encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3:])
    else:
        main()
