"""Evaluation's run (llama_posttrain/jobs/evaluate.py, its entry point, reads the config and calls `run`): every
metric of the job's docstring, each rank's share summed over ranks (`evaluate_model`), written by rank 0."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from llama_posttrain.data.io import write_text
from llama_posttrain.data.loader import DataLoader, load_examples
from llama_posttrain.data.records import read_records
from llama_posttrain.data.rows import pack
from llama_posttrain.data.schema import Drop, ValidationError, parse_preference
from llama_posttrain.jobs.configs import EvalConfig
from llama_posttrain.jobs.sampling import rank_seed, read_prompts, sample, task_from_flags
from llama_posttrain.jobs.scoring import check_reward_models, score
from llama_posttrain.llama.chat import ChatFormat, resolve_chat_template
from llama_posttrain.llama.checkpoint import load_model, read_config
from llama_posttrain.llama.kv_budget import kv_cache_report
from llama_posttrain.llama.tokenizer import resolve_tokenizer
from llama_posttrain.losses.dpo import needs_reference
from llama_posttrain.train import loop, progress
from llama_posttrain.train.config import load_config
from llama_posttrain.train.distributed import all_reduce_sum, init_distributed
from llama_posttrain.train.dpo import DPOConfig
from llama_posttrain.train.dpo_objective import make_objective
from llama_posttrain.train.targets import LiveReference, model_logps

SHOWN = 8  # the first --prompts records whose greedy generations the result keeps ("generations")
SAMPLED = 4  # samples per prompt (temperature 1) of task_accuracy_sampled


def read_pairs(path) -> tuple[list[list[dict]], list[list[str]], int]:
    """Preference records -> (prompts, [best text, worst text] each, records dropped for tied scores).
    Best and worst: chosen and rejected (edited, if given, is the best), or a ranking's first and last."""
    prompts, texts, tied = [], [], 0
    for where, obj in read_records(path):
        if isinstance(obj, ValidationError):
            raise obj
        try:
            record = parse_preference(obj, where)
        except Drop:  # scores that tie: no preference to check
            tied += 1
            continue
        pair = [record.responses[0], record.responses[-1]]
        if any(len(r) != 1 for r in pair):
            raise ValidationError(f"{where}: responses: scored as one assistant message each, got several")
        prompts.append(record.prompt)
        texts.append([r[0]["content"] for r in pair])
    return prompts, texts, tied


def sampled(model, chat: ChatFormat, records, n: int, max_new_tokens: int, temperature: float, generator=None,
            batch_size: int = 0) -> list[list[str]]:  # fmt: skip
    """n decoded samples per record (llama_posttrain/jobs/sampling.py `sample`), `batch_size` prompts per generate call
    (0: all in one call, whose random draws the recorded results came from; another batch size draws
    them in another order)."""
    prompts = [r["messages"] for r in records]
    return sample(
        model, chat, prompts, n, max_new_tokens, batch_size or max(len(prompts), 1), temperature=temperature,
        generator=generator,
    )[0]  # fmt: skip


def task_sums(model, chat: ChatFormat, records, verify, max_new_tokens: int, generator, done, batch_size=0) -> tuple:
    """The verifier's score sums and counts over greedy (1 sample) and sampled (4, temperature 1) samples of
    `records` -> (sums, the sampled samples' texts per record, the greedy text per record)."""
    out, texts, greedy = {}, [], []
    for key, n, temp in (("task_accuracy", 1, 0.0), ("task_accuracy_sampled", SAMPLED, 1.0)):
        texts = sampled(model, chat, records, n, max_new_tokens, temp, generator, batch_size)
        scores = [verify(r["messages"][-1]["content"], t) for r, ts in zip(records, texts) for t in ts]
        out[key], out[f"{key}/n"] = sum(scores), len(scores)
        greedy = [ts[0] for ts in texts] if temp == 0.0 else greedy
        done(len(records))
    return out, texts, greedy


def shown_generations(model, chat: ChatFormat, records, greedy, verify, max_new_tokens: int, d) -> list[dict]:
    """The greedy generations of the first SHOWN prompts, for the dashboards' tables (llama_posttrain/driver/report.py):
    this rank's share of them (its first ones in `greedy`, else generated here), gathered to rank 0 in
    prompt order -> [{"prompt", "generation", "correct": the verifier's score, None without one}]; [] elsewhere."""
    mine = list(range(d.rank, min(SHOWN, len(records)), d.world_size))  # this rank's, in its share's order
    if greedy is None and mine:  # temperature 0 draws no random numbers
        greedy = [ts[0] for ts in sampled(model, chat, [records[i] for i in mine], 1, max_new_tokens, 0.0)]
    rows = []
    for i, text in zip(mine, greedy or []):
        prompt = records[i]["messages"][-1]["content"]
        rows.append((i, {"prompt": prompt, "generation": text, "correct": verify(prompt, text) if verify else None}))
    every = [None] * d.world_size if d.is_main else None
    dist.gather_object(rows, every, dst=0)
    return [row for _, row in sorted(r for part in every for r in part)] if d.is_main else []


def nll_sums(model, examples, max_len: int, pad_id: int) -> tuple[float, int]:
    """(sum of -log p over the examples' target tokens in float64, number of target tokens)."""
    device, total, n = model.tok_embeddings.weight.device, 0.0, 0
    for batch in pack(examples, max_len, 4 * max_len, pad_id):
        with torch.no_grad():
            logps = model_logps(model, batch.to(device))
        total, n = total - logps.double().sum().item(), n + logps.numel()
    return total, n


def ci_sums(values) -> dict:
    """The sums of a mean's terms that the ranks add: {"": sum, "/n": count, "/sq": sum of squares}."""
    values = [float(v) for v in values]
    return {"": sum(values), "/n": len(values), "/sq": sum(v * v for v in values)}


def std_of(total: float, sq: float, n: float) -> float | None:
    """The (n - 1) standard deviation from the sums of the terms and of their squares; None under 2 terms."""
    if n < 2:
        return None
    return max(0.0, (sq - total * total / n) / (n - 1)) ** 0.5


def read_samples(path, records: int) -> list[list[str]]:
    """The `samples` an evaluation result kept (--keep-samples) of the same --prompts: one list per prompt."""
    try:
        found = json.loads(open(path).read()).get("samples")
    except (OSError, ValueError, AttributeError) as e:
        raise ValidationError(f"--score-samples {path}: not an evaluation result ({e})") from None
    if not isinstance(found, list) or not all(isinstance(s, list) for s in found):
        raise ValidationError(f"--score-samples {path}: samples: missing (evaluated without --keep-samples?)")
    if len(found) != records:
        raise ValidationError(f"--score-samples {path}: samples: {len(found)} prompts, --prompts has {records}")
    return found


def dpo_setup(path, chat: ChatFormat, pairs_path, verbose: bool):
    """The DPO run's config (C: its dpo and data sections) and the --pairs examples encoded as its eval set."""
    cfg = load_config(DPOConfig, path)
    dc = cfg.data
    examples, _ = load_examples(
        pairs_path, "dpo", chat, dc.max_len, overlength=dc.overlength, skip_invalid=dc.skip_invalid,
        keep_strengths=dc.keep_strengths, seed=dc.seed + 1, verbose=verbose,
    )  # fmt: skip
    return cfg, examples


def run(args: EvalConfig) -> None:
    """The job (evaluate.py `main`, its config read and its output checked): the model's tokenizer and chat
    template resolved, every input read and checked, then `evaluate_model` on every rank; rank 0 writes --out."""
    try:
        config, head, _ = read_config(args.model)
        tokenizer = resolve_tokenizer(args.tokenizer, args.model, config.vocab_size)
        chat = ChatFormat(tokenizer, resolve_chat_template(args.chat_template, args.model))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --model {args.model}: {e}") from None
    if args.pairs and head == "lm" and not args.dpo_config:
        raise SystemExit(
            f"--model {args.model}: a policy: --pairs gives dpo_reward_accuracy, which needs --dpo-config (the DPO "
            "run's config.yaml: its loss and format mask) and --reference (the SFT model); a reward model gives "
            "rm_accuracy"
        )
    if args.pairs and head == "reward" and (args.dpo_config or args.reference):
        raise SystemExit(f"--model {args.model}: a reward model: --dpo-config and --reference are a policy's")
    if args.score_samples and head != "reward":
        raise SystemExit(
            f"--model {args.model}: --score-samples scores with a reward model, this one's head is {head!r}"
        )
    if ((args.prompts and not args.score_samples) or args.nll) and head != "lm":
        raise SystemExit(
            f"--model {args.model}: --prompts and --nll need a language model, this one's head is {head!r}"
        )
    check_reward_models({"--rm": args.rm}, chat)  # the policy's tokenizer and chat template, or refused
    try:
        task = task_from_flags(args.verifier, args.task_args) if args.verifier else None
    except ValueError as e:
        raise SystemExit(f"--verifier {args.verifier}: {e}") from None
    if task is not None and not hasattr(task, "verify"):
        raise SystemExit(f"--verifier {args.verifier}: the task has no verifier (verify(prompt, response))")
    verify = task.verify if task is not None else None
    try:  # a bad record: its file, line and field, one line per rank (no traceback)
        records = read_prompts(args.prompts) if args.prompts else []
        pairs = read_pairs(args.pairs) if args.pairs and head == "reward" else ([], [], 0)
        examples, data_report = (
            load_examples(args.nll, "sft", chat, args.max_len, verbose=False) if args.nll else ([], {})
        )
        samples = {p: read_samples(p, len(records)) for p in args.score_samples}
        dpo = dpo_setup(args.dpo_config, chat, args.pairs, verbose=False) if args.pairs and head == "lm" else None
    except (ValidationError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if dpo is not None:
        loss = dpo[0].dpo.loss
        if needs_reference(loss) and not args.reference:
            raise SystemExit(
                f"--dpo-config {args.dpo_config}: dpo.loss {loss} scores against a reference: give --reference"
            )
        if not needs_reference(loss) and args.reference:
            raise SystemExit(
                f"--dpo-config {args.dpo_config}: dpo.loss {loss} has no reference model: drop --reference"
            )
        if args.reference:
            check_policies({"--reference": args.reference})
        pairs = ([None] * len(dpo[1]), [], 0)  # the DPO examples' count; dropped ones counted by load_examples
    for flag, path, n in (("--prompts", args.prompts, len(records)), ("--pairs", args.pairs, len(pairs[0])),
                          ("--nll", args.nll, len(examples))):  # fmt: skip
        if path and not n:
            raise SystemExit(f"{flag} {path}: no records to evaluate")
    d = init_distributed()  # one process per GPU (cuda:LOCAL_RANK); a plain `python` run is 1 rank
    try:
        result = evaluate_model(args, d, chat, verify, records, pairs, examples, head, samples, dpo)
        if d.is_main:
            result = {"model": str(args.model), "ranks": d.world_size, **result}
            if args.nll:
                result["nll_data"] = {k: v for k, v in data_report.items() if k not in ("records", "examples")}
            write_text(args.out, json.dumps(result, indent=1) + "\n")
            print(json.dumps(result), flush=True)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def check_policies(models: dict) -> None:
    """Each {flag: path} a readable language-model checkpoint, or SystemExit naming it."""
    for flag, path in models.items():
        try:
            head = read_config(path)[1]
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {flag} {path}: {e}") from None
        if head != "lm":
            raise SystemExit(f"error: {flag} {path}: not a language model (its head is {head!r})")


def evaluate_model(
    args, d, chat: ChatFormat, verify, records, pairs, examples, head=None, samples=None, dpo=None
) -> dict:
    """This rank's share of every metric asked for, summed over ranks -> the metrics, their counts (`n`) and
    the standard deviations of the means' terms (`std`). head: the model's (default: reward with --pairs, else lm);
    samples: {result file: samples per prompt} (--score-samples); dpo: (the DPO config, its examples of --pairs)."""
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    share = slice(d.rank, None, d.world_size)
    reuse = verify is not None and args.k == SAMPLED  # rm_score's samples are task_accuracy_sampled's
    keep = getattr(args, "keep_samples", False)
    samples = samples or {}
    draw = bool(args.rm and not reuse) or (keep and not args.rm and verify is None)  # a pass of t=1 samples
    passes = (2 if verify else 0) + (1 if draw else 0) + len(samples)
    total, done = passes * len(records) + len(pairs[0]) + len(examples), [0]

    def step(n):  # rank 0's count scaled to the whole set: the ranks go at about the same pace
        done[0] += n
        progress.report(min(total, done[0] * d.world_size), total, "examples")

    progress.report(0, total, "examples")
    head = head or ("reward" if args.pairs else "lm")
    model = load_model(args.model, head=head, dtype=dtype, device=d.device).eval()
    if records and head == "lm" and d.is_main:  # the largest generate call's cache: K samples (or SAMPLED) per prompt
        lens = [len(chat.encode_dialog(r["messages"], add_generation_prompt=True).tokens) for r in records[share]]
        k = max(args.k if args.rm else 1, SAMPLED if verify else 1)
        print(
            kv_cache_report(model.config, dtype, lens, args.max_new_tokens, k, args.batch_size or len(lens)), flush=True
        )
    sums, out, texts, greedy = {}, {}, None, None
    if verify is not None:
        generator = torch.Generator(d.device).manual_seed(rank_seed(args.seed, d.rank))
        part, texts, greedy = task_sums(
            model, chat, records[share], verify, args.max_new_tokens, generator, step, args.batch_size
        )
        sums.update(part)
    mine = records[share]
    if draw:
        generator = torch.Generator(d.device).manual_seed(rank_seed(args.seed, d.rank))
        texts = sampled(model, chat, mine, args.k, args.max_new_tokens, 1.0, generator, args.batch_size)
        step(len(mine))
    if args.rm:
        rm = load_model(args.rm, head="reward", dtype=dtype, device=d.device).eval()
        scores = score(rm, chat, [r["messages"] for r in mine], texts, args.max_len) if mine else []
        sums.update({f"rm_score{k}": v for k, v in ci_sums(s for ss in scores for s in ss).items()})
        del rm
    kept = gather_in_order(texts if keep else None, len(records), d) if keep else None
    for i, of in enumerate(samples.values()):  # the reward model scores other policies' samples
        scores = score(model, chat, [r["messages"] for r in mine], of[share], args.max_len) if mine else []
        sums.update({f"rm_score_of/{i}{k}": v for k, v in ci_sums(s for ss in scores for s in ss).items()})
        step(len(mine))
    if args.pairs and dpo is not None:  # a policy: the DPO run's own eval objective on the pairs
        out["dpo_reward_accuracy"], n_pairs = dpo_accuracy(model, dpo, args.reference, dtype, chat, d)
        step(len(pairs[0][share]))
    elif args.pairs:
        prompts, texts = pairs[0][share], pairs[1][share]
        scores = score(model, chat, prompts, texts, args.max_len) if prompts else []
        sums["rm_accuracy"], sums["rm_accuracy/n"] = sum(s[0] > s[1] for s in scores), len(scores)
        out["pairs_tied_dropped"] = pairs[2]
        step(len(prompts))
    if args.nll:
        sums["nll"], sums["nll/n"] = nll_sums(model, examples[share], args.max_len, chat.tokenizer.pad_id)
        step(len(examples[share]))
    sums = all_reduce_sum(sums, d.device) if d.world_size > 1 else sums
    n, std = {}, {}
    for key in [k for k in sums if "/" not in k or k.startswith("rm_score_of/") and k.count("/") == 1]:
        out[key] = sums[key] / sums[f"{key}/n"] if sums[f"{key}/n"] else None
        n[key] = int(sums[f"{key}/n"])
        if f"{key}/sq" in sums:
            std[key] = std_of(sums[key], sums[f"{key}/sq"], sums[f"{key}/n"])
    if dpo is not None:
        n["dpo_reward_accuracy"] = n_pairs
    out["rm_score_of"] = {
        path: {
            "rm_score": out.pop(f"rm_score_of/{i}"),
            "n": n.pop(f"rm_score_of/{i}"),
            "std": std.pop(f"rm_score_of/{i}"),
        }
        for i, path in enumerate(samples)
    }
    if not samples:
        del out["rm_score_of"]
    counts = {
        "prompts": len(records) if records else None, "pairs": len(pairs[0]) if args.pairs else None,
        "sft_records": len(examples) if args.nll else None, "nll_tokens": sums.get("nll/n"),
    }  # fmt: skip
    if records and head == "lm":  # after the sampled metrics: their random numbers are drawn as before
        out["generations"] = shown_generations(model, chat, records, greedy, verify, args.max_new_tokens, d)
    if kept is not None and d.is_main:
        out["samples"] = kept
    progress.report(total, total, "examples")
    return {**out, **{k: int(v) for k, v in counts.items() if v is not None}, "n": n, "std": std}


def gather_in_order(texts, records: int, d) -> list | None:
    """Each rank's samples of its share (every world_size-th prompt) -> on rank 0, every prompt's, in order."""
    every = [None] * d.world_size if d.is_main else None
    dist.gather_object(list(texts or []), every, dst=0)
    if not d.is_main:
        return None
    out = [None] * records
    for rank, part in enumerate(every):
        for i, s in zip(range(rank, records, d.world_size), part):
            out[i] = s
    return out


def dpo_accuracy(model, dpo, reference_path, dtype, chat: ChatFormat, d) -> tuple[float | None, int]:
    """The DPO run's eval objective (llama_posttrain/train/dpo_objective.py make_objective; loop.evaluate_objective) on the pairs: its
    `rewards/accuracies`, with the run's dpo section (loss, beta, mask_format) -> (accuracy, pairs)."""
    cfg, examples = dpo  # one step of every pair (micro-batches of data.tokens_per_microbatch): per-pair sums
    reference = None
    if reference_path:
        reference = LiveReference(load_model(reference_path, head="lm", dtype=dtype, device=d.device).eval())
    dc = cfg.data
    loader = DataLoader(
        examples, max(len(examples), d.world_size), dc.max_len, dc.tokens_per_microbatch, d.rank, d.world_size,
        shuffle=False, pad_id=chat.tokenizer.pad_id, drop_last=False,
    )  # fmt: skip
    metrics = loop.evaluate_objective(make_objective(model, reference, cfg.dpo, cfg.train.kernels), loader, model, d)
    return metrics.get("eval/rewards/accuracies"), int(metrics["eval/examples"])
