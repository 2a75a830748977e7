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

from losses import dpo
from train import loop
from train.config import Config, OptimSection, parse_args
from train.distributed import build_model
from train.entry import main_guard, setup
from train.targets import chosen_nll, dpo_logps, model_logps, reference_table


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


def make_task(model, reference, cfg: DPOSection, backend: str) -> loop.Task:
    """reference: the frozen reference model, or its precomputed (num_examples, 2) table."""

    def loss(batch, step):
        pol = model_logps(model, batch, backend)  # (N,) policy log p of every target
        pc, pr = dpo_logps(pol, batch, cfg.mask_format)
        nll, _ = chosen_nll(pol, batch, cfg.nll_norm)
        if isinstance(reference, torch.Tensor):
            rc, rr = reference[batch.group_uid].unbind(-1)
        else:
            with torch.no_grad():
                rc, rr = dpo_logps(model_logps(reference, batch, backend), batch, cfg.mask_format)
        denom = step.num_best_targets if cfg.nll_norm == "token" else step.num_pairs
        return dpo.dpo_loss(pc, pr, rc, rr, nll, cfg.beta, cfg.alpha, cfg.label_smoothing, step.num_pairs, denom)

    return loop.Task(loss, dpo.RATIOS, reference_forward=not isinstance(reference, torch.Tensor))


def main(argv=None):
    cfg = parse_args(DPOConfig, argv, __doc__)
    s = setup(cfg, kind="dpo", head="lm")
    t, m = cfg.train, cfg.model
    ref_ckpt = cfg.dpo.reference_checkpoint or m.checkpoint
    layout = {"shard_degree": t.shard_degree, "cpu_offload": t.cpu_offload}
    ref = build_model(
        s.d, ref_ckpt, None if ref_ckpt else m.preset, "lm", t.seed, t.mixed_precision, trainable=False, **layout
    )
    train_ref = eval_ref = ref
    if cfg.dpo.reference == "precompute":
        train_ref = reference_table(ref, s.train_loader, t.kernels, cfg.dpo.mask_format, s.d.device)
        if s.eval_loader is not None:
            eval_ref = reference_table(ref, s.eval_loader, t.kernels, cfg.dpo.mask_format, s.d.device)
        del ref
        gc.collect()
    task = make_task(s.model, train_ref, cfg.dpo, t.kernels)
    return loop.run(s, task, eval_task=make_task(s.model, eval_ref, cfg.dpo, t.kernels))


if __name__ == "__main__":
    main_guard(main)
