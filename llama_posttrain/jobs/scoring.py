"""Scoring samples with reward models (llama_posttrain/jobs/sample.py, evaluate.py): `score`, Llama 2's
combination of a helpfulness and a safety score, and `check_reward_models`, which refuses, before any work,
a reward model that would score the samples wrong.

A reward model reads the samples as the policy's chat format writes them: the policy's tokenizer and chat
template. An RM trained on another tokenizer or template (llama3.2's headers, llama3's) would score text
laid out as it never saw, silently. So an RM folder's own tokenizer files and chat template are compared
with the policy's; a difference is refused, naming both (the samples are not re-rendered for the RM: score
with an RM trained on the policy's format). An RM folder that holds neither is scored in the policy's
format, and that is printed.
"""

from __future__ import annotations

import math

import torch

from llama_posttrain.data.rows import build_group, encode_response, pack
from llama_posttrain.llama.chat import ChatFormat, template_in_dir
from llama_posttrain.llama.checkpoint import read_config
from llama_posttrain.llama.model import attention_mask
from llama_posttrain.llama.tokenizer import load_tokenizer, same_tokenizer, tokenizer_in_dir
from llama_posttrain.train.targets import scores as scores_of


def score(rm, chat: ChatFormat, prompts: list[list[dict]], responses: list[list[str]], max_len: int = 4096):
    """Reward of every response: -> scores[p][j]. Responses of a prompt share one row (split if long)."""
    examples, where = [], []  # where[e] = (prompt index, response indices)
    for p, (messages, texts) in enumerate(zip(prompts, responses)):
        prompt = chat.encode_dialog(messages, add_generation_prompt=True)
        encoded = [encode_response(chat, [{"role": "assistant", "content": t}]) for t in texts]
        group, size = [], len(prompt)
        for j, r in enumerate(encoded):
            if len(prompt) + len(r) > max_len:
                raise ValueError(f"prompt {p} + response {j} is {len(prompt) + len(r)} tokens, over max_len {max_len}")
            if group and size + len(r) > max_len:
                examples.append(build_group(prompt, [encoded[i] for i in group]))
                where.append((p, group))
                group, size = [], len(prompt)
            group.append(j)
            size += len(r)
        examples.append(build_group(prompt, [encoded[i] for i in group]))
        where.append((p, group))
    for uid, ex in enumerate(examples):
        ex.uid = uid
    device = rm.tok_embeddings.weight.device
    scores = [[0.0] * len(r) for r in responses]
    for batch in pack(examples, max_len, 4 * max_len, chat.tokenizer.pad_id):
        b = batch.to(device)
        mask = attention_mask(b.doc_ids, b.branch_ids)
        with torch.no_grad():
            rewards = scores_of(rm(b.tokens, b.positions, mask=mask), b).tolist()  # fp32: no bf16 ties
        for reward, group, rank in zip(rewards, b.seq_group.tolist(), b.seq_rank.tolist()):
            p, idx = where[b.group_uid[group]]
            scores[p][idx[rank]] = reward
    return scores


def combine_llama2(helpful: float, safety: float, is_safety_prompt: bool, threshold: float = 0.15) -> float:
    """Llama 2's R_c: the safety score if the prompt is a safety prompt or sigmoid(R_s) < threshold,
    else the helpfulness score; both compared on the sigmoid scale, returned as logits."""
    s, h = 1 / (1 + math.exp(-safety)), 1 / (1 + math.exp(-helpful))
    r = s if is_safety_prompt or s < threshold else h
    r = min(max(r, 1e-7), 1 - 1e-7)
    return math.log(r / (1 - r))


def check_reward_models(rms: dict, chat: ChatFormat) -> None:
    """Fail before any work (SystemExit, `error: ...`). rms: {option ("--rm"): checkpoint path or None}. Each
    must be a readable reward model (an LM checkpoint would get a freshly initialized head: random scores),
    know all the tokenizer's ids, and use the policy's tokenizer and chat template (`chat`)."""
    for flag, path in rms.items():
        if not path:
            continue
        try:
            config, head, _ = read_config(path)
            tokenizer_file, (template, template_file) = tokenizer_in_dir(path), template_in_dir(path)
        except (ValueError, OSError) as e:  # missing, unreadable, not a checkpoint (CheckpointError)
            raise SystemExit(f"error: {flag} {path}: {e}") from None
        if head != "reward":
            raise SystemExit(
                f"error: {flag} {path}: not a reward model (its head is {head!r}): scoring with it would use a freshly "
                "initialized reward head; pass a checkpoint from llama_posttrain/train/rm.py"
            )
        vocab = chat.tokenizer.vocab_size
        if config.vocab_size < vocab:
            raise SystemExit(f"error: {flag} {path}: the model has {config.vocab_size} ids, the tokenizer {vocab}")
        if tokenizer_file is not None and not same_tokenizer(load_tokenizer(tokenizer_file), chat.tokenizer):
            raise SystemExit(
                f"error: {flag} {path}: its tokenizer ({tokenizer_file}) is not the policy's ({chat.tokenizer.path}): "
                "it would score ids it was not trained on; use a reward model trained with the policy's tokenizer"
            )
        if template is not None and template != chat.template:
            raise SystemExit(
                f"error: {flag} {path}: its chat template is {template} ({template_file}), the policy's samples are "
                f"written in {chat.template}: it would score a layout it was not trained on; use a reward model "
                "trained with the policy's template (or give --chat-template to match it, if the policy was too)"
            )
        missing = [what for what, found in (("tokenizer", tokenizer_file), ("chat template", template)) if not found]
        if missing:
            print(
                f"{flag} {path}: holds no {' or '.join(missing)} files, so they are not compared: its samples are "
                f"scored as the policy's format writes them ({chat.tokenizer.path}, {chat.template})",
                flush=True,
            )
