"""Supervised fine-tuning: cross-entropy on the target tokens of packed dialogs (llama_posttrain/losses/sft.py).

    torchrun --nproc_per_node 8 llama_posttrain/train/sft.py --config experiments/llama3.1-8b/sft.yaml optim.lr=1e-5

With `sft.mask_prompt: false` every token is a target: plain causal-LM training (how the tiny
experiment models are pre-trained, on {"text": ...} records). This file: the config; the objective
and the run: llama_posttrain/train/sft_objective.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llama_posttrain.train.config import Config, opt, parse_args
from llama_posttrain.train.lifecycle import main_guard


@dataclass
class SFTSection:
    mask_prompt: bool = opt(True, "train on assistant turns only")


@dataclass
class SFTConfig(Config):
    sft: SFTSection = field(default_factory=SFTSection)


def main(argv=None):
    cfg = parse_args(SFTConfig, argv, __doc__)
    from llama_posttrain.train.sft_objective import run  # torch and the model: after the config is read

    return run(cfg)


if __name__ == "__main__":
    main_guard(main)
