"""DPO with the Llama 3 changes: formatting tokens masked out of the log-probs, NLL on chosen.

    torchrun --nproc_per_node 8 llama_posttrain/train/dpo.py --config experiments/llama3.1-8b/dpo.yaml optim.lr=5e-7

Rows are [prompt][chosen][rejected]: the prompt is computed once for both responses, by the policy
and by the frozen reference (sharded too, eval mode, no grad). `dpo.reference: precompute` runs
the reference once over the train and eval sets first, keeps the per-response log-prob sums and
frees the reference model. Loss: llama_posttrain/losses/dpo.py (beta 0.1, alpha 0.2, lr 1e-5 as in Llama 3);
`dpo.loss` picks another of its family (ipo, hinge, robust, apo_zero, nca_pair, bco_pair; simpo needs no
reference model), or a list of them weighted by `dpo.loss_weights` (TRL's loss_type, loss_weights).
This file: the config; the objective and the run: llama_posttrain/train/dpo_objective.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from llama_posttrain.losses.dpo_names import LOSS_KEYS, REFERENCE_FREE, SFT
from llama_posttrain.train.config import Config, Interval, OptimSection, opt, parse_args
from llama_posttrain.train.lifecycle import main_guard

# The allowed values of each hyperparameter a loss reads (llama_posttrain/losses/dpo_names.py LOSS_KEYS: which
# loss reads which), checked when the config is read (before any model is loaded); tests/test_loss_ranges_and_health.py
# checks each loss reads exactly its row. beta > 0: at 0 the preference term is constant (ipo divides by it), below 0
# it rewards the rejected response. A flip probability eps < 0.5: at 0.5 the labels say nothing, above they are
# reversed (robust divides by 1 - 2 eps). alpha (the NLL term, every loss) >= 0: below 0 it maximizes the chosen
# response's NLL. gamma >= 0: a target margin in favour of the chosen response.
POSITIVE, NON_NEGATIVE, FLIP = Interval(0.0, low_open=True), Interval(0.0), Interval(0.0, 0.5, high_open=True)
RANGES = {"beta": POSITIVE, "alpha": NON_NEGATIVE, "label_smoothing": FLIP, "gamma": NON_NEGATIVE}
LOSS_HYPERPARAMETERS = {name: {k: RANGES[k] for k in keys.reads} for name, keys in LOSS_KEYS.items()}


@dataclass
class DPOSection:
    loss: str | list[str] = opt(
        "sigmoid", f"{'|'.join(LOSS_HYPERPARAMETERS)} (sigmoid: Llama 3), or a list of them and sft (TRL's loss_type)"
    )
    loss_weights: list[float] | None = opt(None, "one weight > 0 per loss of the list (TRL's); default: 1 each")
    beta: float = opt(0.1, "reward scale (IPO: its tau); SimPO's paper uses 2.0-2.5")
    alpha: float = opt(0.2, "weight of the NLL term on chosen, any loss (0: the papers' losses)")
    label_smoothing: float = opt(0.0, "flip probability: sigmoid (cDPO), robust (rDPO, in (0, 0.5): set it), simpo")
    gamma: float = opt(0.5, "simpo's target reward margin")
    mask_format: bool = opt(True, "drop header spans and turn terminators from the DPO log-probs")
    nll_norm: Literal["sequence", "token"] = opt(
        "sequence", "NLL per chosen sequence, or over the step's chosen tokens"
    )
    reference: Literal["model", "precompute"] = opt("model", "kept alongside, or one pass then freed (simpo: none)")
    reference_checkpoint: str | None = opt(None, "default: model.checkpoint (the SFT model); reference losses only")

    def losses(self) -> list[str]:
        """dpo.loss as a list of names, each a known loss (or sft), with dpo.loss_weights matching it."""
        names = [self.loss] if isinstance(self.loss, str) else list(self.loss)
        known = (*LOSS_HYPERPARAMETERS, SFT)
        for n in names:
            if n not in known:
                raise ValueError(f"dpo.loss: {n!r} is not one of {known}")
        preference = [n for n in names if n != SFT]
        if not preference or len(set(names)) < len(names):
            raise ValueError(f"dpo.loss {self.loss}: each loss once, at least one of them not sft")
        if 0 < len(set(preference) & REFERENCE_FREE) < len(preference):
            raise ValueError(f"dpo.loss {self.loss}: a reference-free loss ({', '.join(REFERENCE_FREE)}) goes alone")
        weights = self.loss_weights
        if weights is not None and (len(weights) != len(names) or not all(w > 0 for w in weights)):
            raise ValueError(f"dpo.loss_weights={weights!r}: one weight > 0 per loss of dpo.loss {self.loss}")
        return names

    def __post_init__(self):
        """Each hyperparameter the loss reads in its range (LOSS_HYPERPARAMETERS); one it does not read, and
        the reference keys under a reference-free loss, left at their defaults: a value set there would
        change nothing, silently."""
        names = self.losses()
        reads = {k: v for n in names for k, v in LOSS_HYPERPARAMETERS.get(n, {}).items()}
        unread = {n for row in LOSS_HYPERPARAMETERS.values() for n in row} - set(reads)
        if set(names) & REFERENCE_FREE:
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
        if SFT in names and self.alpha != 0:
            raise ValueError(
                f"dpo.loss {self.loss} weights the NLL term with sft's weight, and dpo.alpha={self.alpha!r} would add "
                f"it again: set dpo.alpha=0, or drop sft from dpo.loss"
            )
        if "robust" in names and self.label_smoothing == 0:
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


def main(argv=None):
    cfg = parse_args(DPOConfig, argv, __doc__)
    from llama_posttrain.train.dpo_objective import run  # torch and the model: after the config is read

    return run(cfg)


if __name__ == "__main__":
    main_guard(main)
