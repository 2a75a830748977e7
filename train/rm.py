"""Reward model: the pre-trained LM with its head swapped for a scalar head, ranking loss.

    torchrun --nproc_per_node 8 train/rm.py --config experiments/llama3.1-8b/rm.yaml

Each row is [prompt][r_a][r_b][r_c] with the responses shuffled; the reward of a response is read
at its final token. Loss: losses/ranking.py (no margin by default, as in Llama 3). Metrics:
pairwise accuracy overall and per preference strength, reward mean / std, mean margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from data.schema import STRENGTHS
from llama.chat import ChatFormat
from losses import LLAMA2_MARGINS, ranked_pairs, ranking_loss, strength_margins
from train import loop
from train.config import Config, parse_args
from train.distributed import build_model, init_distributed, model_tokenizer


@dataclass
class RMSection:
    margin: Literal["small", "large"] | None = None  # None (Llama 3) | small | large (Llama 2's margins by strength)
    one_row: bool = True  # [prompt][r_a][r_b][r_c] (Llama 3); false: each response with its own prompt copy


@dataclass
class RMConfig(Config):
    rm: RMSection = field(default_factory=RMSection)


def make_task(model, margin: str | None) -> loop.Task:
    def loss(batch, step):
        rewards = model(batch.tokens, batch.positions, batch.doc_ids, batch.branch_ids).flatten()
        r = rewards[batch.seq_score_index].float()  # (S,)
        m = strength_margins(batch.group_strength, LLAMA2_MARGINS[margin]) if margin else None
        value, _ = ranking_loss(r, batch.seq_group, batch.seq_rank, m, num_pairs=step.num_pairs)
        i, j = ranked_pairs(batch.seq_group, batch.seq_rank)
        correct = (r[i] > r[j]).float().detach()
        strength = batch.group_strength[batch.seq_group[i]]
        rd = r.detach()
        sums = {
            "pairs": len(i), "correct": correct.sum(), "margin_sum": (rd[i] - rd[j]).sum(),
            "seqs": len(rd), "reward_sum": rd.sum(), "reward_sq_sum": (rd * rd).sum(),
        }  # fmt: skip
        for k, name in enumerate(STRENGTHS):
            sel = strength == k
            sums[f"pairs/{name}"], sums[f"correct/{name}"] = sel.sum(), correct[sel].sum()
        return value, sums

    def summarize(s):
        mean = s["reward_sum"] / max(s["seqs"], 1)
        out = {
            "accuracy": s["correct"] / max(s["pairs"], 1),
            "reward_mean": mean,
            "reward_std": math.sqrt(max(s["reward_sq_sum"] / max(s["seqs"], 1) - mean * mean, 0.0)),
            "margin_mean": s["margin_sum"] / max(s["pairs"], 1),
        }
        for name in STRENGTHS:
            if s[f"pairs/{name}"]:
                out[f"accuracy/{name}"] = s[f"correct/{name}"] / s[f"pairs/{name}"]
        return out

    return loop.Task(loss, summarize)


def main(argv=None):
    cfg = parse_args(RMConfig, argv)
    d = init_distributed()
    chat = ChatFormat(model_tokenizer(cfg.model.checkpoint, cfg.model.preset, cfg.model.tokenizer))
    train_loader, eval_loader = loop.build_loaders(cfg, "rm", chat, d, one_row=cfg.rm.one_row)
    t = cfg.train
    model = build_model(
        d,
        cfg.model.checkpoint,
        cfg.model.preset,
        "reward",
        t.seed,
        t.mixed_precision,
        t.activation_checkpointing,
        t.compile,
    )
    return loop.run(cfg, d, model, make_task(model, cfg.rm.margin), train_loader, eval_loader)


if __name__ == "__main__":
    loop.main_guard(main)
