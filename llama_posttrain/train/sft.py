"""Supervised fine-tuning: cross-entropy on the target tokens of packed dialogs (llama_posttrain/losses/sft.py).

    torchrun --nproc_per_node 8 llama_posttrain/train/sft.py --config experiments/llama3.1-8b/sft.yaml optim.lr=1e-5

With `sft.mask_prompt: false` every token is a target: plain causal-LM training (how the tiny
experiment models are pre-trained, on {"text": ...} records).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llama_posttrain.train.config import Config, opt, parse_args
from llama_posttrain.train.lifecycle import main_guard

# torch-heavy modules are imported in the functions that use them: `--help` and config errors answer at once.
if TYPE_CHECKING:
    from llama_posttrain.train import loop


@dataclass
class SFTSection:
    mask_prompt: bool = opt(True, "train on assistant turns only")


@dataclass
class SFTConfig(Config):
    sft: SFTSection = field(default_factory=SFTSection)


def make_objective(model, backend: str) -> loop.Objective:
    from llama_posttrain.losses import sft
    from llama_posttrain.train import loop
    from llama_posttrain.train.targets import model_logps

    def loss(batch, step):
        out = model_logps(model, batch, backend, stats=True)  # (N,) log p of the targets, argmax hits, entropies
        return sft.sft_loss(out.logprobs, step.num_targets, out.is_argmax, out.entropy)

    def derive(m):
        return {**m, "ppl": math.exp(min(m["nll"], 50.0))} if "nll" in m else m

    return loop.Objective(loss, sft.RATIOS, derive)


def main(argv=None):
    cfg = parse_args(SFTConfig, argv, __doc__)
    from llama_posttrain.train import loop
    from llama_posttrain.train.run_setup import setup

    s = setup(cfg, kind="sft", head="lm", train_on_prompt=not cfg.sft.mask_prompt)
    return loop.run(s, make_objective(s.model, cfg.train.kernels))


if __name__ == "__main__":
    main_guard(main)
