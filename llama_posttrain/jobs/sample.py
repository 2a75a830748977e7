"""Rejection sampling: K samples per prompt from the policy, scored by reward model(s), best kept.

    torchrun --nproc_per_node 8 llama_posttrain/jobs/sample.py --policy runs/r1/dpo/model --rm runs/r1/rm/model \\
        --prompts prompts.jsonl --k 16 --out-sft sft_r2.jsonl --out-pairs pairs_r2.jsonl

Each prompt is prefilled once and fanned out to K samples (llama_posttrain/llama/generate.py). The K samples are
scored in one reward row per prompt, [prompt][s_1]...[s_K], each sample seeing only the prompt
(llama_posttrain/data/rows.py), so the prompt is computed once there too. Outputs:
- SFT records: the prompt + the best sample (after the optional filters), with every score;
- preference records from the samples: best vs worst by the annotator's scores (llama_posttrain/data/annotators.py:
  a verifier for synthetic tasks, labels imported from a file; or the reward model), or all samples
  written as sets to annotate (`--out-sets`), whose labels come back with `--annotate file:labels.jsonl`.
With `--safety-rm`, scores combine as in Llama 2: the safety score where the prompt is marked
`"safety": true` or the sample looks unsafe (sigmoid(safety) < 0.15), the helpfulness score elsewhere.
Every output record holds the generated fields; the prompt record's own fields (its metadata) go
under "source", so a prompt file that carries e.g. `chosen` or `scores` can never stand in for the
generated ones. A prompt record's "id" is also copied to the top level: labels join on it.
Each rank takes every world_size-th prompt and samples with a generator seeded with --seed + 1000003 * rank
(rank 0 with --seed itself: a 1-rank job writes what an in-process `rejection_sample` call with a generator
seeded so writes); rank 0 writes the files in prompt order, the summary (`--out-report`) and its progress
(llama_posttrain/train/progress.py, prompts). `--task-args JSON` makes `--annotate verifier:TASK`'s task with those settings.
Nothing is dropped silently: every sample left out (no stop token within --max-new-tokens, empty, over
--max-chars, and the cleaning rules of llama_posttrain/data/clean.py: --max-repeat, --ban-phrase, --max-emoji,
--max-exclamation, each off unless given) and every prompt left without an SFT record or a pair (no sample
left, fewer than 2, tied scores, best and worst the same text, an SFT pick repeating an earlier one with
--dedup) is counted and printed (llama_posttrain/data/drops.py `DROPS`), with a warning when most samples reached no stop
token. A prompt whose tokens + --max-new-tokens exceed the policy's context is skipped before sampling and
counted the same way ("prompt_too_long"); a labels file (`--annotate file:`) may label only some sets, the
others counted ("no_pair_unlabelled"). Before any work: no output may be an input
(llama_posttrain/llama/paths.py), and a reward model must use the policy's tokenizer and chat template
(llama_posttrain/jobs/scoring.py `check_reward_models`: a mismatch is refused, not re-rendered).

Engines (`--engine`): "native" (default) samples with llama_posttrain/llama/generate.py on every rank. "vllm"
(llama_posttrain/jobs/vllm_engine.py) exports the policy to an HF folder (with its tokenizer and chat template) and
samples with vLLM (PagedAttention, continuous batching; `pip install vllm`, needs a CUDA GPU): the
engine to use at 8B+ scale. Run it as one process (`python llama_posttrain/jobs/sample.py ... --engine vllm`, vLLM
spreads over `--tensor-parallel` GPUs itself); prompts are rendered to token ids here and the samples
mapped back to the same records and fields, scored by the reward model(s) as with the native engine once
vLLM has freed the GPU (its memory options: llama_posttrain/jobs/vllm_engine.py). Native memory: a generate call takes
--batch-size prompts, its KV cache (printed before sampling) --batch-size x --k rows of (longest prompt +
--max-new-tokens) slots; the policy is freed before the reward models load. --compile: llama_posttrain/llama/generate.py.
This file: the command line (llama_posttrain/jobs/configs.py SampleConfig); the run (`sample`,
`select_samples`, `rejection_sample`): llama_posttrain/jobs/sampling.py.
"""

from __future__ import annotations

from llama_posttrain.jobs.configs import SampleConfig, parse, parser
from llama_posttrain.llama.paths import check_outputs


def main(argv=None):
    args = parse(SampleConfig, argv, __doc__)  # flags, --config FILE, key=value (llama_posttrain/jobs/configs.py)
    file_labels = args.annotate[5:] if (args.annotate or "").startswith("file:") else None
    try:  # no output may be an input: refused before any work
        check_outputs(
            {"--policy": args.policy, "--rm": args.rm, "--safety-rm": args.safety_rm, "--prompts": args.prompts,
             "--tokenizer": args.tokenizer, "--annotate file:": file_labels},
            {"--out-sft": args.out_sft, "--out-pairs": args.out_pairs, "--out-sets": args.out_sets,
             "--out-report": args.out_report},
        )  # fmt: skip
    except ValueError as e:
        parser(SampleConfig).error(str(e))
    from llama_posttrain.jobs.sampling import run  # torch and the models: after the config is read

    run(args)


if __name__ == "__main__":
    main()
