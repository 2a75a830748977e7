"""DPO with the Llama 3 changes: formatting tokens masked out of the log-probs, NLL on chosen.

    torchrun --nproc_per_node 8 train/dpo.py --config experiments/llama3.1-8b/dpo.yaml optim.lr=5e-7

Rows are [prompt][chosen][rejected]: the prompt is computed once for both responses, by the policy
and by the frozen reference (sharded too, eval mode, no grad). `dpo.reference: precompute` runs
the reference once over the train and eval sets first, keeps the per-response log-prob sums and
frees the reference model. Loss: losses/dpo.py (beta 0.1, alpha 0.2, lr 1e-5 as in Llama 3).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from data.loader import DataLoader
from data.rows import pack
from llama.chat import ChatFormat
from losses import chosen_nll, dpo_logps, dpo_loss, target_logps
from train import loop
from train.config import Config, OptimSection, parse_args
from train.distributed import build_model, init_distributed, model_tokenizer

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "nll",
)


@dataclass
class DPOSection:
    beta: float = 0.1
    alpha: float = 0.2  # weight of the NLL term on chosen
    label_smoothing: float = 0.0  # cDPO
    mask_format: bool = True  # drop header spans and turn terminators from the DPO log-probs
    nll_norm: Literal["sequence", "token"] = "sequence"  # NLL per chosen sequence, or over the step's chosen tokens
    reference: Literal["model", "precompute"] = "model"  # kept alongside, or one pass then freed
    reference_checkpoint: str | None = None  # default: model.checkpoint (the SFT model)


@dataclass
class DPOConfig(Config):
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5))
    dpo: DPOSection = field(default_factory=DPOSection)


def _logps(model, batch, backend):
    return model(
        batch.tokens, batch.positions, batch.doc_ids, batch.branch_ids,
        head_fn=lambda h, w: target_logps(h, w, batch, backend),
    )  # fmt: skip


@torch.no_grad()
def precompute_reference(ref, loader: DataLoader, backend: str, mask_format: bool, d) -> torch.Tensor:
    """(num_examples, 2) reference log-prob sums of (chosen, rejected), every rank its share."""
    table = torch.zeros(len(loader.examples), 2, dtype=torch.float32, device=d.device)
    shares = [loader.examples[r :: d.world_size] for r in range(d.world_size)]
    packed = [pack(s, loader.max_len, loader.tokens_per_microbatch, loader.pad_id) for s in shares]
    n = max(len(p) for p in packed)
    mine = packed[d.rank] + [pack(shares[0][:1], loader.max_len, loader.tokens_per_microbatch, loader.pad_id)[0]] * (
        n - len(packed[d.rank])
    )  # ranks with fewer batches redo one (FSDP needs every rank in every forward); written only once
    for k, batch in enumerate(mine):
        batch = batch.to(d.device)
        c, r = dpo_logps(_logps(ref, batch, backend), batch, mask_format)
        if k < len(packed[d.rank]):
            table[batch.group_uid] = torch.stack([c, r], dim=-1).float()
    if d.world_size > 1:
        dist.all_reduce(table)
    return table


def make_task(model, ref, tables, cfg: DPOSection, backend: str) -> loop.Task:
    def loss(batch, step):
        pol = _logps(model, batch, backend)
        pc, pr = dpo_logps(pol, batch, cfg.mask_format)
        nll, _ = chosen_nll(pol, batch, cfg.nll_norm)
        if ref is not None:
            with torch.no_grad():
                rc, rr = dpo_logps(_logps(ref, batch, backend), batch, cfg.mask_format)
        else:
            table = tables["eval" if not model.training else "train"][batch.group_uid]
            rc, rr = table[:, 0], table[:, 1]
        denom = step.num_best_targets if cfg.nll_norm == "token" else step.num_pairs
        value, m = dpo_loss(pc, pr, rc, rr, nll, cfg.beta, cfg.alpha, cfg.label_smoothing, step.num_pairs, denom)
        n = m["pairs"]
        return value, {"pairs": n, **{k: m[k] * n for k in METRICS}}

    def summarize(s):
        return {k: s[k] / max(s["pairs"], 1) for k in METRICS}

    return loop.Task(loss, summarize)


def main(argv=None):
    cfg = parse_args(DPOConfig, argv)
    d = init_distributed()
    chat = ChatFormat(model_tokenizer(cfg.model.checkpoint, cfg.model.preset, cfg.model.tokenizer))
    train_loader, eval_loader = loop.build_loaders(cfg, "dpo", chat, d)
    t, m = cfg.train, cfg.model
    model = build_model(
        d, m.checkpoint, m.preset, "lm", t.seed, t.mixed_precision, t.activation_checkpointing, t.compile
    )
    ref_ckpt = cfg.dpo.reference_checkpoint or m.checkpoint
    ref = build_model(d, ref_ckpt, None if ref_ckpt else m.preset, "lm", t.seed, t.mixed_precision, trainable=False)
    tables = None
    if cfg.dpo.reference == "precompute":
        tables = {"train": precompute_reference(ref, train_loader, t.kernels, cfg.dpo.mask_format, d)}
        if eval_loader is not None:
            tables["eval"] = precompute_reference(ref, eval_loader, t.kernels, cfg.dpo.mask_format, d)
        del ref
        gc.collect()
        ref = None
    return loop.run(cfg, d, model, make_task(model, ref, tables, cfg.dpo, t.kernels), train_loader, eval_loader)


if __name__ == "__main__":
    loop.main_guard(main)
