"""Checkpoint formats, one module each; llama_posttrain/llama/checkpoint.py is their face (`load_model`, `save_model`,
`save_checkpoint`, `read_config`), which tells them apart and guards the folders written.

- native.py: our format (config.json + safetensors under our names) and the safetensors folder it
  shares with HF: the index, the shards, the tag on the files this project writes.
- hf.py: Hugging Face's names and q/k layout, its config.json, and the tokenizer files of its folders.
- meta.py: Meta's params.json + consolidated.NN.pth model-parallel shards (read only).
- gguf.py: llama.cpp's one-file GGUF (read only, `convert --from gguf`): dequantized weights, the config
  from its metadata, its tokenizer and chat template as Hugging Face tokenizer files.
"""

import json
from pathlib import Path


class CheckpointError(ValueError):
    pass


def read_json(file: Path) -> dict:
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise CheckpointError(f"{file}: cannot read it as JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw
