"""Meta's checkpoints (read only): `params.json` + `consolidated.NN.pth` model-parallel shards, read with
weights_only=True. Parameter names are ours already (Meta's reference: tok_embeddings, attention.wq, ...)."""

from __future__ import annotations

from pathlib import Path

import torch

from llama_posttrain.llama.config import ModelConfig, RopeScaling
from llama_posttrain.llama.formats import CheckpointError

# The dim along which each tensor was split across model-parallel shards (None: replicated).
SPLIT_DIM = {"tok_embeddings": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def config_from_meta(params: dict, source: str = "params.json") -> ModelConfig:
    dim = params["dim"]
    hidden = int(2 * 4 * dim / 3)  # Meta's FeedForward sizing
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
    scaling = None
    if params.get("use_scaled_rope"):
        # params.json does not carry the factor: 32 for the Llama 3.2 1B/3B shapes, 8 (3.1) otherwise.
        is_32_small = params.get("vocab_size") == 128256 and (dim, params["n_layers"]) in ((2048, 16), (3072, 28))
        scaling = RopeScaling(factor=float(params.get("rope_scaling_factor") or (32.0 if is_32_small else 8.0)))
    return ModelConfig(
        dim=dim,
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
        ffn_dim=hidden,
        vocab_size=params["vocab_size"],
        norm_eps=params.get("norm_eps", 1e-5),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        rope_scaling=scaling,
        max_seq_len=params.get("max_seq_len", 131072),
    )


def read_tensors(path: Path, config: ModelConfig) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """-> (the shards' tensors joined, the config: tied where the checkpoint stores the tied matrix twice,
    as Meta's do)."""
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: params.json but no consolidated.NN.pth shards")
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    out = {}
    for name in shards[0]:
        if name.endswith("rope.freqs"):  # Llama 2 checkpoints store RoPE frequencies; we compute them
            continue
        parts = [s[name] for s in shards]
        dim = SPLIT_DIM.get(name.split(".")[-2])
        out[name] = parts[0].clone() if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
    if "output.weight" in out and torch.equal(out["output.weight"], out["tok_embeddings.weight"]):
        config = ModelConfig.from_dict({**config.to_dict(), "tie_embeddings": True})
    return out, config
