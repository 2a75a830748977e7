"""Sampling with vLLM (`train/sample.py --engine vllm`): PagedAttention and continuous batching, the
engine for 8B+ policies (`pip install vllm`, a CUDA GPU).

`vllm_engine` exports the policy to an HF folder (weights in bf16, its tokenizer and chat template) and
starts vLLM on it; `VLLMEngine.sample_ids` takes the prompts as token ids (rendered by train/sample.py
with our chat format) and returns K samples per prompt as token ids, as llama/generate.py's `generate`
does, so the samples map back to the same records and fields and are scored as the native engine's.
"""

from __future__ import annotations

import os

import torch

from llama import load_model, save_model
from llama.chat import ChatFormat

VLLM_INSTALL = "--engine vllm needs vLLM and a CUDA GPU: pip install vllm (on a machine with an NVIDIA GPU)"


class VLLMEngine:
    """Sampling with vLLM: K samples per prompt from token ids, as llama.generate.generate returns them.

    `llm` is a vllm.LLM (or a stand-in with the same `generate(prompts, sampling_params)`), and
    `sampling_params` the SamplingParams class. Seeded per call: the same seed, the same samples.
    """

    def __init__(self, llm, sampling_params, seed: int):
        self.llm, self.sampling_params, self.seed = llm, sampling_params, seed

    def sample_ids(self, ids, k, max_new_tokens, stop_ids, temperature=1.0, top_p=1.0, top_k=0, generator=None):
        """ids[p] (prompt token ids) -> out[p][j]: sample j's token ids, ending with a stop id if it hit one.
        `generator` is the native engine's; vLLM draws from `seed`."""
        params = self.sampling_params(
            n=k, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, max_tokens=max_new_tokens,
            seed=self.seed, stop_token_ids=list(stop_ids), detokenize=False,
        )  # fmt: skip
        results = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        if len(results) != len(ids):
            raise RuntimeError(f"vLLM returned {len(results)} results for {len(ids)} prompts")
        return [[_stop_terminated(c, stop_ids) for c in r.outputs] for r in results]


def _stop_terminated(completion, stop_ids) -> list[int]:
    """A vLLM completion's token ids, ending with the stop id that ended it (as the native engine's do):
    whether vLLM keeps that id in `token_ids` depends on its version."""
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and (not ids or ids[-1] not in stop_ids):
        reason = getattr(completion, "stop_reason", None)
        ids.append(reason if reason in stop_ids else next(iter(stop_ids)))
    return ids


def vllm_engine(policy_dir: str, chat: ChatFormat, seed: int, tensor_parallel: int, export_dir: str) -> VLLMEngine:
    """Export the policy to an HF folder under export_dir (weights in bf16, tokenizer, chat template) and
    start vLLM on it. SystemExit naming the install when vLLM or a CUDA GPU is missing."""
    try:
        import vllm
    except ImportError:
        raise SystemExit(f"error: {VLLM_INSTALL} (vllm is not installed)") from None
    if not torch.cuda.is_available():
        raise SystemExit(f"error: {VLLM_INSTALL} (no CUDA GPU is visible)")
    folder = os.path.join(export_dir, "policy_hf")
    policy = load_model(policy_dir, head="lm", dtype=torch.bfloat16)
    save_model(policy, folder, format="hf", tokenizer=chat.tokenizer, chat_template=chat.template)
    del policy
    llm = vllm.LLM(model=folder, dtype="bfloat16", seed=seed, tensor_parallel_size=tensor_parallel)
    return VLLMEngine(llm, vllm.SamplingParams, seed)
