"""DPO with the Llama 3 changes: formatting tokens masked out of the log-probs, NLL on chosen.

    torchrun --nproc_per_node 8 llama_posttrain/train/dpo.py --config experiments/llama3.1-8b/dpo.yaml optim.lr=5e-7

Rows are [prompt][chosen][rejected]: the prompt is computed once for both responses, by the policy
and by the frozen reference (sharded too, eval mode, no grad). `dpo.reference: precompute` runs
the reference once over the train and eval sets first, keeps the per-response log-prob sums and
frees the reference model. Loss: llama_posttrain/losses/dpo.py (beta 0.1, alpha 0.2, lr 1e-5 as in Llama 3);
`dpo.loss` picks another of its family (ipo, hinge, robust; simpo needs no reference model).
"""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from llama_posttrain.train.config import Config, Interval, OptimSection, parse_args
from llama_posttrain.train.lifecycle import main_guard

# torch-heavy modules are imported in the functions that use them: `--help` and config errors answer at once.
if TYPE_CHECKING:
    from llama_posttrain.train import loop


# The hyperparameters each loss of llama_posttrain/losses/dpo.py LOSSES reads, with their allowed values, checked when
# the config is read (before any model is loaded). A new loss gets its row here: tests/test_loss_family.py fails
# without one, and checks that the loss reads exactly these. beta > 0: at 0 the preference term is constant (ipo
# divides by it), below 0 it rewards the rejected response. A flip probability eps < 0.5: at 0.5 the labels say
# nothing, above they are reversed (robust divides by 1 - 2 eps). alpha (the NLL term, every loss) >= 0: below 0
# it maximizes the chosen response's NLL. gamma >= 0: a target margin in favour of the chosen response.
POSITIVE, NON_NEGATIVE, FLIP = Interval(0.0, low_open=True), Interval(0.0), Interval(0.0, 0.5, high_open=True)
LOSS_HYPERPARAMETERS = {
    "sigmoid": {"beta": POSITIVE, "alpha": NON_NEGATIVE, "label_smoothing": FLIP},
    "ipo": {"beta": POSITIVE, "alpha": NON_NEGATIVE},
    "hinge": {"beta": POSITIVE, "alpha": NON_NEGATIVE},
    "robust": {"beta": POSITIVE, "alpha": NON_NEGATIVE, "label_smoothing": FLIP},
    "simpo": {"beta": POSITIVE, "alpha": NON_NEGATIVE, "label_smoothing": FLIP, "gamma": NON_NEGATIVE},
}
REFERENCE_FREE = {"simpo"}  # the losses without a reference model (LOSSES[...].reference False)


@dataclass
class DPOSection:
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo"] = (
        "sigmoid"  # llama_posttrain/losses/dpo.py LOSSES; sigmoid: Llama 3
    )
    beta: float = 0.1  # reward scale (IPO: its tau); SimPO's paper uses 2.0-2.5
    alpha: float = 0.2  # weight of the NLL term on chosen, any loss (0: the papers' losses)
    label_smoothing: float = 0.0  # flip probability: sigmoid (cDPO), robust (rDPO, in (0, 0.5): set it), simpo
    gamma: float = 0.5  # simpo's target reward margin
    mask_format: bool = True  # drop header spans and turn terminators from the DPO log-probs
    nll_norm: Literal["sequence", "token"] = "sequence"  # NLL per chosen sequence, or over the step's chosen tokens
    reference: Literal["model", "precompute"] = "model"  # kept alongside, or one pass then freed (simpo: none)
    reference_checkpoint: str | None = None  # default: model.checkpoint (the SFT model); reference losses only

    def __post_init__(self):
        """Each hyperparameter the loss reads in its range (LOSS_HYPERPARAMETERS); one it does not read, and
        the reference keys under a reference-free loss, left at their defaults: a value set there would
        change nothing, silently."""
        if self.loss not in LOSS_HYPERPARAMETERS:
            raise ValueError(f"dpo.loss must be one of {tuple(LOSS_HYPERPARAMETERS)}, got {self.loss!r}")
        reads = LOSS_HYPERPARAMETERS[self.loss]
        unread = {n for row in LOSS_HYPERPARAMETERS.values() for n in row} - set(reads)
        if self.loss in REFERENCE_FREE:
            unread |= {"reference", "reference_checkpoint"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in reads and value not in reads[f.name]:
                raise ValueError(
                    f"dpo.{f.name}={value!r} is outside {reads[f.name]}, its range for dpo.loss {self.loss}"
                )
            if f.name in unread and value != f.default:
                reference_key = f.name.startswith("reference")
                users = [
                    n
                    for n, row in LOSS_HYPERPARAMETERS.items()
                    if (n not in REFERENCE_FREE if reference_key else f.name in row)
                ]
                raise ValueError(
                    f"dpo.{f.name}={value!r} is not read by dpo.loss {self.loss} (only by {', '.join(users)}): "
                    f"remove it, or pick one of those losses"
                )
        # values a loss reads that leave it another loss, or change nothing: no default may hide that
        if self.loss == "robust" and self.label_smoothing == 0:
            raise ValueError(
                "dpo.loss robust with dpo.label_smoothing=0.0 is plain sigmoid (rDPO corrects for labels flipped "
                "with probability label_smoothing): set dpo.label_smoothing in (0, 0.5), or dpo.loss=sigmoid"
            )
        if self.alpha == 0 and self.nll_norm != "sequence":
            raise ValueError(
                f"dpo.nll_norm={self.nll_norm!r} changes nothing with dpo.alpha=0 (no NLL term): remove it, or set "
                f"dpo.alpha > 0"
            )


@dataclass
class DPOConfig(Config):
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-5))
    dpo: DPOSection = field(default_factory=DPOSection)


def make_objective(model, reference, cfg: DPOSection, backend: str) -> loop.Objective:
    """reference: the frozen model, its precomputed (num_examples, 2) table, or None (reference-free)."""
    import torch

    from llama_posttrain.llama.model import attention_mask
    from llama_posttrain.losses import dpo
    from llama_posttrain.train import loop
    from llama_posttrain.train.targets import chosen_nll, dpo_lengths, dpo_logps, model_logps, trl_tokens

    vocab = model.config.vocab_size

    def loss(batch, step):
        mask = attention_mask(batch.doc_ids, batch.branch_ids)  # built once: the policy's and the reference's
        out = model_logps(model, batch, backend, mask, stats=True)  # (N,) each: log p, argmax hit, logit sum, entropy
        pol = out.logprobs  # (N,) policy log p of every target
        pc, pr = dpo_logps(pol, batch, cfg.mask_format)  # (P,) sums, formatting tokens masked
        nc, nr = dpo_lengths(batch, cfg.mask_format)  # (P,) the tokens in those sums
        nll, nll_tokens = chosen_nll(pol, batch)  # (P,) -sum log p over every chosen token, their count
        lc, lr = dpo_logps(out.logit_sum / vocab, batch, cfg.mask_format)  # (P,) metrics: mean logits, summed
        hits, _ = dpo_logps(out.is_argmax.float(), batch, cfg.mask_format)  # (P,) chosen tokens that are the argmax
        ec, er = dpo_logps(out.entropy, batch, cfg.mask_format)  # (P,) metrics: the tokens' entropies, summed
        rc = rr = None
        if isinstance(reference, torch.Tensor):
            rc, rr = reference[batch.group_uid].unbind(-1)
        elif reference is not None:
            with torch.no_grad():
                rc, rr = dpo_logps(model_logps(reference, batch, backend, mask), batch, cfg.mask_format)
        total, sums = dpo.dpo_loss(
            policy_chosen=pc, policy_rejected=pr, reference_chosen=rc, reference_rejected=rr, chosen_tokens=nc,
            rejected_tokens=nr, chosen_nll=nll, chosen_nll_tokens=nll_tokens, num_pairs=step.num_pairs,
            num_chosen_tokens=step.num_chosen_targets, loss=cfg.loss, beta=cfg.beta, alpha=cfg.alpha,
            label_smoothing=cfg.label_smoothing, gamma=cfg.gamma, nll_norm=cfg.nll_norm,
            chosen_mean_logits=lc, rejected_mean_logits=lr, chosen_argmax_tokens=hits, chosen_entropy=ec,
            rejected_entropy=er,
        )  # fmt: skip
        return total, sums | {"trl_tokens": trl_tokens(batch)}  # dpo.RATIOS trl_tokens_per_token

    return loop.Objective(loss, dpo.RATIOS, reference_forward=isinstance(reference, torch.nn.Module))


def main(argv=None):
    cfg = parse_args(DPOConfig, argv, __doc__)
    import torch

    from llama_posttrain.losses import dpo
    from llama_posttrain.train import loop
    from llama_posttrain.train.distributed import build_model
    from llama_posttrain.train.entry import setup
    from llama_posttrain.train.targets import reference_table

    s = setup(cfg, kind="dpo", head="lm")
    t, m = cfg.train, cfg.model
    train_ref = eval_ref = None
    if dpo.LOSSES[cfg.dpo.loss].reference:
        ref_ckpt = cfg.dpo.reference_checkpoint or m.checkpoint
        layout = {"shard_degree": t.shard_degree, "cpu_offload": t.cpu_offload, "compile": t.compile}
        layout["static_shapes"] = len(s.train_loader.shapes)  # the policy's shapes (llama_posttrain/train/entry.py)
        ref = build_model(
            s.d, ref_ckpt, None if ref_ckpt else m.preset, "lm", t.seed, t.mixed_precision, trainable=False, **layout
        )  # compiled like the policy: its forward runs every micro-batch
        train_ref = eval_ref = ref
        if cfg.dpo.reference == "precompute":
            train_ref = reference_table(ref, s.train_loader, t.kernels, cfg.dpo.mask_format, s.d.device)
            eval_ref = None  # no eval set: nothing may keep the model alive
            if s.eval_loader is not None:
                eval_ref = reference_table(ref, s.eval_loader, t.kernels, cfg.dpo.mask_format, s.d.device)
            del ref
            gc.collect()
            if s.d.device.type == "cuda":
                torch.cuda.empty_cache()  # the reference's memory back to the allocator's free pool
    elif s.d.is_main:
        print(f"dpo.loss {cfg.dpo.loss}: reference-free, no reference model", flush=True)
    objective = make_objective(s.model, train_ref, cfg.dpo, t.kernels)
    return loop.run(s, objective, eval_objective=make_objective(s.model, eval_ref, cfg.dpo, t.kernels))


if __name__ == "__main__":
    main_guard(main)
