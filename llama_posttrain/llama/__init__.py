"""Llama 3 model, tokenizers, chat format, checkpoints and generation.

The model and checkpoint names load on first use (PEP 562): `from llama_posttrain.llama.chat import ...` or
`from llama_posttrain.llama.config import PRESETS` does not import torch, so the CLIs answer `--help` at once."""

from llama_posttrain.llama.config import PRESETS, ModelConfig, RopeScaling, get_preset
from llama_posttrain.llama.formats import CheckpointError

__all__ = [
    "PRESETS",
    "CheckpointError",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "get_preset",
    "load_model",
    "save_checkpoint",
    "save_model",
]


def __getattr__(name: str):
    if name in ("load_model", "save_checkpoint", "save_model"):
        from llama_posttrain.llama import checkpoint

        return getattr(checkpoint, name)
    if name in ("KVCache", "Transformer"):
        from llama_posttrain.llama import model

        return getattr(model, name)
    raise AttributeError(f"module 'llama' has no attribute {name!r}")
