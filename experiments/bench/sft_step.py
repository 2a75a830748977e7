"""Step time and peak memory of our SFT training step against TRL's `SFTTrainer` (padding-free).

dpo_step.py's setup (common.py): the same tiny Llama 3 (real 128256-token vocabulary, real Llama 3
tokenizer and chat template) from the same weights, the same dialogs in the same order, the same loss
(cross-entropy on the assistant tokens, the token mean over the step), the same optimizer (AdamW lr 1e-5,
betas 0.9/0.95, no weight decay, constant LR, grad clip 1.0), no activation checkpointing, the same
dialogs per optimizer step. With --checkpoint DIR both sides train that real model instead (e.g.
SmolLM2-135M-Instruct, experiments/smollm2-135m/model: 49152-token vocabulary, 30 layers) with its own
tokenizer and chat template: ours loads DIR, TRL its HF export (llama.convert), the same weights.

  ours   train.sft_objective.make_objective on an unsharded model in one process: dialogs packed first-fit into rows
         of --max-len, a block-diagonal causal mask, log-probs projected only at the target positions.
  TRL    trl.SFTTrainer with padding_free=True: the step's dialogs concatenated into one row, position
         ids restarting at each dialog (transformers builds the block-diagonal mask from them), no pad.
         A prompt-completion dataset: the loss on the completion (the assistant turn) only.
         One step is timed from the `on_step_begin` to the `on_step_end` callback.

TRL's `packing=True` (strategy bfd) turns padding-free on as well and computes the same way per token;
it only regroups the dialogs into --max-len bins, so a step would no longer hold the same dialogs as
ours. --all-tokens trains on every token on both sides (ours `sft.mask_prompt: false`, TRL
`completion_only_loss=False`): the vocabulary projection is then the same work on both.

Each side runs in its own subprocess (peak RSS, `ru_maxrss`, is its own); growth = peak at the end minus
peak after model, optimizer and data were set up. On a GPU both run there, bf16 autocast over fp32
weights (TRL `bf16=True`), memory `torch.cuda.max_memory_allocated`.

    python experiments/bench/sft_step.py --out experiments/bench/results/sft_step.md
    python experiments/bench/sft_step.py --all-tokens --out experiments/bench/results/sft_step.md
    python experiments/bench/sft_step.py --checkpoint experiments/smollm2-135m/model --warmup 1 --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import torch
from common import (
    CHILD_OPTIONS,
    OPTIM,
    add_arguments,
    add_checkpoint_argument,
    add_summary_argument,
    append_summary,
    checkpoint_config,
    counting_trainer,
    device_line,
    export_hf,
    load_notes,
    make_records,
    model_config,
    model_line,
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
    token_name,
    trl_arguments,
    trl_tokenizer,
    vocab_words,
    write,
    write_jsonl,
)

from llama_posttrain.llama import Transformer, load_model, save_model


def make_dialogs(n: int, seed: int) -> list[dict]:
    """dpo_step's records as single-turn dialogs: the prompt, then the chosen answer (~20-60 tokens)."""
    return [
        {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}]}
        for r in make_records(n, seed)
    ]


# ----------------------------------------------------------------------------- ours


def run_ours(args, device: torch.device) -> None:
    from llama_posttrain.train.sft_objective import make_objective

    work = Path(args.workdir)
    model = load_model(args.checkpoint or work / "model", device=device).train()  # fp32, the weights TRL loads too
    chat = our_chat(args.checkpoint)  # alive through the steps, as the trainer holds its tokenizer (in the peak RSS)
    loader = our_loader(work / "dialogs.jsonl", "sft", chat, args, train_on_prompt=args.all_tokens)
    objective = make_objective(model, backend="torch")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **OPTIM)
    baseline = setup_done(device, model)
    r = time_our_steps(objective, loader, params, optimizer, device, args.warmup + args.steps)
    report_side(
        "ours", device, r, r["first_loss"], baseline,
        warmup=args.warmup, micro_batches=r["micro"], targets=r["targets"],
    )  # fmt: skip


# ----------------------------------------------------------------------------- TRL


def run_trl(args, device: torch.device) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    work = Path(args.workdir)
    dialogs = read_jsonl(work / "dialogs.jsonl")
    dataset = Dataset.from_list([{"prompt": d["messages"][:1], "completion": d["messages"][1:]} for d in dialogs])
    config = SFTConfig(
        **trl_arguments(args, work, device, args.batch),
        padding_free=True,  # the step's dialogs as one row, no pad
        packing=False,  # the same dialogs per step as ours (see the module's docstring)
        max_length=None,  # padding-free without packing requires it; nothing is over --max-len (ours checks)
        completion_only_loss=not args.all_tokens,
    )
    times, cpu_times, tokens, padded, targets, losses = [], [], [], [], [], []
    trainer = counting_trainer(SFTTrainer, tokens, padded, losses, targets)(
        model=str(work / "model"),  # loaded in float32 (the checkpoint's dtype)
        args=config,
        train_dataset=dataset,
        processing_class=trl_tokenizer(work / "model" if args.checkpoint else None),
        callbacks=[step_timer(device, times, cpu_times)],
    )

    # The token ids and target positions TRL trains on against ours, for the same dialogs (not timed).
    chat = our_chat(args.checkpoint)
    same_ids = same_targets = True
    only_trl, only_ours = Counter(), Counter()  # the tokens at the target positions one side has and not the other
    for d, row in zip(dialogs, trainer.train_dataset):
        enc = chat.encode_dialog(d["messages"])
        ours = [i for i, t in enumerate(enc.is_target) if t] if not args.all_tokens else list(range(1, len(enc)))
        theirs = [i for i, t in enumerate(row["labels"]) if t != -100 and i > 0]
        same_ids &= row["input_ids"] == enc.tokens
        same_targets &= theirs == ours
        only_trl.update(chat.tokenizer.decode([row["input_ids"][i]]) for i in sorted(set(theirs) - set(ours)))
        only_ours.update(chat.tokenizer.decode([enc.tokens[i]]) for i in sorted(set(ours) - set(theirs)))

    baseline = setup_done(device, trainer.model)
    trainer.train()
    r = dict(times=times, cpu_times=cpu_times, tokens=tokens, padded=padded)
    report_side(
        "trl", device, r, float(losses[0]), baseline,
        warmup=args.warmup, same_ids=same_ids, same_targets=same_targets, targets=targets,
        only_trl=dict(only_trl), only_ours=dict(only_ours),
    )  # fmt: skip


# ----------------------------------------------------------------------------- parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(
        ap,
        batch="dialogs per optimizer step",
        records="dialogs in the data set",
        max_len="ours: packed row length (TRL: no limit, none is over)",
    )
    ap.add_argument("--all-tokens", action="store_true", help="every token a target on both sides")
    add_checkpoint_argument(ap)
    add_summary_argument(ap)
    args = ap.parse_args()
    if run_side(args, run_ours, run_trl):
        return
    device = torch.device(args.device)

    load_before = os.getloadavg()[0]  # other work on the machine skews the times: see cpu_per_wall too
    config = checkpoint_config(args.checkpoint) if args.checkpoint else model_config(args)
    dialogs = make_dialogs(args.records, seed=0)
    with tempfile.TemporaryDirectory() as workdir:
        if args.checkpoint:
            export_hf(args.checkpoint, Path(workdir) / "model")
        else:
            torch.manual_seed(0)
            save_model(Transformer(config), Path(workdir) / "model", format="hf")
        write_jsonl(Path(workdir) / "dialogs.jsonl", dialogs)
        results = run_sides(__file__, ["ours", "trl"], args, workdir, (*CHILD_OPTIONS, "all_tokens", "checkpoint"))
    ours, theirs = results["ours"], results["trl"]

    chat = our_chat(args.checkpoint)
    lengths = [len(chat.encode_dialog(d["messages"])) for d in dialogs]
    cuda = device.type == "cuda"
    w = args.warmup
    what = "every token" if args.all_tokens else f"the assistant turn (content and {token_name(chat, chat.eot_id)})"
    header = [
        *title("SFT", "experiments/bench/sft_step.py"),
        "",
        device_line(device, {"ours": ours, "TRL": theirs}),
        "",
        f"{model_line(config, args.checkpoint)}, "
        f"{'fp32 weights + bf16 autocast' if cuda else 'float32'}; data: {args.records} single-turn dialogs of "
        f"{min(lengths)}-{max(lengths)} tokens, loss on {what}; {args.batch} dialogs per step "
        f"(targets per step: {statistics.mean(ours['targets'][w:]):,.0f}), median of {args.steps} timed steps after "
        f"{w} warm-up steps",
        "",
    ]
    rows = [
        side_row("ours (train.sft)", ours, w, args.batch),
        side_row("TRL SFTTrainer, padding-free", theirs, w, args.batch),
    ]
    micro = "/".join(map(str, sorted(set(ours["micro_batches"]))))
    differ = ""
    if not theirs["same_targets"]:
        differ = (
            f" (target tokens only TRL trains on, with counts: {theirs['only_trl']}; only ours: {theirs['only_ours']})"
        )
    notes = [
        "",
        *load_notes({"ours": ours, "TRL": theirs}, load_before, device),
        f"first-step loss (the same weights, the token mean of -log p over the step's targets on both sides): ours "
        f"{ours['first_loss']:.5f}, TRL {theirs['first_loss']:.5f}",
        "",
        "notes:",
        f"- same token ids on both sides (TRL's tokenized prompt+completion == our chat format): "
        f"{'yes' if theirs['same_ids'] else 'NO'}; same target positions: {'yes' if theirs['same_targets'] else 'NO'}"
        f"{differ}; "
        f"targets per step ours/TRL {sum(ours['targets'])}/{sum(theirs['targets'])} over all steps; the same dialogs "
        "in the same order each step (no shuffling). tokens/step: non-pad tokens through the forward, the same on both.",
        f"- ours: rows of up to {args.max_len} tokens, {args.tokens_per_microbatch} tokens per micro-batch ({micro} "
        "micro-batch(es) per step), attention one document at a time on the CPU (llama/segments.py), log-probs projected "
        f"through the {vocab_words(config)} vocabulary only at target positions (chunked, `kernels` torch backend).",
        "- TRL: padding_free=True (packing=False, max_length=None): one row of all the step's tokens, position ids "
        "restarting per dialog; transformers turns them into a block-diagonal mask for SDPA. Its fused LM head "
        + (
            "scores only the target positions with its Triton kernel"
            if cuda
            else "on the CPU (no Triton) projects every position of the row, prompt included"
        )
        + ", and computes entropy and top-1 accuracy per token for its metrics.",
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
    rows = table(rows, rows[-1], device, {"records/s": "dialogs/s"})
    write("\n".join(header + rows + notes), args.out)
    benchmark = "SFT step" + " (every token)" * args.all_tokens
    append_summary(
        args.summary,
        benchmark,
        [
            step_summary("ours (train.sft)", ours, w, args.batch, "dialogs/s"),
            step_summary("TRL SFTTrainer, padding-free", theirs, w, args.batch, "dialogs/s", peer=True),
        ],
    )


if __name__ == "__main__":
    main()
