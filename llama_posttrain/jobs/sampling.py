"""Rejection sampling's run (llama_posttrain/jobs/sample.py, its entry point, reads the config and calls `run`):
K samples per prompt from the policy (`sample`), scored by the reward model(s) and selected (`select_samples`),
each rank's share gathered and written by rank 0 (`sample_and_write`)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections import Counter

import torch
import torch.distributed as dist

import llama_posttrain.llama.generate as llama_generate
from llama_posttrain.data.annotators import file_annotator, preference_pair, verifier_annotator
from llama_posttrain.data.clean import CleanRules
from llama_posttrain.data.drops import drop_reason, drop_report, split_outputs
from llama_posttrain.data.io import write_jsonl, write_text
from llama_posttrain.data.records import read_records
from llama_posttrain.data.tasks import load_task, task_factory
from llama_posttrain.data.tasks.files import prompt_record
from llama_posttrain.jobs.configs import SampleConfig
from llama_posttrain.jobs.scoring import check_reward_models, combine_llama2, score
from llama_posttrain.jobs.vllm_engine import max_model_len, vllm_engine
from llama_posttrain.llama.chat import ChatFormat, resolve_chat_template
from llama_posttrain.llama.checkpoint import load_model, read_config
from llama_posttrain.llama.generate import decode_sample, generate
from llama_posttrain.llama.kv_budget import kv_cache_report
from llama_posttrain.llama.tokenizer import resolve_tokenizer
from llama_posttrain.train import progress
from llama_posttrain.train.config import from_flat_dict
from llama_posttrain.train.distributed import Dist, init_distributed


def read_prompts(path) -> list[dict]:
    """JSONL records with a "prompt" (text or messages) and any other fields, kept as metadata.
    -> the records with the parsed prompt as "messages"."""
    out = []
    for where, obj in read_records(path):
        messages = prompt_record(obj, where)  # (checked before obj is read as a mapping)
        out.append({**obj, "messages": messages})
    return out


def sample(
    policy, chat: ChatFormat, prompts: list[list[dict]], k: int, max_new_tokens: int, batch_size: int = 64,
    done=None, compile: bool | str = False, **kw,
):  # fmt: skip
    """-> texts[p][j], finished[p][j]: K decoded samples per prompt and whether each hit a stop token.
    `policy`: the model (native engine: `batch_size` prompts per generate call, `compile` its decode step:
    llama_posttrain/llama/generate.py), or an engine object with `sample_ids` (VLLMEngine). `done(n)`: called
    with the number of prompts sampled so far after each batch (progress)."""
    eager_before, calls = llama_generate.EAGER_FALLBACKS, 0
    tok = chat.tokenizer
    texts, finished = [], []
    engine = getattr(policy, "sample_ids", None)
    if engine is not None:  # the engine batches on its own: all prompts at once
        batch_size = max(len(prompts), 1)
    for start in range(0, len(prompts), batch_size):
        ids = [chat.encode_dialog(m, add_generation_prompt=True).tokens for m in prompts[start : start + batch_size]]
        if engine is not None:
            out = engine(ids, k, max_new_tokens, chat.stop_ids, **kw)
        else:
            out = generate(policy, ids, k, max_new_tokens, chat.stop_ids, pad_id=tok.pad_id, compile=compile, **kw)
            calls += 1
        for samples in out:
            texts.append([decode_sample(tok, s) for s in samples])
            finished.append([bool(s) and s[-1] in chat.stop_ids for s in samples])
        if done is not None:
            done(len(texts))
    eager = llama_generate.EAGER_FALLBACKS - eager_before
    if eager:  # each call named in generate's own warning
        print(
            f"warning: --compile: {eager} of {calls} generate calls decoded eagerly, past the compiled decode "
            "step's recompile limit",
            file=sys.stderr,
            flush=True,
        )
    return texts, finished


# ----------------------------------------------------------------------------- driver


def rejection_sample(records, *args, dedup: bool = False, **kw):
    """-> (SFT records, preference records, sets to annotate, drops: {DROPS key: count}) for these records;
    arguments as sample_records; `dedup` as split_outputs."""
    return split_outputs(sample_records(records, *args, **kw), dedup)


def sample_records(
    records, policy, rm, chat, k, max_new_tokens, generator, temperature=1.0, top_p=1.0, top_k=0,
    safety_rm=None, annotate=None, max_chars=None, max_len=4096, clean: CleanRules | None = None, done=None,
    batch_size: int = 64, compile: bool = False,
) -> list[tuple[dict | None, dict | None, dict, Counter]]:  # fmt: skip
    """`sample` then `select_samples` (arguments as theirs) -> per record: (its SFT record or None, its
    preference pair or None, its set to annotate, what was dropped: {DROPS key: count})."""
    texts, finished = sample(
        policy, chat, [r["messages"] for r in records], k, max_new_tokens, batch_size, temperature=temperature,
        top_p=top_p, top_k=top_k, generator=generator, compile=compile, **({"done": done} if done else {}),
    )  # fmt: skip
    return select_samples(records, texts, finished, rm, chat, k, safety_rm, annotate, max_chars, max_len, clean)


def select_samples(
    records, texts, finished, rm, chat, k, safety_rm=None, annotate=None, max_chars=None, max_len=4096,
    clean: CleanRules | None = None,
) -> list[tuple[dict | None, dict | None, dict, Counter]]:  # fmt: skip
    """Each record's K samples (texts[p][j], finished[p][j]: `sample`'s) scored by the reward model(s) ->
    per record: (its SFT record or None, its preference pair or None, its set to annotate, what was dropped:
    {DROPS key: count}, every sample and every missing SFT record or pair counted once).
    `clean`: the cleaning rules (llama_posttrain/data/clean.py), applied to every sample."""
    prompts = [r["messages"] for r in records]
    helpful = score(rm, chat, prompts, texts, max_len) if rm is not None else [[0.0] * k for _ in prompts]
    if safety_rm is not None:
        safety = score(safety_rm, chat, prompts, texts, max_len)
        helpful = [
            [combine_llama2(h, s, bool(r.get("safety"))) for h, s in zip(hs, ss)]
            for r, hs, ss in zip(records, helpful, safety)
        ]
    out = []
    for r, ts, fs, ss in zip(records, texts, finished, helpful):
        reasons = [drop_reason(t, f, max_chars, clean) for t, f in zip(ts, fs)]
        dropped = Counter(reason for reason in reasons if reason is not None)
        keep = [j for j, reason in enumerate(reasons) if reason is None]
        meta = provenance(r)  # first, so that the generated fields written after it win
        sft = None
        if keep:
            best = max(keep, key=lambda j: ss[j])
            messages = r["messages"] + [{"role": "assistant", "content": ts[best]}]
            sft = {**meta, "messages": messages, "score": ss[best], "scores": ss}
        else:
            dropped["no_sft_record"] += 1
        labels = annotate(r, ts) if annotate is not None else ss
        kept_texts, kept_labels = [ts[j] for j in keep], [labels[j] for j in keep] if labels is not None else None
        pair = preference_pair(r, kept_texts, kept_labels) if len(keep) >= 2 and labels is not None else None
        if pair is not None:
            pair = {**meta, **pair}
        elif labels is None:  # a labels file that labels only some sets
            dropped["no_pair_unlabelled"] += 1
        elif len(keep) < 2:
            dropped["no_pair_fewer_than_2"] += 1
        elif max(kept_labels) == min(kept_labels):
            dropped["no_pair_tied_scores"] += 1
        else:  # preference_pair's other refusal: its best and worst sample are the same text
            dropped["no_pair_same_text"] += 1
        set_ = {**meta, "prompt": r["messages"], "responses": ts, "finished": fs, "rm_scores": ss}
        out.append((sft, pair, set_, dropped))
    return out


def provenance(record: dict) -> dict:
    """The prompt record's own fields under "source" (its "id" also on top, the key labels join on)."""
    source = {key: v for key, v in record.items() if key not in ("prompt", "messages")}
    return ({"id": record["id"]} if "id" in record else {}) | {"source": source}


def task_from_flags(spec: str, args: dict | None, where: str = "--task-args"):
    """A task (data/tasks) made with its arguments: a dataclass task's are type-checked as the pipeline's
    config checks them (llama_posttrain/train/config.py from_flat_dict); ValueError naming `where` and the argument."""
    factory = task_factory(spec)
    if dataclasses.is_dataclass(factory):
        return from_flat_dict(factory, dict(args or {}), where)
    return load_task(spec, args)


def _annotator(spec: str | None, task_args: dict | None = None, k: int | None = None):
    if spec is None or spec == "rm":
        return None
    kind, _, arg = spec.partition(":")
    if kind == "verifier" and arg:  # a task's verifier, the task made with its settings (--task-args)
        return verifier_annotator(task_from_flags(arg, task_args).verify)
    if kind == "file":
        return file_annotator(arg, k)  # every set holds the K samples
    raise ValueError(f"--annotate must be rm, verifier:TASK (e.g. verifier:arithmetic) or file:PATH, got {spec!r}")


def run(args: SampleConfig) -> None:
    """The job (sample.py `main`, its config read and its outputs checked): the prompts and labels read, the
    policy's tokenizer and chat template resolved, then sampling on every rank (or vLLM) and the files written."""
    try:
        records = read_prompts(args.prompts)
    except (ValueError, OSError) as e:  # a bad record: its file, line and field
        raise SystemExit(f"error: --prompts {args.prompts}: {e}") from None
    try:
        annotate = _annotator(args.annotate, args.task_args, args.k)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --annotate {args.annotate}: {e}") from None
    stray = sorted(map(str, getattr(annotate, "ids", set()) - {r.get("id") for r in records}))
    if stray:  # a label no prompt has: a typo in an id, or labels of another prompt file
        print(f"--annotate {args.annotate}: {len(stray)} labels for ids no prompt has, unused: {stray[:5]}", flush=True)
    try:  # --tokenizer, else the policy folder's, else the byte tokenizer if the vocabularies match
        config = read_config(args.policy)[0]
        tokenizer = resolve_tokenizer(args.tokenizer, args.policy, config.vocab_size)
        chat = ChatFormat(tokenizer, resolve_chat_template(args.chat_template, args.policy))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: --policy {args.policy}: {e}") from None
    check_reward_models({"--rm": args.rm, "--safety-rm": args.safety_rm}, chat)
    # the model's own context: a prompt that cannot fit it is skipped and counted; an explicit
    # --vllm-max-model-len below the longest prompt that fits is the user's setting, refused by max_model_len
    records, too_long = fit_context(records, chat, args.max_new_tokens, config.max_seq_len)
    if args.engine == "vllm":
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit("error: run --engine vllm as one process (python, not torchrun): vLLM uses GPUs itself")
        longest = max((len(chat.encode_dialog(r["messages"], add_generation_prompt=True)) for r in records), default=0)
        model_len = max_model_len(longest, args.max_new_tokens, config.max_seq_len, args.vllm_max_model_len)
        print(f"vLLM: max_model_len {model_len}, gpu_memory_utilization {args.vllm_gpu_memory_utilization}", flush=True)
        with tempfile.TemporaryDirectory(prefix="vllm_policy_") as export_dir:
            engine = vllm_engine(
                args.policy, chat, args.seed, args.tensor_parallel, export_dir, model_len,
                args.vllm_gpu_memory_utilization, args.vllm_seed_per_request,
            )  # fmt: skip
            # one process, no process group: vLLM sets up its own workers
            sample_and_write(args, Dist(0, 1, 0, torch.device("cuda"), None), chat, records, annotate, engine, too_long)
        return
    d = init_distributed()  # one process per GPU (cuda:LOCAL_RANK); a plain `python` run is 1 rank
    try:
        sample_and_write(args, d, chat, records, annotate, too_long=too_long)
        dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        dist.destroy_process_group()


def sample_and_write(
    args: SampleConfig, d, chat: ChatFormat, records: list[dict], annotate, engine=None, too_long: int = 0
) -> None:
    """`engine`: a VLLMEngine to sample with instead of loading the policy here. The reward models are loaded
    once the samples are drawn and the policy is freed (the engine closed: vLLM's GPU memory given back).
    `too_long`: the prompts skipped before sampling (fit_context), counted in the summary."""
    dtype = torch.bfloat16 if d.device.type == "cuda" else torch.float32
    if args.generate_compile == "reduce-overhead" and d.device.type != "cuda":
        raise SystemExit(f"error: --compile-mode reduce-overhead captures CUDA graphs: this rank runs on {d.device}")
    policy = engine if engine is not None else load_model(args.policy, head="lm", dtype=dtype, device=d.device).eval()
    # rank 0 draws from the seed itself: a 1-rank job samples what an in-process call seeded so does
    generator = torch.Generator(d.device).manual_seed(rank_seed(args.seed, d.rank))
    mine, total = records[d.rank :: d.world_size], len(records)
    if engine is None and d.is_main and mine:  # rank 0's share: the ranks' shares differ by a prompt at most
        lens = [len(chat.encode_dialog(r["messages"], add_generation_prompt=True)) for r in mine]
        compile_ = args.generate_compile
        report = kv_cache_report(policy.config, dtype, lens, args.max_new_tokens, args.k, args.batch_size, compile_)
        print(report, flush=True)

    def done(n):  # rank 0's prompts done, scaled to the whole set (the ranks go at about the same pace)
        progress.report(min(total, n * d.world_size), total, "prompts")

    progress.report(0, total, "prompts")
    texts, finished = sample(
        policy, chat, [r["messages"] for r in mine], args.k, args.max_new_tokens, args.batch_size, done,
        args.generate_compile,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, generator=generator,
    )  # fmt: skip
    if engine is not None:
        engine.close()
    del policy  # the reward models take its place
    rm, safety = (
        load_model(path, head="reward", dtype=dtype, device=d.device).eval() if path else None
        for path in (args.rm, args.safety_rm)
    )
    out = select_samples(mine, texts, finished, rm, chat, args.k, safety, annotate, args.max_chars, clean=args.clean)
    gathered = [out]
    if d.world_size > 1:
        gathered = [None] * d.world_size
        dist.all_gather_object(gathered, out)
    if not d.is_main:
        return
    ordered = [None] * len(records)
    for rank, results in enumerate(gathered):  # rank r sampled prompts r, r + world, ...: back into prompt order
        ordered[rank :: d.world_size] = results
    sft, pairs, sets, dropped = split_outputs(ordered, args.dedup)
    dropped.update({"prompt_too_long": too_long} if too_long else {})
    for path, recs in ((args.out_sft, sft), (args.out_pairs, pairs), (args.out_sets, sets)):
        if path:
            write_jsonl(path, recs)
    outputs = [name for name, path in (("sft", args.out_sft), ("pairs", args.out_pairs)) if path]
    given = len(records) + too_long
    lines, warning = drop_report(dropped, given, args.k, f"--max-new-tokens {args.max_new_tokens}", outputs)
    print("\n".join(lines), flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    counts = {"prompts": given, "samples": len(records) * args.k, "sft": len(sft), "pairs": len(pairs)}
    summary = json.dumps({**counts, "dropped": dict(sorted(dropped.items()))})
    if args.out_report:
        write_text(args.out_report, summary + "\n")
    progress.report(total, total, "prompts")
    print(summary, flush=True)


def fit_context(records: list[dict], chat: ChatFormat, max_new_tokens: int, context: int) -> tuple[list[dict], int]:
    """-> (the records whose prompt + max_new_tokens fits the policy's context, how many did not). Those are
    skipped and counted (one line printed, naming the first), not sampled: one long prompt does not end the job."""
    lengths = [len(chat.encode_dialog(r["messages"], add_generation_prompt=True)) for r in records]
    over = {i for i, n in enumerate(lengths) if n + max_new_tokens > context}
    if over:
        i = min(over)
        first = records[i].get("id", f"#{i + 1}")
        print(
            f"skipped {len(over)} of {len(records)} prompts: prompt + --max-new-tokens {max_new_tokens} over the "
            f"context of {context} tokens (the first: prompt {first}, {lengths[i]} tokens)",
            flush=True,
        )
    return [r for i, r in enumerate(records) if i not in over], len(over)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank r's generator: rank 0 the seed itself, so a 1-rank job reproduces an in-process call."""
    return seed + 1_000_003 * rank
