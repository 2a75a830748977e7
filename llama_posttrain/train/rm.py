"""Reward model: the pre-trained LM with its head swapped for a scalar head, ranking loss.

    torchrun --nproc_per_node 8 llama_posttrain/train/rm.py --config experiments/llama3.1-8b/rm.yaml

Each row is [prompt][r_a][r_b][r_c] with the responses shuffled; the reward of a response is read
at its final token. Loss: llama_posttrain/losses/ranking.py (no margin by default, as in Llama 3). Metrics:
pairwise accuracy overall and per preference strength, reward mean / std, mean margin. This file: the
config; the objective and the run: llama_posttrain/train/rm_objective.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llama_posttrain.train.config import Config, NonNegFloat, opt, parse_args
from llama_posttrain.train.lifecycle import main_guard


@dataclass
class RMSection:
    margin: Literal["small", "large"] | None = opt(
        None, "None (Llama 3) | small | large (Llama 2's margins by strength)"
    )
    one_row: bool = opt(True, "[prompt][r_a][r_b][r_c] (Llama 3); false: each response with its own prompt copy")
    center_rewards: NonNegFloat = opt(
        0.0, "c: + c * mean over pairs of (r_i + r_j)^2 (TRL's center_rewards_coefficient)"
    )


@dataclass
class RMConfig(Config):
    rm: RMSection = field(default_factory=RMSection)


def main(argv=None):
    cfg = parse_args(RMConfig, argv, __doc__)
    from llama_posttrain.train.rm_objective import run  # torch and the model: after the config is read

    return run(cfg)


if __name__ == "__main__":
    main_guard(main)
