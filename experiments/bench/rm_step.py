"""Step time and peak memory of our reward-model training step against TRL's `RewardTrainer`.

dpo_step.py's setup (common.py): the same tiny Llama 3 with a scalar reward head (real 128256-token
vocabulary, real Llama 3 tokenizer and chat template) from the same weights, the same ranked responses,
the same loss (Bradley-Terry over every ranked pair of a prompt's k responses, the mean over the step's
pairs, no margin), the same optimizer (AdamW lr 1e-5, betas 0.9/0.95, no weight decay, constant LR,
grad clip 1.0), no activation checkpointing, the same pairs per optimizer step:

  ours        train.rm_objective.make_objective on an unsharded model in one process: each prompt and its k responses
              as one row [prompt][r_a][r_b]...[r_k] (Llama 3), the prompt computed once, a reward read
              at each response's last token; all k(k-1)/2 pairs of the row in the loss.
  ours, separate rows   the same with `rm.one_row: false` (each response after its own prompt copy):
              what the one-row layout saves, on our side.
  TRL         trl.RewardTrainer on the same pairs, k(k-1)/2 (prompt, chosen, rejected) records per
              prompt: each pair as two padded rows, prompt+chosen and prompt+rejected, so a prompt
              is computed k(k-1) times. One step is timed from `on_step_begin` to `on_step_end`.

Each side runs in its own subprocess (peak RSS, `ru_maxrss`, is its own); growth = peak at the end minus
peak after model, optimizer and data were set up. On a GPU all run there, bf16 autocast over fp32 weights
(TRL `bf16=True`), memory `torch.cuda.max_memory_allocated`.

    python experiments/bench/rm_step.py --out experiments/bench/results/rm_step.md
    python experiments/bench/rm_step.py --responses 2 --out experiments/bench/results/rm_step.md  # pairs only
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from itertools import combinations
from pathlib import Path

import torch
from common import (
    CHILD_OPTIONS,
    OPTIM,
    _sentences,
    add_arguments,
    add_summary_argument,
    append_summary,
    counting_trainer,
    device_line,
    load_notes,
    model_config,
    our_chat,
    our_loader,
    read_jsonl,
    report_side,
    run_side,
    run_sides,
    setup_done,
    side_row,
    step_summary,
    step_timer,
    table,
    time_our_steps,
    title,
    trl_arguments,
    trl_tokenizer,
    write,
    write_jsonl,
)

from llama_posttrain.llama import Transformer, load_model, save_model

SIDES = {"ours": "ours (train.rm, one row)", "ours_separate": "ours, separate rows", "trl": "TRL RewardTrainer"}


def make_ranked(n: int, k: int, seed: int) -> list[dict]:
    """dpo_step's prompts (~100-200 tokens of filler text + an addition), k answers (~15-60 tokens) ranked best first:
    correct and explained, correct, off by a little, off by a lot, then more wrong ones."""
    records = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        prompt = f"{_sentences(rng, rng.randint(80, 170))}\n\nIgnore the text above. What is {a} + {b}?"
        answers = [f"{a} + {b} = {a + b}. Adding column by column with carries gives it.", f"{a} + {b} = {a + b}."]
        answers += [f"{a} + {b} = {a + b + d}." for d in (1, 100, -10, 10, -100, 1000)]
        if k > len(answers):
            raise SystemExit(f"--responses at most {len(answers)}")
        responses = [f"{answer} {_sentences(rng, rng.randint(5, 40))}" for answer in answers[:k]]
        records.append({"prompt": prompt, "responses": responses})
    return records


# ----------------------------------------------------------------------------- ours


def run_ours(args, device: torch.device) -> None:
    from llama_posttrain.train.rm_objective import make_objective

    work = Path(args.workdir)
    model = load_model(work / "model", device=device).train()  # fp32 reward model, the weights TRL loads too
    chat = our_chat()  # alive through the steps, as the trainer holds its tokenizer (in the peak RSS)
    loader = our_loader(work / "ranked.jsonl", "rm", chat, args, one_row=args.side == "ours")
    objective = make_objective(model, margin=None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **OPTIM)
    baseline = setup_done(device, model)
    r = time_our_steps(objective, loader, params, optimizer, device, args.warmup + args.steps)
    report_side(
        args.side, device, r, r["first_loss"], baseline,
        warmup=args.warmup, micro_batches=r["micro"], pairs=r["first_step"].num_pairs,
    )  # fmt: skip


# ----------------------------------------------------------------------------- TRL


def run_trl(args, device: torch.device) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from llama_posttrain.data.rows import encode_response

    work = Path(args.workdir)
    records = read_jsonl(work / "ranked.jsonl")
    pairs = [
        {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["responses"][i]}],
            "rejected": [{"role": "assistant", "content": r["responses"][j]}],
        }
        for r in records
        for i, j in combinations(range(len(r["responses"])), 2)
    ]
    per_prompt = len(pairs) // len(records)
    config = RewardConfig(
        **trl_arguments(args, work, device, args.batch * per_prompt),  # the pairs of args.batch prompts
        max_length=args.max_len,
        center_rewards_coefficient=None,
    )
    times, cpu_times, tokens, padded, losses = [], [], [], [], []
    trainer = counting_trainer(RewardTrainer, tokens, padded, losses)(
        model=str(work / "model"),  # a LlamaForSequenceClassification checkpoint, float32: our score head's weights
        args=config,
        train_dataset=Dataset.from_list(pairs),
        processing_class=trl_tokenizer(),
        callbacks=[step_timer(device, times, cpu_times)],
    )

    # The token ids TRL trains on against ours, for the same pairs (not timed).
    chat = our_chat()
    same_ids = len(trainer.train_dataset) == len(pairs)
    for p, row in zip(pairs, trainer.train_dataset):
        prompt = chat.encode_dialog(p["prompt"], add_generation_prompt=True).tokens
        chosen, rejected = (prompt + encode_response(chat, p[k]).tokens for k in ("chosen", "rejected"))
        same_ids &= (row["chosen_ids"], row["rejected_ids"]) == (chosen, rejected)

    baseline = setup_done(device, trainer.model)
    trainer.train()
    r = dict(times=times, cpu_times=cpu_times, tokens=tokens, padded=padded)
    report_side(
        "trl", device, r, float(losses[0]), baseline,
        warmup=args.warmup, same_ids=same_ids, pairs=args.batch * per_prompt,
    )  # fmt: skip


# ----------------------------------------------------------------------------- parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(
        ap,
        batch="prompts per optimizer step (TRL: their pairs)",
        records="prompts in the data set",
        max_len="ours: packed row length; TRL: max_length",
        threads="torch.set_num_threads in all children",
        sides=tuple(SIDES),
    )
    ap.add_argument("--responses", type=int, default=4, help="ranked responses per prompt (k)")
    ap.add_argument("--no-separate", action="store_true", help="skip the 'ours, separate rows' side")
    add_summary_argument(ap)
    args = ap.parse_args()
    if run_side(args, run_ours, run_trl):
        return
    device = torch.device(args.device)

    load_before = os.getloadavg()[0]  # other work on the machine skews the times: see cpu_per_wall too
    config = model_config(args)
    records = make_ranked(args.records, args.responses, seed=0)
    sides = [s for s in SIDES if not (args.no_separate and s == "ours_separate")]
    with tempfile.TemporaryDirectory() as workdir:
        torch.manual_seed(0)
        model = Transformer(config, head="reward")
        n_params = sum(p.numel() for p in model.parameters())
        save_model(model, Path(workdir) / "model", format="hf")
        del model
        write_jsonl(Path(workdir) / "ranked.jsonl", records)
        results = run_sides(__file__, sides, args, workdir, CHILD_OPTIONS)
    ours, theirs = results["ours"], results["trl"]

    from llama_posttrain.data.rows import encode_response

    chat = our_chat()
    prompt_lens = [len(chat.encode_dialog([{"role": "user", "content": r["prompt"]}], True)) for r in records]
    resp_lens = [
        len(encode_response(chat, [{"role": "assistant", "content": x}])) for r in records for x in r["responses"]
    ]
    cuda = device.type == "cuda"
    w, k = args.warmup, args.responses
    per_step = theirs["pairs"]
    header = [
        *title("Reward model", "experiments/bench/rm_step.py"),
        "",
        device_line(device, {SIDES[s].split(" (")[0]: results[s] for s in sides}),
        "",
        f"model: dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads / {config.n_kv_heads} kv, "
        f"ffn {config.ffn_dim}, vocab {config.vocab_size}, scalar reward head, {n_params / 1e6:.1f}M params, "
        f"{'fp32 weights + bf16 autocast' if cuda else 'float32'}; data: "
        f"{args.records} prompts of {min(prompt_lens)}-{max(prompt_lens)} tokens, each with {k} ranked responses of "
        f"{min(resp_lens)}-{max(resp_lens)} tokens = {k * (k - 1) // 2} pairs; {args.batch} prompts = {per_step} "
        f"pairs per step, median of {args.steps} timed steps after {w} warm-up steps",
        "",
    ]
    rows = [side_row(SIDES[s], results[s], w, per_step, ours["tokens"]) for s in sides]
    micro = "/".join(map(str, sorted(set(ours["micro_batches"]))))
    notes = [
        "",
        *load_notes({SIDES[s].split(" (")[0]: results[s] for s in sides}, load_before, device),
        "first-step loss (the same weights; the mean over the step's pairs of -log sigmoid(r_better - r_worse) on "
        "every side): " + ", ".join(f"{SIDES[s]} {results[s]['first_loss']:.6f}" for s in sides),
        "",
        "notes:",
        f"- same token ids (TRL's tokenized prompt+chosen and prompt+rejected == our chat format's prompt + "
        f"response): {'yes' if theirs['same_ids'] else 'NO'}; the same prompts in the same order each step, "
        f"and on every side all {k * (k - 1) // 2} pairs of each (ours: pairs/step {ours['pairs']}, TRL {per_step}).",
        "- tokens/step: non-pad tokens through the forward, each side's own (TRL's count every prompt once per row, "
        f"{k * (k - 1)} rows per prompt); data tokens/s: the records' tokens (each prompt and each response once, "
        "ours' tokens/step) over each side's time, so its ratio is the throughput ratio.",
        f"- ours: rows of up to {args.max_len} tokens, {args.tokens_per_microbatch} tokens per micro-batch ({micro} "
        "micro-batch(es) per step), attention one document at a time on the CPU (llama/segments.py; prompt branch 0, "
        "response j branch j: a response sees the prompt and itself), responses shuffled within the row (seeded), the fp32 scalar head on "
        "every position, rewards read at each response's last token.",
        "- TRL: RewardTrainer, AutoModelForSequenceClassification (LlamaForSequenceClassification, num_labels 1, "
        "the same score weight), chosen rows then rejected rows padded to the longest of the step, the reward read at "
        "each row's last non-pad token; it also gathers min/mean/max reward, accuracy and margin per step.",
        "- optimizer: torch fused AdamW (TRL `optim=adamw_torch_fused`), lr 1e-5 constant, betas 0.9/0.95, no weight decay, grad "
        "clip 1.0; TRL's default gradient checkpointing is off to match ours.",
        "- memory: each side in its own process. "
        + (
            "torch.cuda.max_memory_allocated over the run; growth = peak minus the peak after setup."
            if cuda
            else "Peak RSS includes the Python libraries each side imports (TRL: transformers, datasets, accelerate); "
            "growth = peak RSS at the end minus peak RSS after model, data (and for ours the optimizer object) were "
            "set up, i.e. what the training steps added (gradients, AdamW state, activations)."
        ),
    ]
    rows = table(rows, rows[-1], device, {"records/s": "pairs/s"})
    write("\n".join(header + rows + notes), args.out)
    append_summary(
        args.summary,
        "RM step",
        [step_summary(SIDES[s], results[s], w, per_step, "pairs/s", peer=s == "trl") for s in sides],
    )


if __name__ == "__main__":
    main()
