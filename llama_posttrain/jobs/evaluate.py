"""Evaluation of one model on held-out data, as a job (the pipeline's driver launches it like any stage).

    torchrun --nproc_per_node 8 llama_posttrain/jobs/evaluate.py --model runs/r1/dpo/model --out eval.json \\
        --prompts eval_prompts.jsonl --verifier arithmetic --task-args '{"max_digits": 1}' \\
        --rm runs/r1/rm/model --nll eval_sft.jsonl
    python llama_posttrain/jobs/evaluate.py --model runs/r1/rm/model --pairs eval_pairs.jsonl --out eval_rm.json   # 1 rank

Metrics (any of them; the result JSON holds each with its counts):
- `--prompts P --verifier TASK`: `task_accuracy`, the task's verifier's mean score of one greedy sample
  per prompt, and `task_accuracy_sampled`, of 4 samples per prompt at temperature 1: one `generate`
  call over the rank's prompts for each, both drawing from one generator seeded with --seed (greedy
  draws nothing from it), up to --max-new-tokens new tokens.
- `--pairs F` (the model is a reward model): `rm_accuracy`, the fraction of preference records whose
  best response the model scores strictly above the worst (chosen vs rejected; llama_posttrain/jobs/scoring.py `score`).
- `--pairs F --dpo-config C [--reference REF]` (the model is a language model: a DPO policy):
  `dpo_reward_accuracy`, the fraction of pairs whose chosen response gets the larger DPO implicit reward,
  computed by the DPO run's own eval objective (llama_posttrain/train/dpo_objective.py make_objective, loop.evaluate_objective: its
  `eval/rewards/accuracies`) with the dpo section of C (the DPO run's config.yaml: dpo.loss, mask_format, ...)
  and its data section's max_len / overlength / keep_strengths; REF, the reference model, for every loss but the
  reference-free ones (simpo: refused).
- `--nll F`: `nll`, the mean negative log-likelihood per target token of SFT records (assistant turns),
  encoded as training encodes them (llama_posttrain/data/loader.py load_examples, --max-len, over-long records
  truncated as the SFT run's eval does by default), packed, and computed with the training loss's
  path (llama_posttrain/train/targets.py model_logps), summed in float64: the SFT run's `eval/nll` on the same set.
- `--rm RM --prompts P`: `rm_score`, the mean score RM gives to --k samples per prompt at temperature 1
  (at --k 4 with --verifier, the very samples of task_accuracy_sampled), and `std` of those scores.
- `--keep-samples` (with --prompts): the result keeps the samples at temperature 1 (`samples`: per prompt, in
  --prompts order, rm_score's, else task_accuracy_sampled's, else --k drawn for it), to score them later.
- `--score-samples R` (repeatable; the model is a reward model, with --prompts): `rm_score_of` {R: {rm_score,
  n, std}}, the model's mean score of the `samples` that result file R kept of the same --prompts: every
  policy's samples scored by one RM (the pipeline's last round's).
The result's `n` holds each metric's sample size (prompts, samples, pairs, tokens) and `std` the standard
deviation of each mean's terms (rm_score): the report's confidence intervals.
With --prompts the result also keeps `generations`: the greedy generation of each of the first SHOWN (8)
prompts and, with --verifier, its score (the pipeline's dashboard tables, llama_posttrain/driver/report.py).
Each rank takes every world_size-th record (rank r's generator seeded with --seed + 1000003 * r, rank 0
with --seed itself, so a 1-rank job is what an in-process evaluation seeded with --seed computes); the
sums and counts are added over ranks. Rank 0 writes --out and reports progress (llama_posttrain/train/progress.py).
This file: the command line (llama_posttrain/jobs/configs.py EvalConfig); the run (`evaluate_model` and the
metrics' functions): llama_posttrain/jobs/evaluation.py.
"""

from __future__ import annotations

from llama_posttrain.jobs.configs import EvalConfig, parse, parser
from llama_posttrain.llama.paths import check_outputs


def parse_args(argv=None) -> EvalConfig:
    """The command line (flags, --config FILE, key=value: llama_posttrain/jobs/configs.py) -> the config, its
    outputs checked against its inputs."""
    args = parse(EvalConfig, argv, __doc__)
    try:  # no output may be an input
        check_outputs(
            {"--model": args.model, "--tokenizer": args.tokenizer, "--prompts": args.prompts, "--pairs": args.pairs,
             "--nll": args.nll, "--rm": args.rm, "--dpo-config": args.dpo_config, "--reference": args.reference,
             **{f"--score-samples {p}": p for p in args.score_samples}},
            {"--out": args.out},
        )  # fmt: skip
    except ValueError as e:
        parser(EvalConfig).error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    from llama_posttrain.jobs.evaluation import run  # torch and the models: after the config is read

    run(args)


if __name__ == "__main__":
    main()
