"""Supervised fine-tuning: cross-entropy on the target tokens of packed dialogs (losses/sft.py).

    torchrun --nproc_per_node 8 train/sft.py --config experiments/llama3.1-8b/sft.yaml optim.lr=1e-5

With `sft.mask_prompt: false` every token is a target: plain causal-LM training (how the tiny
experiment models are pre-trained, on {"text": ...} records).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llama.chat import ChatFormat
from losses import sft_loss, target_logps
from train import loop
from train.config import Config, parse_args
from train.distributed import build_model, init_distributed, model_tokenizer


@dataclass
class SFTSection:
    mask_prompt: bool = True  # train on assistant turns only


@dataclass
class SFTConfig(Config):
    sft: SFTSection = field(default_factory=SFTSection)


def make_task(model, backend: str) -> loop.Task:
    def loss(batch, step):
        logps = model(
            batch.tokens, batch.positions, batch.doc_ids, batch.branch_ids,
            head_fn=lambda h, w: target_logps(h, w, batch, backend),
        )  # fmt: skip
        value, m = sft_loss(logps, step.num_targets)
        return value, {"nll_sum": m["nll_sum"], "targets": m["tokens"]}

    def summarize(s):
        nll = s["nll_sum"] / max(s["targets"], 1)
        return {"nll": nll, "ppl": math.exp(min(nll, 50.0))}

    return loop.Task(loss, summarize)


def main(argv=None):
    cfg = parse_args(SFTConfig, argv)
    d = init_distributed()
    chat = ChatFormat(model_tokenizer(cfg.model.checkpoint, cfg.model.preset, cfg.model.tokenizer))
    train_loader, eval_loader = loop.build_loaders(cfg, "sft", chat, d, train_on_prompt=not cfg.sft.mask_prompt)
    t = cfg.train
    model = build_model(
        d,
        cfg.model.checkpoint,
        cfg.model.preset,
        "lm",
        t.seed,
        t.mixed_precision,
        t.activation_checkpointing,
        t.compile,
    )
    return loop.run(cfg, d, model, make_task(model, t.kernels), train_loader, eval_loader)


if __name__ == "__main__":
    loop.main_guard(main)
