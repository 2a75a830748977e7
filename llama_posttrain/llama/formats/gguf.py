"""GGUF, llama.cpp's one-file format (read only): a Llama model's weights, config and tokenizer.

    python -m llama_posttrain.llama.convert --from gguf FILE.gguf DST [--to native|hf]

Read through the `gguf` package (pip install 'llama-posttrain[gguf]'), imported only here.

- Weights: every tensor is dequantized to float32 by `gguf.quants.dequantize` (the package's numpy port
  of ggml's block formats; tests/test_gguf.py checks it against transformers' own torch dequantizer and
  the logits against transformers' GGUF load). Accepted types: `DEQUANTIZED` (each one tested).
- Names: token_embd, blk.N.attn_q/k/v/output, ffn_gate/up/down, attn_norm, ffn_norm, output_norm,
  output (absent: tied embeddings). q/k: llama.cpp's convert_hf_to_gguf permutes HF's rotate-half rows
  back into pairs (its `permute` is hf.py's `_rope_permute(to_hf=False)`), so a GGUF holds q/k in Meta's
  interleaved layout, ours: they are taken as stored, with no permutation to undo on our side.
- Config: from `llama.*` metadata (`config_from_gguf`); Llama 3.1 RoPE scaling from the `rope_freqs`
  tensor llama.cpp writes in its place (`rope_scaling_from_freqs`).
- Tokenizer: a byte-level BPE vocabulary (tokenizer.ggml.model "gpt2") becomes a Hugging Face
  tokenizer.json + tokenizer_config.json (with the chat template, tokenizer.chat_template) +
  special_tokens_map.json + generation_config.json (`tokenizer_files`); the pre-tokenizer is llama.cpp's
  for tokenizer.ggml.pre (`PRE_TOKENIZERS`). A SentencePiece vocabulary ("llama") has no such form: the
  weights are written alone (printed).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import torch

from llama_posttrain.llama.config import ModelConfig, RopeScaling
from llama_posttrain.llama.formats import CheckpointError
from llama_posttrain.llama.model import Transformer, rope_inv_freq

DEQUANTIZED = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# GGUF name -> native name; {} is the layer index. rope_freqs is read into the config.
_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{}.attn_q.weight": "layers.{}.attention.wq.weight",
    "blk.{}.attn_k.weight": "layers.{}.attention.wk.weight",
    "blk.{}.attn_v.weight": "layers.{}.attention.wv.weight",
    "blk.{}.attn_output.weight": "layers.{}.attention.wo.weight",
    "blk.{}.ffn_gate.weight": "layers.{}.feed_forward.w1.weight",
    "blk.{}.ffn_down.weight": "layers.{}.feed_forward.w2.weight",
    "blk.{}.ffn_up.weight": "layers.{}.feed_forward.w3.weight",
    "blk.{}.attn_norm.weight": "layers.{}.attention_norm.weight",
    "blk.{}.ffn_norm.weight": "layers.{}.ffn_norm.weight",
}
ROPE_FREQS = "rope_freqs.weight"

# tokenizer.ggml.pre -> (pre_tokenizer, ignore_merges) as llama.cpp splits text for it (llama-vocab.cpp),
# written as the model's own hub tokenizer.json writes it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3 = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False},
    ],
}
PRE_TOKENIZERS = {
    "gpt-2": (_BYTE_LEVEL, False),  # GPT-2's own regex, inside ByteLevel
    "smollm": (
        {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
        False,
    ),
    **{name: (_LLAMA3, True) for name in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3")},
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            "reading GGUF files needs the gguf package: pip install 'llama-posttrain[gguf]' (or pip install gguf)"
        ) from None
    return gguf


class GGUFFile:
    """A GGUF file's metadata (`get`) and tensors (`tensor`), memory-mapped."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: no such file")
        try:
            self.reader = _gguf().GGUFReader(str(self.path))
        except (ValueError, OSError, IndexError, KeyError) as e:  # what the reader raises on a bad header
            raise CheckpointError(f"{self.path}: not a readable GGUF file (truncated or corrupt?): {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.get("general.architecture")

    def get(self, key: str, default=KeyError):
        field = self.reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise CheckpointError(f"{self.path}: metadata key {key} is missing")
            return default
        return field.contents()

    def hparam(self, key: str, default=KeyError):
        """`{arch}.{key}`, a number (an array per layer is not a Llama 3 architecture)."""
        value = self.get(f"{self.arch}.{key}", default)
        if isinstance(value, list):
            raise CheckpointError(f"{self.path}: metadata {self.arch}.{key} varies per layer ({value[:4]}...)")
        return value

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to float32, in PyTorch's (row-major) shape."""
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in DEQUANTIZED:
            raise CheckpointError(
                f"{self.path}: tensor {name} is {kind}, which is not read (supported: {', '.join(DEQUANTIZED)})"
            )
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists the fastest-varying dimension first
        values = _gguf().quants.dequantize(np.asarray(t.data), t.tensor_type)
        # a copy (np.array): an F32 tensor comes back as a view of the file, mapped read-only
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))


# ----------------------------------------------------------------------------- config


def rope_scaling_from_freqs(factors: torch.Tensor, theta: float, head_dim: int, source: str) -> RopeScaling:
    """Llama 3.1 RoPE scaling from llama.cpp's rope_freqs tensor (the divisor of each frequency,
    convert_hf_to_gguf's `rope_factors`): the file stores the factors, not the parameters, so the
    parameters are those of every Llama 3.x release (low 1, high 4, original context 8192) with the
    largest divisor as `factor`, and refused unless they reproduce every stored factor."""
    scaling = RopeScaling(factor=float(factors.max()))
    plain = ModelConfig(dim=head_dim, n_heads=1, n_kv_heads=1, rope_theta=theta, rope_scaling=None)
    ours = rope_inv_freq(plain) / rope_inv_freq(dataclasses.replace(plain, rope_scaling=scaling))
    if factors.shape != ours.shape or not torch.allclose(factors.float(), ours, rtol=1e-4):
        raise CheckpointError(
            f"{source}: tensor {ROPE_FREQS} is not Llama 3's RoPE scaling (factor {scaling.factor}, low 1, high 4, "
            "original context 8192): other scalings are not supported"
        )
    return scaling


def config_from_gguf(f: GGUFFile) -> ModelConfig:
    """The model config of a GGUF file, from its `llama.*` metadata (and rope_freqs)."""
    if f.arch != "llama":
        raise CheckpointError(f"{f.path}: general.architecture is {f.arch!r}; only llama models are read")
    heads = int(f.hparam("attention.head_count"))
    dim = int(f.hparam("embedding_length"))
    vocab = f.hparam("vocab_size", None)
    if vocab is None:  # older files: the tokenizer's length, else the embedding's rows
        tokens = f.reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else int(f.tensors["token_embd.weight"].shape[1])
    theta = float(f.hparam("rope.freq_base", 10000.0))
    head_dim = dim // heads
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = f.hparam(key, None)
        if value is not None and int(value) != head_dim:
            raise CheckpointError(f"{f.path}: {f.arch}.{key} {value} != embedding_length / head_count ({head_dim})")
    scaling_type = f.hparam("rope.scaling.type", "none")
    if scaling_type != "none":
        raise CheckpointError(f"{f.path}: {f.arch}.rope.scaling.type {scaling_type!r} is not supported (only none)")
    scaling = None
    if ROPE_FREQS in f.tensors:
        scaling = rope_scaling_from_freqs(f.tensor(ROPE_FREQS), theta, head_dim, str(f.path))
    try:
        return ModelConfig(
            dim=dim,
            n_layers=int(f.hparam("block_count")),
            n_heads=heads,
            n_kv_heads=int(f.hparam("attention.head_count_kv", heads)),
            ffn_dim=int(f.hparam("feed_forward_length")),
            vocab_size=int(vocab),
            norm_eps=float(f.hparam("attention.layer_norm_rms_epsilon")),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=int(f.hparam("context_length", 2048)),
            tie_embeddings="output.weight" not in f.tensors,
        )
    except ValueError as e:
        raise CheckpointError(f"{f.path}: {e}") from None


# ----------------------------------------------------------------------------- weights


def _native_name(name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(.*)", name)
    key, layer = (f"blk.{{}}.{m.group(2)}", m.group(1)) if m else (name, None)
    return _NAMES[key].format(layer) if key in _NAMES else None


def read_state(f: GGUFFile, config: ModelConfig) -> dict[str, torch.Tensor]:
    """All weights under our names, float32, q/k as stored (Meta's layout, see the module docstring).
    Names and shapes are checked against `config` before anything is dequantized."""
    names = {n: _native_name(n) for n in f.tensors if n != ROPE_FREQS}
    unknown = sorted(n for n, native in names.items() if native is None)
    if unknown:
        raise CheckpointError(f"{f.path}: tensors with no Llama counterpart: {', '.join(unknown[:8])}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    problems = [f"missing: {n}" for n in sorted(set(expected) - set(names.values()))]
    problems += [f"unexpected: {n}" for n in sorted(set(names.values()) - set(expected))]
    for name, native in names.items():
        shape = tuple(int(n) for n in reversed(f.tensors[name].shape))
        if native in expected and shape != expected[native]:
            problems.append(f"shape: {name} is {shape}, the metadata's config wants {expected[native]}")
    if problems:
        raise CheckpointError(f"{f.path} does not match its own metadata:\n  " + "\n  ".join(problems[:8]))
    return {native: f.tensor(name) for name, native in names.items()}


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_files(f: GGUFFile, max_seq_len: int) -> dict[str, bytes]:
    """The Hugging Face tokenizer files of the GGUF's byte-level BPE tokenizer (name -> content); {}
    for a tokenizer with no tokenizer.json form here (printed)."""
    model = f.get("tokenizer.ggml.model", None)
    if model != "gpt2":
        print(f"{f.path}: tokenizer.ggml.model is {model!r}, not byte-level BPE (gpt2): writing the weights only")
        return {}
    tokens = f.get("tokenizer.ggml.tokens")
    types = f.get("tokenizer.ggml.token_type", [1] * len(tokens))
    pre = f.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(
            f"{f.path}: tokenizer.ggml.pre {pre!r}: its pre-tokenizer is not known here "
            f"(known: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    vocab = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            raise CheckpointError(f"{f.path}: tokenizer.ggml.tokens: token {token!r} at {vocab[token]} and {i}")
        vocab[token] = i
    ids = {name: f.get(f"tokenizer.ggml.{name}_token_id", None) for name in ("bos", "eos", "unknown", "padding", "eot")}
    for name, i in ids.items():
        if i is not None and not 0 <= i < len(tokens):
            raise CheckpointError(f"{f.path}: tokenizer.ggml.{name}_token_id {i} is outside the vocabulary")
    add_bos, add_eos = f.get("tokenizer.ggml.add_bos_token", False), f.get("tokenizer.ggml.add_eos_token", False)
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and ids[name] is None:
            raise CheckpointError(f"{f.path}: tokenizer.ggml.add_{name}_token is set but no {name}_token_id")
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    added = [
        {
            "id": i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == CONTROL,
        }
        for i, (token, kind) in enumerate(zip(tokens, types))
        if kind in (CONTROL, USER_DEFINED)
    ]
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": _post_processor(tokens, ids["bos"] if add_bos else None, ids["eos"] if add_eos else None),
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": vocab,
            "merges": f.get("tokenizer.ggml.merges", []),
        },
    }
    special = {
        f"{name}_token": tokens[ids[key]]
        for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))
        if ids[key] is not None
    }
    template = f.get("tokenizer.chat_template", None)
    config = {
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
        **special,
        **({"chat_template": template} if template else {}),
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    stops = sorted({i for i in (ids["eos"], ids["eot"]) if i is not None})
    generation = {"bos_token_id": ids["bos"], "eos_token_id": stops, "pad_token_id": ids["padding"]}
    files = {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": config,
        "special_tokens_map.json": special,
        "generation_config.json": {k: v for k, v in generation.items() if v is not None and v != []},
    }
    return {name: json.dumps(content, indent=2, ensure_ascii=False).encode() for name, content in files.items()}


def _post_processor(tokens: list[str], bos: int | None, eos: int | None) -> dict:
    """What encode(add_special_tokens=True) adds: bos and/or eos as the GGUF's add_*_token flags say."""
    if bos is None and eos is None:  # as SmolLM2's hub tokenizer.json
        return {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    first = [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}] if bos is not None else []
    last = [{"SpecialToken": {"id": tokens[eos], "type_id": 0}}] if eos is not None else []
    return {
        "type": "TemplateProcessing",
        "single": [*first, {"Sequence": {"id": "A", "type_id": 0}}, *last],
        "pair": [*first, {"Sequence": {"id": "A", "type_id": 0}}, *last, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in {bos, eos} - {None}
        },
    }
