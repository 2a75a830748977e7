"""Will it fit? The per-rank memory of a training config, before it runs.

    python -m llama_posttrain.driver.plan --config experiments/llama3.1-8b/sft.yaml --nproc 8 --gpu-gib 80 --preset llama3.1-8b

Reads the config with the entry point's own loader (SFT, RM or DPO: from its sections, else its file
name, else --kind) and the model's shape from model.checkpoint's config.json, model.preset or --preset
(a checkpoint that is not there yet). Bytes per rank, written out from what the code allocates:

- parameters, gradients, AdamW's two states: fp32, sharded over `train.shard_degree` ranks (0: all);
  in CPU memory with `train.cpu_offload`.
- gathered (FSDP2): two blocks in the compute dtype (current and prefetched), in the backward a block's
  unsharded gradient and its fp32 reduce-scatter buffer; the root (embeddings, final norm, LM head),
  gathered for the whole step, and the LM head's unsharded gradient.
- the DPO reference (`dpo.reference: model`): sharded in the compute dtype, plus what its forward
  gathers; nothing with `precompute` (freed before training).
- activations of one micro-batch (tokens_per_microbatch // max_len rows of max_len tokens): per token
  and layer what autograd saves in eager mode (llama_posttrain/llama/model.py), plus a block's backward working memory;
  with activation checkpointing each layer keeps its input and one layer is recomputed.
- the log-prob chunk (kernels/): torch (64 MiB fp32 logits per chunk, the fp32 dW accumulator) or
  Triton (<= 1 GiB of d logits, the fp32 dH); every token a target.

The total is the largest of three moments: the start of a backward, a live reference's forward, the
root's gradient reduce at the end of a backward. The verdict leaves a margin (default 10%) for the CUDA
context, NCCL buffers and fragmentation. experiments/bench/plan_check.py checks it against CPU runs.

A pipeline config (llama_posttrain/driver/pipeline.py; its key=value overrides after it) is planned stage by
stage, as its recipe starts each training run: the pre-training (without `base`), then the RM, SFT and
DPO of every round, each from its stage config file with the pipeline's overrides (`rm:`, `sft:`, ...)
and each variant's; the model's shape from `base` (else `preset`); `--nproc` defaults to its nproc x
nnodes. One table, a verdict per stage, the full estimate of each stage that does not fit.

Exit status: 0 everything fits, 3 (NOT_FIT) something does not, 2 a bad config or option.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from llama_posttrain.driver.memory import GIB, Setting, estimate, fits, param_counts, suggest
from llama_posttrain.train.config import read_yaml

KINDS = ("sft", "rm", "dpo")
NOT_FIT = 3  # the exit status when a plan does not fit (2: a bad config or option, as argparse's)


def detect_kind(path: str | None, overrides: list[str]) -> str:
    """The config's entry point: a `dpo:`/`rm:`/`sft:` section (or override), else the file name's words."""
    raw = (read_yaml(path) if path and Path(path).is_file() else None) or {}
    sections = set(raw if isinstance(raw, dict) else {}) | {o.split("=", 1)[0].split(".", 1)[0] for o in overrides}
    words = set(re.split(r"[^a-z0-9]+", Path(path).stem.lower())) if path else set()
    for found in (sections, words):
        kinds = [k for k in KINDS if k in found]
        if len(kinds) == 1:
            return kinds[0]
    raise ValueError(f"{path}: cannot tell whether this is an SFT, RM or DPO config: give --kind sft|rm|dpo")


def config_class(kind: str):
    """The entry point's config dataclass: llama_posttrain/train/sft.py SFTConfig, rm.py RMConfig, dpo.py DPOConfig."""
    return getattr(
        importlib.import_module(f"llama_posttrain.train.{kind}"),
        {"sft": "SFTConfig", "rm": "RMConfig", "dpo": "DPOConfig"}[kind],
    )


def setting_from_config(cfg, kind: str, nproc: int, device: str = "cuda", preset: str | None = None) -> Setting:
    """The model's shape from `preset`, else model.checkpoint's config.json (llama_posttrain/llama/checkpoint.py read_config),
    else model.preset; the rest from the config's sections, as the entry point would run it on `device`."""
    from llama_posttrain.llama.checkpoint import read_config
    from llama_posttrain.llama.config import get_preset

    ckpt, t = cfg.model.checkpoint, cfg.train
    if not preset and ckpt and not Path(ckpt).exists():
        raise ValueError(f"model.checkpoint {ckpt} not found: give --preset NAME for the model's shape")
    if not (preset or ckpt or cfg.model.preset):
        raise ValueError("give model.checkpoint or model.preset (or --preset)")
    model = get_preset(preset) if preset else read_config(ckpt)[0] if ckpt else get_preset(cfg.model.preset)
    bf16 = t.mixed_precision == "bf16" or (t.mixed_precision == "auto" and device == "cuda")
    kernels = t.kernels if t.kernels != "auto" else ("triton" if device == "cuda" else "torch")
    return Setting(
        model=model,
        kind=kind,
        nproc=nproc,
        shard_degree=t.shard_degree,
        cpu_offload=t.cpu_offload,
        device=device,
        compute_bytes=2 if bf16 else 4,
        activation_checkpointing=t.activation_checkpointing,
        tokens_per_microbatch=cfg.data.tokens_per_microbatch,
        max_len=cfg.data.max_len,
        reference=cfg.dpo.reference if kind == "dpo" else None,
        kernels=kernels,
    )


def is_pipeline_config(path) -> bool:
    """Whether `path` is a pipeline config: keys of llama_posttrain/driver/pipeline_config.py's PipelineConfig (rounds,
    base, task, ...) and none of a training config's own sections (model, data, train, ...)."""
    from llama_posttrain.driver.pipeline_config import PipelineConfig

    try:
        raw = read_yaml(path) if Path(path).is_file() else None
    except ValueError:
        return False  # the training config's loader names the problem
    if not isinstance(raw, dict):
        return False
    training = {f.name for kind in KINDS for f in dataclasses.fields(config_class(kind))}
    pipeline = {f.name for f in dataclasses.fields(PipelineConfig)} - training
    return bool(set(raw) & pipeline) and not set(raw) & (training - set(KINDS))


@dataclass(frozen=True)
class Stage:
    """One training run of a pipeline round, as its recipe starts it (llama_posttrain/driver/stage_jobs.py train)."""

    name: str  # pretrain, rm, sft, dpo; "dpo variant 1" where a stage has several
    kind: str
    config: Path  # the stage config file
    overrides: list[str]  # section.key=value: the pipeline's stage overrides, the recipe's model keys, the variant's
    preset: str | None  # the model's shape where no checkpoint gives it (no `base`: the pre-trained preset)


def pipeline_stages(cfg) -> list[Stage]:
    """The training runs of the pipeline config `cfg` (a PipelineConfig): the pre-training without `base`,
    then the RM, SFT and DPO of a round, every round alike (the same shape, the same settings)."""
    from llama_posttrain.driver.pipeline_config import ROOT
    from llama_posttrain.driver.stage_jobs import override_args
    from llama_posttrain.driver.stages import STAGE_KINDS, absolute

    if cfg.base is not None:
        model = {"model.checkpoint": absolute(cfg.base), "model.preset": None}
    else:
        model = {"model.checkpoint": None, "model.preset": cfg.preset}  # the pre-trained model's shape
    runs = [("pretrain", "sft", {**cfg.pretrain, **model, "sft.mask_prompt": False})] if cfg.base is None else []
    runs += [(kind, kind, {**getattr(cfg, kind), **model}) for kind in STAGE_KINDS]
    stages = []
    for name, kind, overrides in runs:
        variants = cfg.variants.get(name) or [{}]
        for v, extra in enumerate(variants):
            stages.append(
                Stage(
                    name + (f" variant {v}" if len(variants) > 1 else ""),
                    kind,
                    ROOT / cfg.configs[kind],
                    override_args({**overrides, **extra}),
                    None if cfg.base is not None else cfg.preset,
                )
            )
    return stages


def plan_pipeline(
    path,
    overrides: list[str],
    nproc: int | None,
    gpu_gib: float,
    device: str = "cuda",
    preset: str | None = None,
    margin: float = 0.10,
    gpus_per_node: int | None = None,
) -> tuple[str, bool]:
    """Every training stage of a pipeline config: one table (stage, config, model, ranks, micro-batch, peak,
    verdict), then the full report of each stage that does not fit. -> (the text, whether all fit)."""
    from llama_posttrain.driver.pipeline_config import PipelineError, load_pipeline_config
    from llama_posttrain.train.config import load_config

    try:
        cfg = load_pipeline_config(str(path), overrides)
    except PipelineError as e:
        raise ValueError(str(e)) from None
    nproc = nproc or cfg.nproc * cfg.nnodes
    gpus_per_node = gpus_per_node or cfg.nproc
    rows, failing = [], []
    for stage in pipeline_stages(cfg):
        run = load_config(config_class(stage.kind), str(stage.config), stage.overrides)
        s = setting_from_config(run, stage.kind, nproc, device, preset or stage.preset)
        e = estimate(s)
        fit = e.total <= gpu_gib * GIB * (1 - margin)
        shape = f"preset {preset or stage.preset}" if preset or stage.preset else "base"
        micro = f"{s.rows} x {s.row_len}"
        rows.append((stage.name, stage.config.name, shape, micro, f"{e.total / GIB:.2f}", "fits" if fit else "NO"))
        if not fit:
            failing.append((stage, s))
    base = f"base {cfg.base}" if cfg.base is not None else f"pre-trained from preset {cfg.preset}"
    head = ("stage", "config", "model", "micro-batch", "peak GiB", "fits")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    usable = gpu_gib * (1 - margin)
    lines = [
        f"pipeline {path}: {cfg.rounds} round(s), each the same training runs; {nproc} rank(s) each; {device}; {base}",
        *(
            "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in [head, *rows]
        ),
        f"{'all fit' if not failing else f'{len(failing)} of {len(rows)} do NOT fit'} in {gpu_gib:g} GiB less a "
        f"{margin:.0%} margin = {usable:.1f} GiB per rank",
    ]
    for stage, s in failing:
        lines += [
            "",
            f"{stage.name} ({stage.config}, {' '.join(stage.overrides)}):",
            report(s, gpu_gib, margin, gpus_per_node),
        ]
    return "\n".join(lines), not failing


def report(s: Setting, gpu_gib: float, margin: float = 0.10, gpus_per_node: int = 8) -> str:
    e, p = estimate(s), param_counts(s.model, "reward" if s.kind == "rm" else "lm")
    layout = f"FSDP over {s.nproc}" if s.shards == s.nproc else f"HSDP {s.nproc // s.shards} x {s.shards}"
    dtype, where = "bf16" if s.compute_bytes == 2 else "fp32", "CPU memory" if s.cpu_offload else f"1/{s.shards}"
    ref = {"model": "sharded, frozen", "precompute": "precomputed: none", None: "none"}[s.reference]
    ac, peak = s.activation_checkpointing, max(e.phases, key=e.phases.get)
    rows = [
        (f"parameters (fp32 master, {where})", e.params, False),
        (f"gradients (fp32, {where}{'' if s.accumulating else ', made in the backward'})", e.grads, False),
        (f"optimizer (AdamW, 2 x fp32, {where})", e.optimizer, False),
        (f"DPO reference ({ref})", e.reference, False),
        (f"gathered, backward ({dtype} blocks + grads, root, head grad)", e.gathered, False),
        ("activations, checkpointing off", e.activations_off, not ac),
        ("activations, checkpointing on", e.activations_on, ac),
        (f"log-prob chunk ({'none: reward head' if s.kind == 'rm' else s.kernels})", e.logprob_chunk, False),
        *(
            [("reference forward (its root, 2 blocks, forward chunk)", e.reference_forward, False)]
            * bool(e.reference_forward)
        ),
        *((f"= at the {name}", b, name == peak) for name, b in e.phases.items()),
        ("total (the peak)", e.total, False),
        *([("CPU memory (offloaded state), per rank", e.host, False)] * bool(e.host)),
    ]
    lines = [
        f"{s.kind}: {p['total'] / 1e9:.2f} B params (block {p['block'] / 1e6:.0f} M, root {p['root'] / 1e6:.0f} M);"
        f" {layout}{', CPU offload' if s.cpu_offload else ''}; {s.device} {dtype}; kernels {s.kernels}",
        f"micro-batch: {s.rows} row(s) x {s.row_len} = {s.tokens} tokens; activation checkpointing {'on' if ac else 'off'}",
        f"{'per rank':<64}{'GiB':>9}",
        *(f"  {label:<62}{b / GIB:9.2f}{' <' * mark}" for label, b, mark in rows),
    ]
    usable = gpu_gib * (1 - margin)
    verdict = "fits" if e.total <= usable * GIB else "does NOT fit"
    lines.append(
        f"{verdict} in {gpu_gib:g} GiB less a {margin:.0%} margin (CUDA context, fragmentation) = {usable:.1f} GiB"
    )
    if verdict != "fits":
        options = suggest(s, gpu_gib, margin, gpus_per_node)
        lines += [f"  try: {text} -> {estimate(t).total / GIB:.1f} GiB" for text, t in options]
        lines += [] if options else ["  nothing here makes it fit: a larger GPU, or tensor/pipeline parallelism"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="an SFT, RM or DPO YAML file, or a pipeline config (every stage)")
    ap.add_argument("--nproc", type=int, help="ranks in all (GPUs over all nodes); a pipeline's: its nproc x nnodes")
    ap.add_argument("--gpu-gib", type=float, required=True, help="memory per GPU (per process with --device cpu)")
    ap.add_argument("--kind", choices=KINDS, help="default: from the config's sections, else its file name")
    ap.add_argument(
        "--preset", help="the model's shape from a llama_posttrain/llama/config.py preset (checkpoint not there yet)"
    )
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--margin", type=float, default=0.10, help="share of memory left free (default 0.10)")
    ap.add_argument("--gpus-per-node", type=int, help="default: 8; a pipeline's nproc")
    ap.add_argument("overrides", nargs="*", help="section.key=value (a pipeline's: key=value)")
    ap.epilog = f"exit status: 0 everything fits, {NOT_FIT} something does not, 2 a bad config or option"
    args = ap.parse_args(argv)
    from llama_posttrain.train.config import load_config

    try:
        if not args.kind and is_pipeline_config(args.config):
            text, fit = plan_pipeline(
                args.config,
                args.overrides,
                args.nproc,
                args.gpu_gib,
                args.device,
                args.preset,
                args.margin,
                args.gpus_per_node,
            )
            print(text)
            return 0 if fit else NOT_FIT
        if args.nproc is None:
            raise ValueError("--nproc: the number of ranks in all is needed for a training config")
        kind = args.kind or detect_kind(args.config, args.overrides)
        cfg = load_config(config_class(kind), args.config, args.overrides)
        s = setting_from_config(cfg, kind, args.nproc, args.device, args.preset)
        print(report(s, args.gpu_gib, args.margin, args.gpus_per_node or 8))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if fits(s, args.gpu_gib, args.margin) else NOT_FIT


if __name__ == "__main__":
    raise SystemExit(main())
