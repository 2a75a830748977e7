"""Model configuration: one dataclass and the named presets.

The released Llama 3.x dimensions come from the Llama 3 paper (Table 3) and the model cards.
All of them use RoPE theta 500000 with the "llama3" frequency scaling (low/high frequency
factors 1 and 4 around an original context of 8192 tokens; factor 8 for 3.1, 32 for 3.2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# The doc id of padding: real tokens' doc ids count up from 0, so no real token attends to a pad
# (nor a pad to a real token) and `doc_ids >= 0` marks the real tokens. A pad attends only itself: were
# the pads of a row one causal document, a fully padded row would cost a full causal attention.
# Here, not in model.py, so that the data pipeline packs rows without importing torch.
PAD_DOC = -1


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 RoPE frequency scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_dim: int = 14336  # SwiGLU hidden size (HF `intermediate_size`)
    vocab_size: int = 128256
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_seq_len: int = 131072
    tie_embeddings: bool = False

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):  # from JSON
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not problems:
            if self.dim % self.n_heads:
                problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
            elif self.head_dim % 2:
                problems.append(f"head_dim {self.head_dim} must be even for RoPE")
            if self.n_heads % self.n_kv_heads:
                problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block: attention, SwiGLU, two norms."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        return attn + 3 * d * self.ffn_dim + 2 * d

    @property
    def trunk_params(self) -> int:
        """Parameters of everything but the head: embeddings, blocks, final norm (with the head's own:
        llama_posttrain/llama/heads.py model_params)."""
        return self.vocab_size * self.dim + self.dim + self.n_layers * self.block_params

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)


def _llama3(dim, n_layers, n_heads, ffn_dim, factor, tied, n_kv_heads=8) -> ModelConfig:
    return ModelConfig(
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=ffn_dim,
        rope_scaling=RopeScaling(factor=factor),
        tie_embeddings=tied,
    )


# Tiny models use the shipped byte-level tokenizer: 256 bytes + 256 special tokens.
_TINY = dict(vocab_size=512, max_seq_len=2048, rope_scaling=RopeScaling(factor=32.0, original_max_seq_len=512))

PRESETS: dict[str, ModelConfig] = {
    "llama3.2-1b": _llama3(2048, 16, 32, 8192, factor=32.0, tied=True),
    "llama3.2-3b": _llama3(3072, 28, 24, 8192, factor=32.0, tied=True),
    "llama3.1-8b": _llama3(4096, 32, 32, 14336, factor=8.0, tied=False),
    "llama3.1-70b": _llama3(8192, 80, 64, 28672, factor=8.0, tied=False),
    # test and experiment sizes
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, tie_embeddings=True, **_TINY),
    "tiny-untied": ModelConfig(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, **_TINY),
    "debug": ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=True, **_TINY),
    # The real Llama 3 vocabulary (and so tokenizer, chat format, export) on a trunk that trains on a CPU:
    # experiments/cpu-llama3-vocab. Tied like Llama 3.2 1B/3B, with its RoPE scaling.
    "tiny-llama3-vocab": ModelConfig(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=192,
        max_seq_len=8192,
        rope_scaling=RopeScaling(factor=32.0),
        tie_embeddings=True,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
