"""Rejection sampling: K samples per prompt from the policy, scored by reward model(s), best kept.

    torchrun --nproc_per_node 8 train/sample.py --policy runs/r1/dpo/model --rm runs/r1/rm/model \\
        --prompts prompts.jsonl --k 16 --out-sft sft_r2.jsonl --out-pairs pairs_r2.jsonl

Each prompt is prefilled once and fanned out to K samples (llama/generate.py). The K samples are
scored in one reward row per prompt, [prompt][s_1]...[s_K], each sample seeing only the prompt
(data/rows.py), so the prompt is computed once there too. Outputs:
- SFT records: the prompt + the best sample (after the optional filters), with every score;
- preference records from the samples: best vs worst by the annotator's scores (a verifier for
  synthetic tasks, labels imported from a file, or the reward model), or all samples written as
  sets to annotate (`--out-sets`), whose labels come back with `--annotate file:labels.jsonl`.
With `--safety-rm`, scores combine as in Llama 2: the safety score where the prompt is marked
`"safety": true` or the sample looks unsafe (sigmoid(safety) < 0.15), the helpfulness score elsewhere.
Each rank takes every world_size-th prompt; rank 0 writes the files in prompt order.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from data.loader import read_records
from data.rows import build_group, encode_response, pack
from data.schema import ValidationError, parse_prompt
from llama import load_model
from llama.chat import ChatFormat
from llama.generate import generate
from llama.tokenizer import DEFAULT_TOKENIZER, load_tokenizer


def read_prompts(path) -> list[dict]:
    """JSONL records with a "prompt" (text or messages) and any other fields, kept as metadata."""
    out = []
    for where, obj in read_records(path):
        if isinstance(obj, ValidationError):
            raise obj
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise ValidationError(f"{where}: prompt: missing (a prompt record is an object with a 'prompt')")
        out.append({**obj, "messages": parse_prompt(obj["prompt"], where)})
    return out


@torch.no_grad()
def sample(policy, chat: ChatFormat, prompts: list[list[dict]], k: int, max_new_tokens: int, batch: int = 64, **kw):
    """-> texts[p][j], finished[p][j]: K decoded samples per prompt and whether each hit a stop token."""
    tok = chat.tokenizer
    texts, finished = [], []
    for start in range(0, len(prompts), batch):
        ids = [chat.encode_dialog(m, add_generation_prompt=True).tokens for m in prompts[start : start + batch]]
        out = generate(policy, ids, k, max_new_tokens, tok.stop_ids, pad_id=tok.pad_id, **kw)
        for samples in out:
            texts.append([tok.decode([t for t in s if t not in tok.stop_ids]) for s in samples])
            finished.append([bool(s) and s[-1] in tok.stop_ids for s in samples])
    return texts, finished


@torch.no_grad()
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
        rewards = rm(b.tokens, b.positions, b.doc_ids, b.branch_ids).flatten()[b.seq_score_index].float().tolist()
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


# ----------------------------------------------------------------------------- annotators


def verifier_annotator(verify: Callable[[str, str], bool]):
    """Scores 1 / 0 from a checker of (prompt text, response)."""
    return lambda record, texts: [float(verify(record["messages"][-1]["content"], t)) for t in texts]


def file_annotator(path):
    """Labels imported from a JSONL file of {"id": ..., "scores": [...]} or {"id": ..., "ranking": [best, ...]}."""
    labels = {}
    for where, obj in read_records(path):
        if isinstance(obj, ValidationError):
            raise obj
        if "id" not in obj or not ("scores" in obj or "ranking" in obj):
            raise ValidationError(f"{where}: id/scores: a label needs an 'id' and 'scores' or 'ranking'")
        if "ranking" in obj:
            n = len(obj["ranking"])
            scores = [0.0] * n
            for rank, j in enumerate(obj["ranking"]):
                scores[j] = float(n - rank)
            obj = {**obj, "scores": scores}
        labels[obj["id"]] = obj["scores"]

    def annotate(record, texts):
        if record.get("id") not in labels:
            raise KeyError(f"{path}: no label for prompt id {record.get('id')!r}")
        return labels[record["id"]]

    return annotate


def preference_pair(record: dict, texts: list[str], scores: list[float]) -> dict | None:
    """Best vs worst distinct sample by score; None if there is no strict preference."""
    order = sorted(range(len(texts)), key=lambda j: -scores[j])
    best, worst = order[0], order[-1]
    if scores[best] <= scores[worst] or texts[best].strip() == texts[worst].strip():
        return None
    out = {"prompt": record["messages"], "chosen": texts[best], "rejected": texts[worst]}
    out["scores"] = [scores[best], scores[worst]]
    return out


def filter_ok(text: str, finished: bool, max_chars: int | None) -> bool:
    """Heuristic filters: the sample ended its turn, is not empty, and is not too long."""
    return finished and bool(text.strip()) and (max_chars is None or len(text) <= max_chars)


# ----------------------------------------------------------------------------- driver


def rejection_sample(
    records, policy, rm, chat, k, max_new_tokens, generator, temperature=1.0, top_p=1.0, top_k=0,
    safety_rm=None, annotate=None, max_chars=None, max_len=4096,
):  # fmt: skip
    """-> (SFT records, preference records, sets to annotate) for this rank's records."""
    prompts = [r["messages"] for r in records]
    texts, finished = sample(
        policy, chat, prompts, k, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
    )
    helpful = score(rm, chat, prompts, texts, max_len) if rm is not None else [[0.0] * k for _ in prompts]
    if safety_rm is not None:
        safety = score(safety_rm, chat, prompts, texts, max_len)
        helpful = [
            [combine_llama2(h, s, bool(r.get("safety"))) for h, s in zip(hs, ss)]
            for r, hs, ss in zip(records, helpful, safety)
        ]
    sft, pairs, sets = [], [], []
    for r, ts, fs, ss in zip(records, texts, finished, helpful):
        keep = [j for j in range(k) if filter_ok(ts[j], fs[j], max_chars)]
        meta = {key: v for key, v in r.items() if key not in ("prompt", "messages")}
        if keep:
            best = max(keep, key=lambda j: ss[j])
            messages = r["messages"] + [{"role": "assistant", "content": ts[best]}]
            sft.append({"messages": messages, "score": ss[best], "scores": ss, **meta})
        sets.append({"prompt": r["messages"], "responses": ts, "finished": fs, "rm_scores": ss, **meta})
        labels = annotate(r, ts) if annotate is not None else ss
        pair = preference_pair(r, [ts[j] for j in keep], [labels[j] for j in keep]) if len(keep) >= 2 else None
        if pair is not None:
            pairs.append({**pair, **meta})
    return sft, pairs, sets


def write_jsonl(path, records) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def _annotator(spec: str | None):
    if spec is None or spec == "rm":
        return None
    kind, _, arg = spec.partition(":")
    if kind == "verifier" and arg == "arithmetic":
        from data.tasks.arithmetic import verify

        return verifier_annotator(verify)
    if kind == "file":
        return file_annotator(arg)
    raise ValueError(f"--annotate must be rm, verifier:arithmetic or file:PATH, got {spec!r}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", required=True)
    ap.add_argument("--rm", help="reward model checkpoint (helpfulness)")
    ap.add_argument("--safety-rm", help="safety reward model, combined as in Llama 2")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-chars", type=int)
    ap.add_argument("--annotate", help="rm (default) | verifier:arithmetic | file:labels.jsonl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-sft")
    ap.add_argument("--out-pairs")
    ap.add_argument("--out-sets")
    args = ap.parse_args(argv)

    world, rank = int(os.environ.get("WORLD_SIZE", 1)), 0
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
    device = torch.device("cuda", rank % max(1, torch.cuda.device_count())) if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    chat = ChatFormat(load_tokenizer(args.tokenizer))
    records = read_prompts(args.prompts)
    policy = load_model(args.policy, head="lm", dtype=dtype, device=device).eval()
    rm = load_model(args.rm, head="reward", dtype=dtype, device=device).eval() if args.rm else None
    safety = load_model(args.safety_rm, head="reward", dtype=dtype, device=device).eval() if args.safety_rm else None
    generator = torch.Generator(device).manual_seed(args.seed * 1000 + rank)
    mine = [{**r, "_order": i} for i, r in enumerate(records)][rank::world]
    out = rejection_sample(
        mine, policy, rm, chat, args.k, args.max_new_tokens, generator, args.temperature, args.top_p, args.top_k,
        safety, _annotator(args.annotate), args.max_chars,
    )  # fmt: skip
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        dist.destroy_process_group()
    else:
        gathered = [out]
    if rank == 0:
        for i, path in enumerate((args.out_sft, args.out_pairs, args.out_sets)):
            if path:  # back into prompt order
                merged = sorted((rec for g in gathered for rec in g[i]), key=lambda rec: rec["_order"])
                write_jsonl(path, [{k: v for k, v in rec.items() if k != "_order"} for rec in merged])
        print(
            json.dumps(
                {
                    "prompts": len(records),
                    "sft": sum(len(g[0]) for g in gathered),
                    "pairs": sum(len(g[1]) for g in gathered),
                }
            )
        )


if __name__ == "__main__":
    main()
