"""The KV cache `generate` (llama_posttrain/llama/generate.py) decodes with: its slots and bytes, said before a
sampling job allocates it."""

from __future__ import annotations

import torch

# Compiled decoding rounds the cache length up to a multiple of this, so that calls whose prompts
# differ a little in length reuse one compiled step (the extra slots are masked: a little attention).
COMPILE_LEN_MULTIPLE = 128


def cache_len(config, prompt_len: int, max_new_tokens: int, compile: bool = False) -> int:
    """Slots of `generate`'s KV cache: the longest prompt + max_new_tokens (compiled: rounded up to a multiple
    of COMPILE_LEN_MULTIPLE, at most max_seq_len)."""
    max_len = prompt_len + max_new_tokens
    if compile:
        max_len = min(-(-max_len // COMPILE_LEN_MULTIPLE) * COMPILE_LEN_MULTIPLE, config.max_seq_len)
    return max_len


def kv_cache_bytes(
    config, num_prompts: int, prompt_len: int, max_new_tokens: int, num_samples: int, dtype, compile: bool = False
) -> int:
    """Bytes of the KV cache `generate` decodes with: k and v, per layer (num_prompts * num_samples, n_kv_heads,
    cache_len, head_dim) (DecodeCache). While the prefill's cache (num_prompts rows) fans out, it is there too."""
    slots = cache_len(config, prompt_len, max_new_tokens, compile)
    per_slot = 2 * config.n_layers * config.n_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
    return per_slot * slots * num_prompts * num_samples


def kv_cache_report(
    config, dtype, prompt_lens: list[int], max_new_tokens: int, num_samples: int, batch_size: int, compile: bool = False
) -> str:
    """One line: the KV cache of the largest of the generate calls that sample these prompts (their lengths in
    tokens) `batch_size` at a time, and what it is made of."""
    calls = [prompt_lens[i : i + batch_size] for i in range(0, len(prompt_lens), batch_size)]
    size, n, longest = max(
        (kv_cache_bytes(config, len(c), max(c), max_new_tokens, num_samples, dtype, compile), len(c), max(c))
        for c in calls
    )
    slots = cache_len(config, longest, max_new_tokens, compile)
    return (
        f"KV cache: {size / 2**30:.2f} GiB ({size:,} bytes) per generate call at most: {n} prompts x {num_samples} "
        f"samples x {slots} slots (longest prompt {longest} + max_new_tokens {max_new_tokens}"
        f"{', rounded up: compiled' if slots != longest + max_new_tokens else ''}) x 2 (k, v) x {config.n_layers} "
        f"layers x {config.n_kv_heads} kv heads x {config.head_dim} dims x {torch.empty((), dtype=dtype).element_size()}"
        f" bytes; the prompts' own cache is 1/{num_samples} more while the samples fan out"
    )
