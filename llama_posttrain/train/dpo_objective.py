"""DPO's objective and run (llama_posttrain/train/dpo.py, its entry point, reads the config and calls `run`):
the policy's and the reference's log-probs of each pair, the loss of llama_posttrain/losses/dpo.py, the
metrics of the policy's logits."""

from __future__ import annotations

import gc

import torch

from llama_posttrain.llama.model import attention_mask
from llama_posttrain.losses import dpo
from llama_posttrain.train import loop
from llama_posttrain.train.config import Config
from llama_posttrain.train.distributed import build_model
from llama_posttrain.train.run_setup import setup
from llama_posttrain.train.targets import (
    LiveReference,
    Pairs,
    PrecomputedReference,
    Reference,
    model_logps,
    reference_table,
    trl_tokens,
)

# the metrics of the policy's logits (TRL's names and meanings, llama_posttrain/losses/dpo.py), over the tokens of
# the DPO sums, beside the loss's RATIOS; trl_tokens_per_token: TRL's token count (targets.trl_tokens) per token
STATS_RATIOS = {
    "logits/chosen": ("logits/chosen", "chosen_tokens"),
    "logits/rejected": ("logits/rejected", "rejected_tokens"),
    "token_accuracy": ("argmax_tokens", "chosen_tokens"),
    "entropy": ("entropy", "response_tokens"),
}


def make_objective(model, reference: Reference | None, cfg, backend: str) -> loop.Objective:
    """reference: the frozen model run on each micro-batch, its precomputed table, or None (reference-free);
    cfg: the config's `dpo` section (llama_posttrain/train/dpo.py DPOSection)."""
    vocab = model.config.vocab_size
    hyper = dpo.Hyper(**{k: getattr(cfg, k) for k in dpo.Hyper._fields})

    def loss(batch, step):
        mask = attention_mask(batch.doc_ids, batch.branch_ids, kind=model.attention_kind)  # the policy's, the ref's
        out = model_logps(model, batch, backend, mask, stats=True)  # (N,) each: log p, argmax hit, logit sum, entropy
        pairs = Pairs(batch, cfg.mask_format)  # the pairs' sequences: one device sort
        ref = None if reference is None else reference.logps(batch, pairs, mask)  # (P,) each
        total, sums = dpo.dpo_loss(pairs.policy(out.logprobs), ref, step.num_pairs, step.num_chosen_targets, hyper)
        lc, lr = pairs.sums(out.logit_sum / vocab)  # (P,) the tokens' mean logits, summed
        hits, _ = pairs.sums(out.is_argmax.float())  # (P,) chosen tokens that are the argmax
        ec, er = pairs.sums(out.entropy)  # (P,) the tokens' entropies, summed
        sums |= {"logits/chosen": lc.detach().sum(), "logits/rejected": lr.detach().sum()}
        sums |= {"argmax_tokens": hits.detach().sum(), "entropy": (ec + er).detach().sum()}
        sums["response_tokens"] = sums["chosen_tokens"] + sums["rejected_tokens"]
        return total, sums | {"trl_tokens": trl_tokens(batch)}  # dpo.RATIOS trl_tokens_per_token

    ratios = {**dpo.RATIOS, **STATS_RATIOS}
    forward = reference is not None and reference.forward
    return loop.Objective(loss, ratios, reference_forward=forward)


def run(cfg: Config):  # train/dpo.py DPOConfig (its `dpo` section: DPOSection)
    s = setup(cfg, kind="dpo", head="lm")
    t, m = cfg.train, cfg.model
    train_ref = eval_ref = None
    if dpo.needs_reference(cfg.dpo.loss):
        ref_ckpt = cfg.dpo.reference_checkpoint or m.checkpoint
        layout = {"shard_degree": t.shard_degree, "cpu_offload": t.cpu_offload, "compile": t.compile}
        layout["static_shapes"] = len(s.train_loader.shapes)  # the policy's shapes (llama_posttrain/train/run_setup.py)
        ref = build_model(
            s.d, ref_ckpt, None if ref_ckpt else m.preset, "lm", t.seed, t.mixed_precision, trainable=False, **layout
        )  # compiled like the policy: its forward runs every micro-batch
        train_ref = eval_ref = LiveReference(ref, t.kernels)
        if cfg.dpo.reference == "precompute":
            table = reference_table(ref, s.train_loader, t.kernels, cfg.dpo.mask_format, s.d.device)
            train_ref = PrecomputedReference(table)
            eval_ref = None  # no eval set: nothing may keep the model alive
            if s.eval_loader is not None:
                table = reference_table(ref, s.eval_loader, t.kernels, cfg.dpo.mask_format, s.d.device)
                eval_ref = PrecomputedReference(table)
            del ref
            gc.collect()
            if s.d.device.type == "cuda":
                torch.cuda.empty_cache()  # the reference's memory back to the allocator's free pool
    elif s.d.is_main:
        print(f"dpo.loss {cfg.dpo.loss}: reference-free, no reference model", flush=True)
    objective = make_objective(s.model, train_ref, cfg.dpo, t.kernels)
    return loop.run(s, objective, eval_objective=make_objective(s.model, eval_ref, cfg.dpo, t.kernels))
