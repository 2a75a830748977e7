#!/usr/bin/env bash
# The benchmarks on a real model (issue 28, item 5): our sampler against HF generate, our SFT and DPO steps
# against TRL's SFTTrainer and DPOTrainer, all on SmolLM2-135M-Instruct (49152-token vocabulary, 30 layers)
# with its own tokenizer and ChatML template; one table of throughput and peak memory first, then each
# benchmark's own table and notes, in experiments/bench/results/real_model.md (replaced).
#
#     bash experiments/bench/real_model.sh [MODEL_DIR]     # default: experiments/smollm2-135m/model
#
# GEN and STEP replace the sizes below, OUT the output file; the smallest run, to check that every path works
# (about 3 minutes):
#     GEN="--prompts 2 --samples 2 --new 4 --repeats 1" STEP="--batch 2 --records 2 --warmup 0 --steps 1" \
#         OUT=/tmp/real_model.md bash experiments/bench/real_model.sh
#
# Expected wall time on 2 quiet CPU cores: about 15 minutes (generate ~3 min, SFT ~5 min, DPO ~7 min; estimated
# from single-thread runs at the smallest settings on a loaded machine, so take it as +-50%). Run it on an idle
# machine: each benchmark notes CPU time / wall time, and the step benchmarks warn when the cores were shared.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${1:-experiments/smollm2-135m/model}
OUT=${OUT:-experiments/bench/results/real_model.md}
# P=4 prompts x K=8 samples x 64 new tokens (sampled at t=0.7, top-p 0.9: the rejection-sampling setting), the
# best of 2 calls after a warm-up; 8 dialogs / pairs per optimizer step, 1 warm-up step, the median of 3 timed steps
GEN=${GEN:---prompts 4 --samples 8 --new 64 --repeats 2}
STEP=${STEP:---batch 8 --warmup 1 --steps 3}
if [ ! -f "$MODEL/config.json" ]; then
    echo "error: $MODEL: no model folder there (experiments/smollm2-135m/setup.sh makes the default one)" >&2
    exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)

# shellcheck disable=SC2086  # GEN and STEP are lists of options
python experiments/bench/generate.py --checkpoint "$MODEL" $GEN --temperature 0.7 --top-p 0.9 --methods fanout hf \
    --out "$tmp/details.md" --summary "$tmp/summary.jsonl"
# shellcheck disable=SC2086
python experiments/bench/sft_step.py --checkpoint "$MODEL" $STEP --out "$tmp/details.md" --summary "$tmp/summary.jsonl"
# shellcheck disable=SC2086
python experiments/bench/dpo_step.py --checkpoint "$MODEL" $STEP --out "$tmp/details.md" --summary "$tmp/summary.jsonl"

minutes=$(( ($(date +%s) - start + 59) / 60 ))
{
    echo "# Benchmarks on a real model: $MODEL, $(date +%F)"
    echo
    echo "command: GEN=\"$GEN\" STEP=\"$STEP\" bash experiments/bench/real_model.sh${*:+ $*}; wall time"
    echo "${minutes} min on $(getconf _NPROCESSORS_ONLN) cores."
    echo "time: the median optimizer step (SFT, DPO) or the best call (generate); throughput: dialogs, pairs or"
    echo "samples per second; tokens/s: each side's own tokens (generate: new tokens). Each side ran in its own"
    echo "process; growth: peak over the peak after the model (and data, optimizer) were set up. The sections below"
    echo "are each benchmark's own table, settings and notes."
    echo
    python experiments/bench/summary_table.py "$tmp/summary.jsonl"
    echo
    cat "$tmp/details.md"
} > "$OUT"
echo "wrote $OUT"
