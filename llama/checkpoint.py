"""Checkpoints: native safetensors, Hugging Face import/export, Meta import.

Formats (told apart by the files in the directory):
- native: `config.json` {"format": "llama-native", "head", "model": ModelConfig} + safetensors
  with our (Meta) parameter names, one file or shards with `model.safetensors.index.json`.
  Only the files the index names (or the single `model.safetensors`) are read: a stray extra
  `*.safetensors` in the folder cannot override tensors.
- hf: `config.json` (LlamaForCausalLM / LlamaForSequenceClassification) + safetensors with HF
  names; HF stores q/k rows permuted for its rotate-half RoPE, which we undo on import.
  Given the tokenizer (and chat template), an HF save also writes what transformers needs to use the
  folder on its own (`tokenizer_files`): tokenizer.json, tokenizer_config.json with the chat template,
  special_tokens_map.json, generation_config.json, and the token ids in config.json.
- meta: `params.json` + `consolidated.NN.pth` model-parallel shards (read with weights_only=True).

Loading builds the model on the meta device and assigns the loaded tensors by name, so the
weights are in memory once. Saving never deletes a file this project did not write (see
`save_checkpoint`; `replace_tokenizer=True` asks it to replace the folder's own tokenizer files), never
replaces a folder's own tokenizer files silently (`check_tokenizer_files`), and model files are
safetensors only: no pickle is ever written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llama.chat import jinja_template
from llama.config import ModelConfig, RopeScaling
from llama.model import Transformer
from llama.tokenizer import SentencePieceTokenizer, Tokenizer, hf_tokenizer_json

NATIVE = "llama-native"
MAX_SHARD_BYTES = 5 * 2**30
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Tag in the safetensors metadata of every weight file we write: a later save into the same folder
# may remove such a file once its new index no longer names it; files without the tag are never removed.
WRITER = "llama-posttrain"

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


def _read_json(file: Path) -> dict:
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise CheckpointError(f"{file}: cannot read it as JSON: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    return raw


def detect_format(path) -> str:
    path = Path(path)
    if (path / "params.json").is_file():
        return "meta"
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json or params.json)")
    return "native" if _read_json(cfg).get("format") == NATIVE else "hf"


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


def config_to_hf(cfg: ModelConfig, head: str, dtype: torch.dtype, tokenizer: Tokenizer | None = None) -> dict:
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
    if tokenizer is not None:
        hf.update(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.stop_ids, pad_token_id=tokenizer.pad_id)
    elif cfg.vocab_size == 128256:  # no tokenizer given: the Llama 3 tokenizer's special tokens
        hf.update(bos_token_id=128000, eos_token_id=[128001, 128008, 128009], pad_token_id=128004)
    if head == "reward":
        # transformers scores a sequence at its last token that is not pad_token_id: without one it
        # refuses batches of more than one sequence
        hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    return hf


def tokenizer_files(tokenizer: Tokenizer, chat_template: str | None, format: str) -> dict[str, bytes]:
    """The tokenizer files of a checkpoint folder: name -> content.

    A tiktoken (byte-level BPE) tokenizer: tokenizer.json, tokenizer_config.json (bos, eos = <|eot_id|>
    as in Meta's Instruct folders, pad = <|finetune_right_pad_id|>, and the Jinja chat template of
    `chat_template` if given), special_tokens_map.json; "hf" adds generation_config.json (stop ids: the
    end of turn, of message and of text). llama.tokenizer reads tokenizer.json back, so a native folder
    holds the same files. A SentencePiece tokenizer has no tokenizer.json form: its tokenizer.model is
    copied, with the chat template as chat_template.jinja (transformers would treat it as Llama 2's)."""
    template = {"chat_template": jinja_template(chat_template)} if chat_template else {}
    if isinstance(tokenizer, SentencePieceTokenizer):
        files = {"tokenizer.model": tokenizer.path.read_bytes()}
        if chat_template:
            files["chat_template.jinja"] = template["chat_template"].encode()
        return files
    names = {i: s for s, i in tokenizer.special_tokens.items()}
    special = {
        "bos_token": names[tokenizer.bos_id],
        "eos_token": names[tokenizer.eot_id],
        "pad_token": names[tokenizer.pad_id],
    }
    config = {
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, s in sorted(names.items())
        },
        **special,
        **template,
        "clean_up_tokenization_spaces": False,  # decode exactly as tiktoken does
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    files = {
        "tokenizer.json": json.dumps(hf_tokenizer_json(tokenizer), ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    if format == "hf":
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.stop_ids, "pad_token_id": tokenizer.pad_id}
        files["generation_config.json"] = json.dumps(ids, indent=2)
    return {name: text.encode() for name, text in files.items()}


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
    """-> (config, head stored in the checkpoint, format). Errors name the config file."""
    path = Path(path)
    fmt = detect_format(path)
    file = path / ("params.json" if fmt == "meta" else "config.json")
    raw = _read_json(file)
    try:
        if fmt == "meta":
            return config_from_meta(raw, str(file)), "lm", fmt
        if fmt == "native":
            head = raw.get("head", "lm")
            if head not in _HF_ARCH:
                raise CheckpointError(f"{file}: head {head!r} is not one of {sorted(_HF_ARCH)}")
            return ModelConfig.from_dict(raw["model"], str(file)), head, fmt
        cfg, head = config_from_hf(raw, str(file))
        return cfg, head, fmt
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{file}: missing key {e}") from None
    except (TypeError, ValueError, AttributeError) as e:  # wrong types or values in the JSON
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(file)) else f"{file}: {msg}") from None


# ----------------------------------------------------------------------------- tensors


def _index_files(index: Path) -> list[str]:
    """The file names an index's weight_map names (plain names in the same folder)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
    if bad:
        raise CheckpointError(f"{index}: weight_map names files outside the folder: {bad[:3]}")
    return names


def weight_files(path) -> list[Path]:
    """The weight files of a safetensors checkpoint: those its index names, else `model.safetensors`.

    Any other `*.safetensors` in the folder is not read (counted and printed)."""
    path = Path(path)
    if (path / INDEX).is_file():
        files = [path / n for n in _index_files(path / INDEX)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path / INDEX} names weight file(s) that are missing: {', '.join(missing)}")
    elif (path / SINGLE).is_file():
        files = [path / SINGLE]
    else:
        found = sorted(p.name for p in path.glob("*.safetensors"))
        hint = f" (found {', '.join(found)}: not read without an index naming them)" if found else ""
        raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}{hint}")
    ignored = sorted(p.name for p in set(path.glob("*.safetensors")) - set(files))
    if ignored:
        print(
            f"{path}: ignoring {len(ignored)} safetensors file(s) the checkpoint does not name: {', '.join(ignored)}",
            file=sys.stderr,
        )
    return files


def open_weights(file: Path, device="cpu"):
    """safe_open, with the file named if it is truncated or corrupt."""
    try:
        return safe_open(str(file), framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def tensor_files(path) -> dict[str, Path]:
    """tensor name -> the weight file holding it. A name held by two files is an error."""
    out = {}
    for file in weight_files(path):
        with open_weights(file) as f:
            for name in f.keys():
                if name in out:
                    raise CheckpointError(f"tensor {name} is in two weight files: {out[name]} and {file}")
                out[name] = file
    return out


def read_tensors(path, fmt: str, config: ModelConfig, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, under native names and in native layout."""
    path = Path(path)
    if fmt == "meta":
        return _read_meta(path, config)
    by_file: dict[Path, list[str]] = {}
    for name, file in tensor_files(path).items():
        by_file.setdefault(file, []).append(name)
    out = {}
    for file, names in by_file.items():
        with open_weights(file, device) as f:
            for name in names:
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


def load_model(
    path, head: str | None = None, dtype: torch.dtype | None = None, device="cpu", new_head_ok: bool = False
) -> Transformer:
    """Load a native, Hugging Face or Meta checkpoint directory (auto-detected) into our model.

    `head` defaults to the checkpoint's. head="reward" on a checkpoint without a reward head is an
    error (it would score with random weights) unless `new_head_ok`: then the LM head is dropped and
    a freshly initialized scalar head is made (how reward-model training starts from an LM).
    `dtype` defaults to the stored one.
    """
    path = Path(path)
    config, stored_head, fmt = read_config(path)
    head = head or stored_head
    if head == "reward" and stored_head != "reward" and not new_head_ok:
        raise CheckpointError(
            f"{path} is a language-model checkpoint with no reward head: pass a reward-model checkpoint "
            "(a fresh scalar head is made only where asked for, e.g. to start reward-model training)"
        )
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


def _nbytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    """Bytes of `t` once written (cast to `dtype` if floating point)."""
    return t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())


def _shard_plan(state: dict[str, torch.Tensor], max_shard_bytes: int, dtype) -> list[tuple[str, list[str]]]:
    """-> [(file name, tensor names)]: model.safetensors, or model-0000k-of-0000n.safetensors."""
    shards, size = [[]], 0
    for name, t in state.items():
        nbytes = _nbytes(t, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    if len(shards) == 1:
        return [(SINGLE, shards[0])]
    return [(f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", names) for i, names in enumerate(shards)]


def _write_files(
    directory: Path, state: dict, cfg: dict, max_shard_bytes: int, index: bool, dtype, extra: dict[str, bytes]
) -> set[str]:
    """Write the weight files (cast to `dtype` one shard at a time), the index (if sharded or `index`),
    the `extra` files and config.json into `directory`.

    Each is written under a temp name first; all are then renamed into place, config.json last.
    -> the names written."""
    plan = _shard_plan(state, max_shard_bytes, dtype)
    tag = uuid.uuid4().hex[:8]
    pending = []  # (temp path, final path)
    try:
        for file, names in plan:
            tmp = directory / f".{file}.tmp-{tag}"
            pending.append((tmp, directory / file))
            shard = {n: _cast(state[n], dtype).contiguous() for n in names}
            save_file(shard, str(tmp), metadata={"format": "pt", "writer": WRITER})
            del shard
        for file, content in extra.items():
            tmp = directory / f".{file}.tmp-{tag}"
            pending.append((tmp, directory / file))
            tmp.write_bytes(content)
        if index or len(plan) > 1:
            total = sum(_nbytes(t, dtype) for t in state.values())
            weight_map = {n: file for file, names in plan for n in names}
            tmp = directory / f".{INDEX}.tmp-{tag}"
            pending.append((tmp, directory / INDEX))
            tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        tmp = directory / f".config.json.tmp-{tag}"
        pending.append((tmp, directory / "config.json"))
        tmp.write_text(json.dumps(cfg, indent=2))
        for tmp, final in pending:
            os.replace(tmp, final)
    finally:
        for tmp, _ in pending:
            tmp.unlink(missing_ok=True)
    return {final.name for _, final in pending}


def _written_by_us(file: Path) -> bool:
    try:
        with safe_open(str(file), framework="pt") as f:
            return (f.metadata() or {}).get("writer") == WRITER
    except (SafetensorError, OSError):
        return False


def _previous_weight_files(path: Path) -> set[str]:
    """Weight file names of the checkpoint already in `path` (its index's, and model.safetensors)."""
    names = {SINGLE} if (path / SINGLE).is_file() else set()
    if (path / INDEX).is_file():
        try:
            names |= set(_index_files(path / INDEX))
        except CheckpointError:
            pass  # a broken index: its files are not known to be ours, so none is removed
    return names


def _is_new(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def _is_weight_name(name: str) -> bool:
    return name in (SINGLE, INDEX) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name) is not None


def check_destination(
    path,
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
    format: str = "native",
    replace_tokenizer: bool = False,
) -> None:
    """Raise unless `save_checkpoint` may write to `path`. Call it before long work whose result goes there.

    Allowed: a missing or empty directory; a (native or HF) checkpoint directory, whose config and
    weights are replaced and the rest kept; a folder of other files (a tokenizer, a README) that holds
    no config.json or weight file we did not write, to which ours are added. Anything else is refused
    rather than overwritten. With `tokenizer` (and `chat_template`, `format`: what the save will write),
    the folder's own tokenizer files are checked too (`check_tokenizer_files`)."""
    path = Path(path)
    if _is_new(path):
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if (path / "params.json").exists():
        raise CheckpointError(
            f"{path} holds a Meta checkpoint (params.json): writing another checkpoint beside it would leave two "
            "in one folder; write to a new directory"
        )
    if (path / "config.json").exists():
        try:
            read_config(path)
        except CheckpointError as e:
            raise CheckpointError(
                f"refusing to write a checkpoint into {path}: its config.json is not a Llama checkpoint's and would "
                f"be overwritten ({e}); choose a new or empty directory"
            ) from None
    else:
        clash = sorted(p.name for p in path.iterdir() if _is_weight_name(p.name) and not _written_by_us(p))
        if clash:
            raise CheckpointError(
                f"refusing to write a checkpoint into {path}: it holds weight files this project did not write and "
                f"no config.json ({', '.join(clash)}); choose a new or empty directory"
            )
    if tokenizer is not None:
        check_tokenizer_files(path, tokenizer_files(tokenizer, chat_template, format), replace_tokenizer)


# A model folder's tokenizer and chat format: what tokenizer_files writes, and what would be read in place
# of (or beside) what it writes. generation_config.json only counts where it is written (HF).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json",
)  # fmt: skip


def check_tokenizer_files(path, files: dict[str, bytes], replace: bool = False) -> list[str]:
    """Raise unless writing the tokenizer files `files` (name -> content) into the existing folder `path`
    replaces nothing of the folder's own. A file there with other content than ours (another tokenizer,
    chat template or generation config: a user's, or an earlier save's) is refused unless `replace`;
    a tokenizer file there that `files` does not hold (a tokenizer.model read before our tokenizer.json,
    a chat_template.jinja read before our tokenizer_config.json's template) is refused too, and with
    `replace` returned, for the caller to remove once the new files are in place. Identical files pass."""
    path = Path(path)
    if not files or not path.is_dir():
        return []
    differ = [n for n in files if (path / n).is_file() and (path / n).read_bytes() != files[n]]
    shadow = [n for n in TOKENIZER_FILES if n not in files and n != "generation_config.json" and (path / n).exists()]
    if (differ or shadow) and not replace:
        problems = []
        if differ:
            problems.append(f"{', '.join(differ)} would be replaced by this checkpoint's (they differ)")
        if shadow:
            problems.append(f"{', '.join(shadow)} would be read instead of the tokenizer files it writes")
        raise CheckpointError(
            f"refusing to write the tokenizer files into {path}: its own {'; '.join(problems)}. Keep them by "
            "writing to a new folder, or replace them: --replace-tokenizer (replace_tokenizer=True)"
        )
    return shadow


def state_dtype(state: dict) -> torch.dtype:
    """The dtype of a state dict's floating-point tensors (what a checkpoint records as its dtype)."""
    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def save_checkpoint(
    state,
    config: ModelConfig,
    head: str,
    path,
    format: str = "native",
    max_shard_bytes=MAX_SHARD_BYTES,
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
    dtype: torch.dtype | None = None,
    replace_tokenizer: bool = False,
):
    """Write a full (unsharded) state dict in native or HF format, safetensors only.

    `dtype`: cast the weights to it as they are written (default: as they are). `tokenizer` (and the
    `chat_template` name, llama/chat.py): also write the tokenizer files (`tokenizer_files`), so that
    the folder is complete for transformers (HF) or for this project's tools (native).

    A new or empty `path` is built as a temp directory beside it and renamed into place: all or nothing.
    Into an existing folder (an earlier save, the source of an in-place conversion, a folder holding a
    tokenizer; see `check_destination` for what is refused) only config.json, the index, the weight
    files and the tokenizer files (if given) are written, each through a temp name, config.json last;
    every other file is kept. Weight files of the previous checkpoint that the new one does not name
    are removed only if this project wrote them (the WRITER tag); others are left, listed, and not read.
    The folder's own tokenizer files are never replaced silently: any that differ from those written
    here, or would be read in their place, are refused (`check_tokenizer_files`) unless
    `replace_tokenizer`; then they are replaced, and those not written here removed (both printed).
    """
    if format not in ("native", "hf"):
        raise ValueError(f"unknown checkpoint format {format!r}; expected 'native' or 'hf'")
    if chat_template is not None and tokenizer is None:
        raise ValueError("a chat template is written with the tokenizer files: pass the tokenizer too")
    path = Path(path)
    state = {k: v.detach() for k, v in state.items()}
    dtype = dtype or state_dtype(state)
    extra = tokenizer_files(tokenizer, chat_template, format) if tokenizer is not None else {}
    if format == "hf":
        out = {}
        for name, t in state.items():
            if name.endswith("attention.wq.weight"):
                t = _rope_permute(t, config.n_heads, to_hf=True)
            elif name.endswith("attention.wk.weight"):
                t = _rope_permute(t, config.n_kv_heads, to_hf=True)
            out[_rename(name, _HF_NAMES)] = t
        state, cfg = out, config_to_hf(config, head, dtype, tokenizer)
    else:
        cfg = {"format": NATIVE, "head": head, "model": config.to_dict()}

    if _is_new(path):
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            _write_files(tmp, state, cfg, max_shard_bytes, False, dtype, extra)
            os.replace(tmp, path)  # onto a missing or empty directory: one rename
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return

    check_destination(path)
    shadow = check_tokenizer_files(path, extra, replace_tokenizer)
    replaced = [n for n in extra if (path / n).is_file() and (path / n).read_bytes() != extra[n]]
    previous = _previous_weight_files(path)
    # Keep an existing index (replaced, naming the new files) rather than deleting it.
    written = _write_files(path, state, cfg, max_shard_bytes, (path / INDEX).is_file(), dtype, extra)
    left = []
    for name in sorted(previous - written):
        if _written_by_us(path / name):
            (path / name).unlink()
        else:
            left.append(name)
    for name in shadow:
        (path / name).unlink()
    done = [f"replaced {', '.join(replaced)} with this checkpoint's"] if replaced else []
    done += [f"removed {', '.join(shadow)}, which would have been read in place of them"] if shadow else []
    if done:
        print(f"{path}: the folder's own tokenizer files (replace_tokenizer): {'; '.join(done)}", file=sys.stderr)
    if left:
        print(
            f"{path}: left {len(left)} weight file(s) of the previous checkpoint that this project did not write "
            f"(not read: the new checkpoint does not name them; delete them if not needed): {', '.join(left)}",
            file=sys.stderr,
        )


def save_model(
    model: Transformer,
    path,
    format: str = "native",
    max_shard_bytes: int = MAX_SHARD_BYTES,
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
    dtype: torch.dtype | None = None,
    replace_tokenizer: bool = False,
) -> None:
    """`save_checkpoint` of a model; with `tokenizer` (and `chat_template`) a folder transformers loads on its own."""
    state = model.state_dict()
    save_checkpoint(
        state, model.config, model.head, path, format, max_shard_bytes, tokenizer, chat_template, dtype,
        replace_tokenizer,
    )  # fmt: skip
