"""SFT's objective and run (llama_posttrain/train/sft.py, its entry point, reads the config and calls `run`):
the log-probs of the target tokens, the loss of llama_posttrain/losses/sft.py."""

from __future__ import annotations

import math

from llama_posttrain.losses import sft
from llama_posttrain.train import loop
from llama_posttrain.train.config import Config
from llama_posttrain.train.run_setup import setup
from llama_posttrain.train.targets import model_logps


def make_objective(model, backend: str) -> loop.Objective:
    def loss(batch, step):
        out = model_logps(model, batch, backend, stats=True)  # (N,) log p of the targets, argmax hits, entropies
        return sft.sft_loss(out.logprobs, step.num_targets, out.is_argmax, out.entropy)

    def derive(m):
        return {**m, "ppl": math.exp(min(m["nll"], 50.0))} if "nll" in m else m

    return loop.Objective(loss, sft.RATIOS, derive)


def run(cfg: Config):  # train/sft.py SFTConfig
    s = setup(cfg, kind="sft", head="lm", train_on_prompt=not cfg.sft.mask_prompt)
    return loop.run(s, make_objective(s.model, cfg.train.kernels))
