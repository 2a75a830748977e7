"""Where a model's task accuracy comes from: greedy answers to the pipeline's held-out prompts, split by
problem size (two single digits vs a two-digit operand) and by whether the answer ended (its end-of-turn
token within --max-new-tokens) or was cut off. Tells learning to answer briefly from learning to add.

    python experiments/smollm2-135m/breakdown.py --prompts runs/smollm2-135m/round_0/data/eval_prompts.jsonl \\
        experiments/smollm2-135m/model runs/smollm2-135m/round_1/dpo/model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llama_posttrain.data.tasks.word_sums import operands, verify
from llama_posttrain.llama import load_model
from llama_posttrain.llama.chat import ChatFormat, resolve_chat_template
from llama_posttrain.llama.generate import decode_sample, generate
from llama_posttrain.llama.tokenizer import resolve_tokenizer


def breakdown(folder: str, prompts: list[str], max_new_tokens: int) -> dict:
    model = load_model(folder).eval()
    tok = resolve_tokenizer(None, folder, model.config.vocab_size, verbose=False)
    chat = ChatFormat(tok, resolve_chat_template(None, folder, verbose=False))
    ids = [chat.encode_dialog([{"role": "user", "content": p}], add_generation_prompt=True).tokens for p in prompts]
    with torch.no_grad():
        out = generate(model, ids, 1, max_new_tokens, chat.stop_ids, temperature=0.0, pad_id=chat.stop_ids[0])
    rows = []
    for p, (sample,) in zip(prompts, out):
        a, b = operands(p)
        text = decode_sample(tok, sample)
        rows.append(
            {"small": a < 10 and b < 10, "ended": bool(set(sample) & set(chat.stop_ids)), "right": verify(p, text)}
        )

    def acc(sel):
        sel = list(sel)
        return (sum(r["right"] for r in sel) / len(sel), len(sel)) if sel else (float("nan"), 0)

    return {
        "all": acc(rows),
        "single digits": acc(r for r in rows if r["small"]),
        "a two-digit operand": acc(r for r in rows if not r["small"]),
        "ended": acc(r for r in rows if r["ended"]),
        "cut off": acc(r for r in rows if not r["ended"]),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+")
    ap.add_argument("--prompts", required=True, help="the pipeline's eval_prompts.jsonl")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    args = ap.parse_args(argv)
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    results = {m: breakdown(m, prompts, args.max_new_tokens) for m in args.models}
    keys = list(next(iter(results.values())))
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for m, r in results.items():
        print(f"| {m} | " + " | ".join(f"{r[k][0]:.2f} ({r[k][1]})" for k in keys) + " |")


if __name__ == "__main__":
    main()
