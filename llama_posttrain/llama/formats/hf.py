"""Hugging Face's checkpoint format: its parameter names, its q/k layout, its config.json, and the
tokenizer files of its folders.

`config.json` (LlamaForCausalLM / LlamaForSequenceClassification) + safetensors (the folder of
llama_posttrain/llama/formats/native.py) with HF names; HF stores q/k rows permuted for its rotate-half RoPE, which is
undone on import (`state_from_hf`) and redone on export (`state_to_hf`). Given the tokenizer (and chat
template), a save also writes what transformers needs to use the folder on its own (`tokenizer_files`):
tokenizer.json, tokenizer_config.json with the chat template and `model_max_length`, special_tokens_map.json,
generation_config.json (the stop ids, and the source model's sampling defaults: `generation_defaults`),
and the token ids in config.json.
"""

from __future__ import annotations

import copy
import json
import re
import weakref
from pathlib import Path

import torch

from llama_posttrain.llama.chat import ChatFormat, jinja_template
from llama_posttrain.llama.config import ModelConfig, RopeScaling
from llama_posttrain.llama.formats import CheckpointError, read_json
from llama_posttrain.llama.heads import HEADS, get_head
from llama_posttrain.llama.tokenizer_kinds import SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, bytes_to_unicode

# native name -> HF name; {} is the layer index. The heads' own: llama_posttrain/llama/heads.py.
_HF_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    **{name: hf for head in HEADS.values() for name, hf in head.hf_names.items()},
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
HEAD_OF_ARCH = {head.hf_architecture: name for name, head in HEADS.items()}


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


def state_from_hf(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names and q/k layout -> ours, one tensor at a time (taken out of `tensors`). A name with no
    counterpart is kept as `<hf>NAME`, for the loader to report."""
    out = {}
    for name in list(tensors):
        t = tensors.pop(name)
        native = _rename(name, _FROM_HF)
        name = native if native is not None else f"<hf>{name}"
        if name.endswith("attention.wq.weight"):
            t = _rope_permute(t, config.n_heads, to_hf=False)
        elif name.endswith("attention.wk.weight"):
            t = _rope_permute(t, config.n_kv_heads, to_hf=False)
        out[name] = t
    return out


def state_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names and q/k layout -> HF's."""
    out = {}
    for name, t in state.items():
        if name.endswith("attention.wq.weight"):
            t = _rope_permute(t, config.n_heads, to_hf=True)
        elif name.endswith("attention.wk.weight"):
            t = _rope_permute(t, config.n_kv_heads, to_hf=True)
        out[_rename(name, _HF_NAMES)] = t
    return out


# ----------------------------------------------------------------------------- config.json


def config_from_hf(hf: dict, source: str = "config.json") -> tuple[ModelConfig, str]:
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if hf.get("model_type", "llama") != "llama" or arch not in HEAD_OF_ARCH:
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
    return cfg, HEAD_OF_ARCH[arch]


def config_to_hf(cfg: ModelConfig, head: str, dtype: torch.dtype, tokenizer: Tokenizer | None = None) -> dict:
    head = get_head(head)
    hf = {
        "architectures": [head.hf_architecture],
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
    hf.update(copy.deepcopy(head.hf_config))
    return hf


# ----------------------------------------------------------------------------- tokenizer files


# generation_config.json keys a save sets itself (the token ids of its tokenizer, ending in _token_id) or
# that are transformers' bookkeeping: not taken from the source model's file.
_NOT_GENERATION_DEFAULTS = ("transformers_version", "_from_model_config", "_commit_hash", "_original_object_hash")


def is_generation_default(key: str) -> bool:
    """Whether a generation_config.json key is a generation default kept from the source model (do_sample,
    temperature, top_p, top_k, ...), not a token id or bookkeeping."""
    return not key.endswith("_token_id") and key not in _NOT_GENERATION_DEFAULTS


def generation_defaults(folder) -> dict:
    """The generation defaults of the model folder `folder` (the source of a save: a hub Instruct model's
    do_sample, temperature 0.6, top_p 0.9), from its generation_config.json: every key but the token ids
    (a save writes its own tokenizer's) and transformers' bookkeeping. {} without a folder or a file; a
    file that is not a JSON object is an error naming it."""
    file = Path(folder) / "generation_config.json" if folder else None
    if file is None or not file.is_file():
        return {}
    return {k: v for k, v in read_json(file).items() if is_generation_default(k)}


def tokenizer_files(
    tokenizer: Tokenizer,
    chat_template: str | None,
    format: str,
    max_seq_len: int | None = None,
    generation: dict | None = None,
) -> dict[str, bytes]:
    """The tokenizer files of a checkpoint folder: name -> content.

    A byte-level BPE tokenizer: tokenizer.json, tokenizer_config.json (bos, eos = the chat template's end of
    turn: <|eot_id|> as in Meta's Instruct folders, <|im_end|> for ChatML; pad = <|finetune_right_pad_id|>,
    else the eos; the Jinja chat template of
    `chat_template` if given, and `model_max_length` = `max_seq_len` if given), special_tokens_map.json;
    "hf" adds generation_config.json (stop ids: the end of turn, of message and of text; then the
    `generation` defaults, `generation_defaults` of the source folder), which a native folder holds too
    where there are such defaults, so that a later stage's export from it keeps them. llama.tokenizer reads
    tokenizer.json back, so a native folder holds the same files. A SentencePiece tokenizer has no
    tokenizer.json form: its tokenizer.model is copied, with the chat template as chat_template.jinja
    (transformers would treat it as Llama 2's)."""
    template = {"chat_template": jinja_template(chat_template)} if chat_template else {}
    if isinstance(tokenizer, SentencePieceTokenizer):
        files = {"tokenizer.model": tokenizer.path.read_bytes()}
        if chat_template:
            files["chat_template.jinja"] = template["chat_template"].encode()
        return files
    added = getattr(tokenizer, "added_tokens", tokenizer.special_tokens)  # BPETokenizer: special or not
    names = {i: s for s, i in added.items()}
    # the end of turn and the stop ids: the chat template's own terminator (<|eot_id|>, <|im_end|>, ...)
    chat = ChatFormat(tokenizer, chat_template) if chat_template else None
    eot = chat.eot_id if chat else tokenizer.special_tokens.get("<|eot_id|>", tokenizer.eos_id)
    stop_ids = chat.stop_ids if chat else tokenizer.stop_ids
    special = {
        **({"bos_token": names[tokenizer.bos_id]} if tokenizer.bos_id is not None else {}),
        "eos_token": names[eot],
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
                "special": s in tokenizer.special_tokens,
            }
            for i, s in sorted(names.items())
        },
        **special,
        **template,
        **({"model_max_length": max_seq_len} if max_seq_len is not None else {}),
        "clean_up_tokenization_spaces": False,  # decode exactly as tiktoken does
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    files = {
        "tokenizer.json": _tokenizer_json_text(tokenizer),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }
    if format == "hf" or generation:
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": stop_ids, "pad_token_id": tokenizer.pad_id}
        defaults = {k: v for k, v in (generation or {}).items() if is_generation_default(k)}
        files["generation_config.json"] = json.dumps({**ids, **defaults}, indent=2, ensure_ascii=False)
    return {name: text.encode() for name, text in files.items()}


_TOKENIZER_JSON = weakref.WeakKeyDictionary()  # tokenizer -> its tokenizer.json text (~2 s for 128k tokens)


def _tokenizer_json_text(tok: Tokenizer) -> str:
    """hf_tokenizer_json as written, made once per tokenizer: a run checks its export folders at start and
    writes two exports, each of which needs it."""
    if tok not in _TOKENIZER_JSON:
        _TOKENIZER_JSON[tok] = json.dumps(hf_tokenizer_json(tok), ensure_ascii=False)
    return _TOKENIZER_JSON[tok]


def hf_tokenizer_json(tok: Tokenizer) -> dict:
    """A tiktoken tokenizer as a Hugging Face tokenizer.json (byte-level BPE), as transformers converts
    Meta's tokenizer.model: every split of a token into two tokens is a merge, listed in the token's rank
    order; ignore_merges, as tiktoken, takes a piece found whole in the vocabulary as one token. A tokenizer
    read from another model's tokenizer.json (BPETokenizer) is that file, as read."""
    if hasattr(tok, "raw"):
        return tok.raw
    if not isinstance(tok, TiktokenTokenizer):
        raise ValueError(f"{tok.path}: a SentencePiece tokenizer has no byte-level tokenizer.json form")
    stand_in = bytes_to_unicode()

    def text(b: bytes) -> str:
        return b.decode("latin-1").translate(stand_in)

    ranks, merges = tok.ranks, []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [f"{text(a)} {text(b)}" for a, b in sorted(splits, key=lambda p: (ranks[p[0]], ranks[p[1]]))]
    bos = tok.special_tokens["<|begin_of_text|>"]
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {  # <|begin_of_text|> first when add_special_tokens (Meta's tokenizer.json does this)
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
            ],
            "pair": [
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {
                "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos], "tokens": ["<|begin_of_text|>"]}
            },
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {text(b): r for b, r in sorted(ranks.items(), key=lambda kv: kv[1])},
            "merges": merges,
        },
    }
