"""Step time and peak memory of our DPO training step against TRL's `DPOTrainer`.

Both sides train the same tiny Llama 3 (real 128256-token vocabulary, so both use the real Llama 3
tokenizer and chat template) from the same weights, on the same preference pairs, in the same order,
with the same loss recipe (sigmoid DPO, beta 0.1, plus 0.2 x NLL on chosen), the same optimizer
(AdamW lr 1e-5, betas 0.9/0.95, no weight decay, constant LR, grad clip 1.0), no activation
checkpointing, and the same number of pairs per optimizer step. With --checkpoint DIR both train that
real model instead (e.g. SmolLM2-135M-Instruct, experiments/smollm2-135m/model: 49152-token vocabulary,
30 layers) with its own tokenizer and chat template: ours loads DIR, TRL its HF export (llama.convert).

  ours   train.dpo_objective.make_objective on unsharded models in one process: [prompt][chosen][rejected] packed
         rows, the prompt computed once, log-probs projected only at the target positions;
         one step = forward/backward of each micro-batch, clip, AdamW step, zero_grad.
  TRL    trl.DPOTrainer: each pair as two padded rows, prompt+chosen and prompt+rejected.
         One step is timed from the `on_step_begin` to the `on_step_end` callback.

Each side runs in its own subprocess, so that its peak RSS (`ru_maxrss`) is its own; the growth
column is peak RSS at the end minus peak RSS after the model, reference, optimizer and data are set
up. On a GPU (`torch.cuda.is_available()`) both sides run there with bf16 autocast over fp32
weights (TRL: `bf16=True`) and memory is `torch.cuda.max_memory_allocated`.

    python experiments/bench/dpo_step.py --out experiments/bench/results/dpo_step.md
    python experiments/bench/dpo_step.py --warmup 1 --steps 3      # quicker
    python experiments/bench/dpo_step.py --checkpoint experiments/smollm2-135m/model --warmup 1 --steps 3
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import tempfile
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
    report,
    run_child,
    run_side,
    setup_done,
    step_summary,
    step_timer,
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

# ----------------------------------------------------------------------------- ours


def run_ours(args, device: torch.device) -> None:
    import copy

    from llama_posttrain.train.dpo import DPOSection
    from llama_posttrain.train.dpo_objective import make_objective
    from llama_posttrain.train.targets import LiveReference, PrecomputedReference, reference_table

    work = Path(args.workdir)
    model = load_model(args.checkpoint or work / "model", device=device)  # fp32, the weights TRL loads too
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    chat = our_chat(args.checkpoint)  # alive through the steps, as the trainer holds its tokenizer (in the peak RSS)
    loader = our_loader(work / "pairs.jsonl", "dpo", chat, args)
    section = DPOSection()
    if args.reference == "precompute":  # as train/dpo_objective.py: one pass over the set, then the model freed
        reference = PrecomputedReference(reference_table(ref, loader, "torch", section.mask_format, device))
        del ref
        gc.collect()
        ref = None
    else:
        reference = LiveReference(ref, "torch")
    objective = make_objective(model, reference, section, backend="torch")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **OPTIM)
    baseline = setup_done(device, model, ref)
    r = time_our_steps(objective, loader, params, optimizer, device, args.warmup + args.steps)
    report(
        "ours", device, r["times"], r["cpu_times"], r["tokens"], r["padded"], r["first_loss"], baseline,
        warmup=args.warmup, micro_batches=r["micro"],
        first_loss_trl_norm=None if ref is None else first_loss_trl_norm(ref, r["first_step"], device),
    )  # fmt: skip


def first_loss_trl_norm(ref, first_step, device: torch.device) -> float:
    """The first step's loss as TRL normalizes it: policy == reference there, so the DPO term is log 2
    on both sides; TRL's NLL is the token mean over all chosen tokens of the batch, ours the mean of
    per-sequence means. `ref` holds the initial weights (a live reference; a precomputed one was freed)."""
    from llama_posttrain.train.targets import Pairs, target_logps

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    nll_sum, nll_count = 0.0, 0.0
    with torch.no_grad(), autocast:
        for mb in first_step.micro_batches:
            mb = mb.to(device)

            def head(h, w, batch=mb):
                return target_logps(h, w, batch, "torch")

            logps = ref(mb.tokens, mb.positions, mb.doc_ids, mb.branch_ids, head_fn=head)
            policy = Pairs(mb).policy(logps.float())
            nll, count = policy.chosen_nll, policy.chosen_nll_tokens
            nll_sum, nll_count = nll_sum + float(nll.sum()), nll_count + float(count.sum())
    return math.log(2) + 0.2 * nll_sum / nll_count


# ----------------------------------------------------------------------------- TRL


def run_trl(args, device: torch.device) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from llama_posttrain.data.rows import encode_response

    work = Path(args.workdir)
    records = read_jsonl(work / "pairs.jsonl")
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in records
        ]
    )
    config = DPOConfig(
        **trl_arguments(args, work, device, args.batch),
        beta=0.1,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.2],
        max_length=args.max_len,
        precompute_ref_log_probs=args.reference == "precompute",  # then no reference model is loaded
    )
    times, cpu_times, tokens, padded, losses = [], [], [], [], []
    trainer = counting_trainer(DPOTrainer, tokens, padded, losses)(
        model=str(work / "model"),  # loaded with dtype float32; the reference is a second load of it
        args=config,
        train_dataset=dataset,
        processing_class=trl_tokenizer(work / "model" if args.checkpoint else None),
        callbacks=[step_timer(device, times, cpu_times)],
    )

    # The token ids TRL trains on against ours, for the same records (outside the measured steps).
    chat = our_chat(args.checkpoint)
    same_ids = True
    for r, row in zip(records, trainer.train_dataset):
        prompt = chat.encode_dialog([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True).tokens
        chosen = encode_response(chat, [{"role": "assistant", "content": r["chosen"]}]).tokens
        rejected = encode_response(chat, [{"role": "assistant", "content": r["rejected"]}]).tokens
        same_ids &= (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (prompt, chosen, rejected)

    baseline = setup_done(device, trainer.model, trainer.ref_model)
    trainer.train()
    report(
        "trl", device, times, cpu_times, tokens, padded, float(losses[0]), baseline,
        warmup=args.warmup, same_ids=same_ids,
    )  # fmt: skip


# ----------------------------------------------------------------------------- parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(
        ap,
        batch="preference pairs per optimizer step",
        records="preference pairs in the data set",
        max_len="ours: packed row length; TRL: max_length",
        repeat=False,
    )
    ap.set_defaults(max_len=512)  # an example is 173-306 tokens here: rows of ~2 (1024: 3-4, more masked scores)
    ap.add_argument(
        "--reference", choices=("live", "precompute", "both"), default="both",
        help="live: the reference model's forward in every step (ours: LiveReference; TRL: ref_model); precompute: "
        "its log-probs computed once before training, the model freed (ours: dpo.reference precompute; TRL: "
        "precompute_ref_log_probs=True); both: a pair of rows each",
    )  # fmt: skip
    add_checkpoint_argument(ap)
    add_summary_argument(ap)
    args = ap.parse_args()
    if run_side(args, run_ours, run_trl):
        return
    device = torch.device(args.device)
    modes = ("live", "precompute") if args.reference == "both" else (args.reference,)

    load_before = os.getloadavg()[0]  # other work on the machine skews the times: see cpu_per_wall too
    config = checkpoint_config(args.checkpoint) if args.checkpoint else model_config(args)
    records = make_records(args.records, seed=0)
    with tempfile.TemporaryDirectory() as workdir:
        if args.checkpoint:
            export_hf(args.checkpoint, Path(workdir) / "model")
        else:
            torch.manual_seed(0)
            save_model(Transformer(config), Path(workdir) / "model", format="hf")
        write_jsonl(Path(workdir) / "pairs.jsonl", records)
        sides = {}  # mode -> (ours, TRL's)
        for mode in modes:
            args.reference = mode
            sides[mode] = tuple(
                run_child(__file__, side, args, workdir, (*CHILD_OPTIONS, "checkpoint", "reference"))
                for side in ("ours", "trl")
            )
    ours, theirs = sides[modes[0]]

    chat = our_chat(args.checkpoint)
    prompt_lens = [len(chat.encode_dialog([{"role": "user", "content": r["prompt"]}], True)) for r in records]
    resp_lens = [len(chat.tokenizer.encode(r[k])) + 1 for r in records for k in ("chosen", "rejected")]

    cuda = device.type == "cuda"
    mem = "peak allocated (GiB)" if cuda else "peak RSS (GiB)"
    name, _, command = title("DPO", "experiments/bench/dpo_step.py")
    header = [
        name,
        "",
        device_line(device, {"ours": ours, "TRL": theirs}),
        command,
        "",
        f"{model_line(config, args.checkpoint)}, "
        f"{'fp32 weights + bf16 autocast' if cuda else 'float32'}; data: {args.records} pairs, prompts "
        f"{min(prompt_lens)}-{max(prompt_lens)} tokens, responses {min(resp_lens)}-{max(resp_lens)} tokens; "
        f"{args.batch} pairs per step, median of {args.steps} timed steps after {args.warmup} warm-up steps",
        "",
    ]
    rows = [
        f"| side | reference | median step (s) | min-max (s) | tokens/step | positions/step (padded) | tokens/s "
        f"| pairs/s | {mem} | growth over setup (GiB) | step time vs ours | {mem.split(' (')[0]} vs ours |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"live": "model, every step", "precompute": "precomputed, model freed"}
    in_order = [(m, label, r) for m in modes for label, r in zip(("ours (train.dpo)", "TRL DPOTrainer"), sides[m])]
    for mode, label, r in in_order:
        base = sides[mode][0]
        timed_tokens = r["tokens"][args.warmup :]
        tok_per_step = statistics.mean(timed_tokens)
        pad_per_step = statistics.mean(r["padded"][args.warmup :])
        rows.append(
            f"| {label} | {labels[mode]} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} "
            f"| {tok_per_step:,.0f} | {pad_per_step:,.0f} | {sum(timed_tokens) / sum(r['step_times'][args.warmup :]):,.0f} "
            f"| {args.batch / r['median_s']:.2f} | {r['peak_gib']:.2f} | {r['peak_gib'] - r['baseline_gib']:.2f} "
            f"| {r['median_s'] / base['median_s']:.2f}x | {r['peak_gib'] / base['peak_gib']:.2f}x |"
        )
    micro = sorted(set(ours["micro_batches"]))
    notes = [
        "",
        *load_notes(
            {f"{side} ({mode})": r for mode in modes for side, r in zip(("ours", "TRL"), sides[mode])},
            load_before,
            device,
        ),
        f"first-step loss (initial weights, policy = reference, so the DPO term is log 2 = 0.693 on both): "
        f"ours {ours['first_loss']:.4f}, TRL {theirs['first_loss']:.4f}"
        + (
            f"; ours recomputed with TRL's NLL normalization {ours['first_loss_trl_norm']:.4f}"
            if ours["first_loss_trl_norm"] is not None
            else ""
        ),
        "",
        "notes:",
        f"- same token ids on both sides (TRL's tokenized prompt/chosen/rejected == our chat format): "
        f"{'yes' if theirs['same_ids'] else 'NO'}; the same pairs in the same order each step (no shuffling).",
        "- tokens/step: non-pad tokens through the policy forward. Ours packs [prompt][chosen][rejected] and computes "
        "the prompt once; TRL runs prompt+chosen and prompt+rejected as two rows, so it processes every prompt twice. "
        "pairs/s is the like-for-like throughput; tokens/s counts each side's own tokens.",
        f"- ours: rows of up to {args.max_len} tokens, {args.tokens_per_microbatch} tokens per micro-batch "
        f"({'/'.join(map(str, micro))} micro-batch(es) per step), log-probs projected through the "
        f"{vocab_words(config)} vocabulary only at target positions (chunked, `kernels` torch backend). TRL 1.16 "
        "patches a fused LM head that "
        + (
            "scores only completion positions with its Triton kernel"
            if cuda
            else "on CPU (no Triton) projects every position of every row, prompt and padding included"
        )
        + ", and also computes entropy, mean logit and top-1 metrics per token.",
        "- loss: both sigmoid DPO (beta 0.1) + 0.2 x NLL on chosen. Ours masks formatting tokens (header, "
        f"{token_name(chat, chat.eot_id)}) out of the DPO log-probs and length-normalizes the NLL per sequence; TRL "
        "sums all completion tokens into the DPO log-probs and takes the token mean of the NLL over the batch. So "
        "losses agree only in ballpark after step 1.",
        "- optimizer: torch's fused AdamW (TRL `optim=adamw_torch_fused`), lr 1e-5 constant, betas 0.9/0.95, no "
        "weight decay, grad clip 1.0; TRL's default gradient checkpointing is turned off to match ours.",
        "- reference: 'model, every step' runs the frozen reference's forward in each step (ours `LiveReference`, "
        "TRL `ref_model`); 'precomputed' computes its log-prob sums for the whole set once before training, outside "
        "the timed steps, and frees the model (ours `dpo.reference: precompute`, TRL `precompute_ref_log_probs`: "
        "its reference is the policy before training, no second model loaded).",
        "- memory: each side in its own process. "
        + (
            "torch.cuda.max_memory_allocated over the run; growth = peak minus the peak after setup."
            if cuda
            else "Peak RSS includes the Python libraries each side imports (TRL: transformers, datasets, accelerate); "
            "growth = peak RSS at the end minus peak RSS after model, reference, data (and for ours the optimizer "
            "object) were set up, i.e. what the training steps added."
        ),
        "- ours runs unsharded in one process (no FSDP); a live reference is a deep copy of the policy, TRL's a "
        "second load of the same checkpoint.",
    ]
    write("\n".join(header + rows + notes), args.out)
    for mode in modes:  # one benchmark per reference mode: the ratios are against TRL in the same mode
        ours, theirs = sides[mode]
        append_summary(
            args.summary,
            "DPO step" + (" (precomputed reference)" if mode == "precompute" else ""),
            [
                step_summary("ours (train.dpo)", ours, args.warmup, args.batch, "pairs/s"),
                step_summary("TRL DPOTrainer", theirs, args.warmup, args.batch, "pairs/s", peer=True),
            ],
        )


if __name__ == "__main__":
    main()
