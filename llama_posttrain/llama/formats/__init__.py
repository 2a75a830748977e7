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

import yaml


class CheckpointError(ValueError):
    pass


def read_yaml(path):
    """A YAML file's content (yaml.safe_load); a missing file, a folder, a file not in UTF-8 or a syntax error
    is a ValueError naming the file. The one YAML reader of configs (training runs, the pipeline, their records;
    llama_posttrain/train/config.py gives it to train/), here below llama/convert.py, which reads a run's."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config {path}: {'is a directory' if p.is_dir() else 'not found'}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read it: {e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: YAML syntax error: {e}") from None


def read_json(file: Path) -> dict:
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise CheckpointError(f"{file}: cannot read it as JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw
