"""Checkpoints: native safetensors, Hugging Face import/export, Meta import.

Formats (told apart by the files in the directory):
- native: `config.json` {"format": "llama-native", "head", "model": ModelConfig} + safetensors
  with our (Meta) parameter names, one file or shards with `model.safetensors.index.json`.
- hf: `config.json` (LlamaForCausalLM / LlamaForSequenceClassification) + safetensors with HF
  names; HF stores q/k rows permuted for its rotate-half RoPE, which we undo on import.
- meta: `params.json` + `consolidated.NN.pth` model-parallel shards (read with weights_only=True).

Loading builds the model on the meta device and assigns the loaded tensors by name, so the
weights are in memory once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama.config import ModelConfig, RopeScaling
from llama.model import Transformer

NATIVE = "llama-native"
MAX_SHARD_BYTES = 5 * 2**30

# native name -> HF name; {} is the layer index.
_HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "score.weight": "score.weight",
    "layers.{}.attention.wq.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attention.wk.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attention.wv.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attention.wo.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w2.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.feed_forward.w3.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.attention_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
_FROM_HF = {hf: native for native, hf in _HF_NAMES.items()}
_HF_ARCH = {"lm": "LlamaForCausalLM", "reward": "LlamaForSequenceClassification"}
# Meta model-parallel shards: dim along which each tensor was split (None: replicated).
_META_SPLIT_DIM = {"tok_embeddings": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


class CheckpointError(ValueError):
    pass


def _template(name: str) -> tuple[str, str | None]:
    m = re.match(r"^(model\.)?layers\.(\d+)\.(.*)$", name)
    return (f"{m.group(1) or ''}layers.{{}}.{m.group(3)}", m.group(2)) if m else (name, None)


def _rename(name: str, table: dict[str, str]) -> str | None:
    key, layer = _template(name)
    if key not in table:
        return None
    return table[key].format(layer) if layer is not None else table[key]


def _rope_permute(w: torch.Tensor, n_heads: int, to_hf: bool) -> torch.Tensor:
    """Meta pairs (2i, 2i+1) per head <-> HF halves (i, i + hd/2)."""
    out_dim, in_dim = w.shape
    half = out_dim // n_heads // 2
    shape = (n_heads, half, 2, in_dim) if to_hf else (n_heads, 2, half, in_dim)
    return w.reshape(shape).transpose(1, 2).reshape(out_dim, in_dim).contiguous()


# ----------------------------------------------------------------------------- configs


def detect_format(path) -> str:
    path = Path(path)
    if (path / "params.json").is_file():
        return "meta"
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json or params.json)")
    return "native" if json.loads(cfg.read_text()).get("format") == NATIVE else "hf"


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if hf.get("model_type", "llama") != "llama" or arch not in _HF_ARCH.values():
        raise CheckpointError(f"{source}: not a Llama checkpoint (model_type {hf.get('model_type')!r}, {arch})")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise CheckpointError(f"{source}: {key}=true is not a Llama 3 architecture")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"{source}: rope_type {rope_type!r} is not supported (only default and llama3)")
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_seq_len=int(rope["original_max_position_embeddings"]),
        )
    heads = hf["num_attention_heads"]
    cfg = ModelConfig(
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        ffn_dim=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise CheckpointError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    return cfg, "reward" if arch == "LlamaForSequenceClassification" else "lm"


def config_to_hf(cfg: ModelConfig, head: str, dtype: torch.dtype) -> dict:
    hf = {
        "architectures": [_HF_ARCH[head]],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        hf["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
    if cfg.vocab_size == 128256:  # the Llama 3 tokenizer's special tokens
        hf.update(bos_token_id=128000, eos_token_id=[128001, 128008, 128009])
    if head == "reward":
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


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


def read_config(path) -> tuple[ModelConfig, str, str]:
    """-> (config, head stored in the checkpoint, format)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "meta":
        return config_from_meta(json.loads((path / "params.json").read_text()), str(path / "params.json")), "lm", fmt
    raw = json.loads((path / "config.json").read_text())
    if fmt == "native":
        return ModelConfig.from_dict(raw["model"], str(path / "config.json")), raw.get("head", "lm"), fmt
    cfg, head = config_from_hf(raw, str(path / "config.json"))
    return cfg, head, fmt


# ----------------------------------------------------------------------------- tensors


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors files")
    return files


def read_tensors(path, fmt: str, config: ModelConfig, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, under native names and in native layout."""
    path = Path(path)
    if fmt == "meta":
        return _read_meta(path, config)
    out = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if fmt == "hf":
                    native = _rename(name, _FROM_HF)
                    name = native if native is not None else f"<hf>{name}"
                    if name.endswith("attention.wq.weight"):
                        t = _rope_permute(t, config.n_heads, to_hf=False)
                    elif name.endswith("attention.wk.weight"):
                        t = _rope_permute(t, config.n_kv_heads, to_hf=False)
                out[name] = t
    return out


def _read_meta(path: Path, config: ModelConfig) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{path}: params.json but no consolidated.NN.pth shards")
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    out = {}
    for name in shards[0]:
        if name.endswith("rope.freqs"):  # Llama 2 checkpoints store RoPE frequencies; we compute them
            continue
        parts = [s[name] for s in shards]
        dim = _META_SPLIT_DIM.get(name.split(".")[-2])
        out[name] = parts[0].clone() if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
    return out


# ----------------------------------------------------------------------------- load / save


def load_model(path, head: str | None = None, dtype: torch.dtype | None = None, device="cpu") -> Transformer:
    """Load a native, Hugging Face or Meta checkpoint directory (auto-detected) into our model.

    `head` defaults to the checkpoint's. It may differ: an LM checkpoint loaded with head="reward"
    drops the LM head and gets a freshly initialized scalar head (how the reward model starts).
    `dtype` defaults to the stored one.
    """
    path = Path(path)
    config, stored_head, fmt = read_config(path)
    head = head or stored_head
    tensors = read_tensors(path, fmt, config, device)
    if (
        fmt == "meta"
        and "output.weight" in tensors
        and torch.equal(tensors["output.weight"], tensors["tok_embeddings.weight"])
    ):
        config = ModelConfig.from_dict({**config.to_dict(), "tie_embeddings": True})
    with torch.device("meta"):
        model = Transformer(config, head=head)
    expected = {k: v.shape for k, v in model.state_dict().items()}

    optional_missing = {"score.weight"} if head == "reward" and stored_head != "reward" else set()
    droppable = set()
    if head != "lm" or config.tie_embeddings:
        droppable.add("output.weight")  # an LM head not needed, or a tied copy (HF may store it)
    if head != "reward":
        droppable.add("score.weight")
    if head == "lm" and not config.tie_embeddings and stored_head == "reward":
        raise CheckpointError(f"{path}: a reward-model checkpoint has no LM head to load with head='lm'")

    problems = []
    for name in sorted(set(expected) - set(tensors) - optional_missing):
        problems.append(f"missing: {name} {tuple(expected[name])}")
    for name in sorted(set(tensors) - set(expected) - droppable):
        problems.append(f"unexpected: {name.removeprefix('<hf>')} {tuple(tensors[name].shape)}")
    for name in sorted(set(tensors) & set(expected)):
        if tensors[name].shape != expected[name]:
            problems.append(
                f"shape: {name} is {tuple(tensors[name].shape)} in the checkpoint, model wants {tuple(expected[name])}"
            )
    if problems:
        raise CheckpointError(f"{path} ({fmt}) does not match the model config:\n  " + "\n  ".join(problems))

    state = {}
    for name in list(tensors):  # convert one tensor at a time: never two copies of the model
        t = tensors.pop(name)
        if name in expected:
            state[name] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if "score.weight" in optional_missing:
        ref = model.tok_embeddings.weight
        model.score.to_empty(device=ref.device).to(ref.dtype)
        model._init_head()
    return model


def _atomic_dir(path: Path):
    """A temp dir beside `path`; `commit()` swaps it into place in one rename."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)

    def commit():
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)

    return tmp, commit


def save_tensors(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json."""
    shards, size = [[]], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n].contiguous() for n in names}, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_checkpoint(
    state, config: ModelConfig, head: str, path, format: str = "native", max_shard_bytes=MAX_SHARD_BYTES
):
    """Write a full (unsharded) state dict in native or HF format, atomically."""
    if format not in ("native", "hf"):
        raise ValueError(f"unknown checkpoint format {format!r}; expected 'native' or 'hf'")
    path = Path(path)
    state = {k: v.detach() for k, v in state.items()}
    dtype = next(iter(state.values())).dtype
    if format == "hf":
        out = {}
        for name, t in state.items():
            if name.endswith("attention.wq.weight"):
                t = _rope_permute(t, config.n_heads, to_hf=True)
            elif name.endswith("attention.wk.weight"):
                t = _rope_permute(t, config.n_kv_heads, to_hf=True)
            out[_rename(name, _HF_NAMES)] = t
        state, cfg = out, config_to_hf(config, head, dtype)
    else:
        cfg = {"format": NATIVE, "head": head, "model": config.to_dict()}
    tmp, commit = _atomic_dir(path)
    save_tensors(state, tmp, max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    commit()


def save_model(model: Transformer, path, format: str = "native", max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    save_checkpoint(model.state_dict(), model.config, model.head, path, format, max_shard_bytes)
