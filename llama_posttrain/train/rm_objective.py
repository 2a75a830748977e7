"""The reward model's objective and run (llama_posttrain/train/rm.py, its entry point, reads the config and
calls `run`): each response's reward at its final token, the ranking loss of llama_posttrain/losses/ranking.py."""

from __future__ import annotations

import math

from llama_posttrain.data.schema import STRENGTHS
from llama_posttrain.losses import ranking
from llama_posttrain.train import loop
from llama_posttrain.train.config import Config
from llama_posttrain.train.run_setup import setup
from llama_posttrain.train.targets import scores, strength_margins, trl_tokens


def make_objective(model, margin: str | None, center_rewards: float = 0.0, collect: bool = False) -> loop.Objective:
    """collect: also the rewards of the better and the worse response of every ranked pair (the eval's
    histograms `rewards_chosen`, `rewards_rejected`; Objective.collect)."""
    # pairwise accuracy per preference strength: pairs of the groups of that strength. trl_tokens_per_token:
    # as DPO's (llama_posttrain/losses/dpo.py RATIOS), for TRL's num_tokens (each response with its prompt)
    ratios = {**ranking.RATIOS, **{f"accuracy/{s}": (f"correct/{s}", f"pairs/{s}") for s in STRENGTHS}}
    ratios["trl_tokens_per_token"] = ("trl_tokens", "tokens")

    def loss(batch, step):
        r = scores(model(batch.tokens, batch.positions, batch.doc_ids, batch.branch_ids), batch)  # (S,)
        m = strength_margins(batch.group_strength, ranking.LLAMA2_MARGINS[margin]) if margin else None
        loss, sums = ranking.ranking_loss(
            r,
            batch.seq_group,
            batch.seq_rank,
            margin=m,
            num_pairs=step.num_pairs,
            group_class=batch.group_strength,
            class_names=STRENGTHS,
            center_rewards=center_rewards,
        )
        sums["trl_tokens"] = trl_tokens(batch)
        if collect:  # (P,) each: the loss's pairs, better (i) and worse (j)
            i, j = ranking.ranked_pairs(batch.seq_group, batch.seq_rank)
            sums |= {"rewards_chosen": r[i].detach(), "rewards_rejected": r[j].detach()}
        return loss, sums

    def derive(m):  # std from the means of r and r^2
        sq = m.pop("reward_sq_mean", None)
        if sq is not None:
            m["reward_std"] = math.sqrt(max(sq - m["reward_mean"] ** 2, 0.0))
        return m

    names = ("rewards_chosen", "rewards_rejected") if collect else ()
    return loop.Objective(loss, ratios, derive, extrema=ranking.EXTREMA, collect=names)


def run(cfg: Config):  # train/rm.py RMConfig
    s = setup(cfg, kind="rm", head="reward", one_row=cfg.rm.one_row)
    objective, at_eval = (make_objective(s.model, cfg.rm.margin, cfg.rm.center_rewards, c) for c in (False, True))
    return loop.run(s, objective, eval_objective=at_eval)
