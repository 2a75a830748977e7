"""Llama 3 model, tokenizers, chat format, checkpoints and generation."""

from llama.checkpoint import CheckpointError, load_model, save_checkpoint, save_model
from llama.config import PRESETS, ModelConfig, RopeScaling, get_preset
from llama.model import KVCache, Transformer

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
