"""Sampling with vLLM (`llama_posttrain/jobs/sample.py --engine vllm`): PagedAttention and continuous batching, the
engine for 8B+ policies (`pip install vllm`, a CUDA GPU).

`vllm_engine` exports the policy to an HF folder (weights in bf16, its tokenizer and chat template) and
starts vLLM on it; `VLLMEngine.sample_ids` takes the prompts as token ids (rendered by llama_posttrain/jobs/sample.py
with our chat format) and returns K samples per prompt as token ids, as llama_posttrain/llama/generate.py's `generate`
does, so the samples map back to the same records and fields and are scored as the native engine's.
`VLLMEngine.close` then frees the GPU, before llama_posttrain/jobs/sample.py loads the reward models.

Memory: vLLM preallocates a KV cache in `gpu_memory_utilization` of the GPU and refuses to start if a
sequence of `max_model_len` tokens does not fit in it. The export's config says the model's full context
(131072 for Llama 3.1), so max_model_len is set from the data: the longest prompt + max_new_tokens,
rounded up to MODEL_LEN_MULTIPLE (`--vllm-max-model-len` to choose it).
"""

from __future__ import annotations

import gc
import os

import torch

from llama_posttrain.jobs.configs import MODEL_LEN_MULTIPLE
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.checkpoint import load_model, save_model

# vllm, an optional extra (`pip install vllm`), is imported where it is used: the native engine runs without it.

VLLM_INSTALL = "--engine vllm needs vLLM and a CUDA GPU: pip install vllm (on a machine with an NVIDIA GPU)"


class VLLMEngine:
    """Sampling with vLLM: K samples per prompt from token ids, as llama.generate.generate returns them.

    `llm` is a vllm.LLM (or a stand-in with the same `generate(prompts, sampling_params)`), and
    `sampling_params` the SamplingParams class. `seed`: every request's own seed (the same seed, the same
    samples, whatever else is in the batch; vLLM samples such requests apart, slower), or None: the engine's
    (vllm.LLM(seed=...)) only.
    """

    def __init__(self, llm, sampling_params, seed: int | None = None):
        self.llm, self.sampling_params, self.seed = llm, sampling_params, seed

    def sample_ids(self, ids, k, max_new_tokens, stop_ids, temperature=1.0, top_p=1.0, top_k=0, generator=None):
        """ids[p] (prompt token ids) -> out[p][j]: sample j's token ids, ending with a stop id if it hit one.
        `generator` is the native engine's; vLLM draws from its seed."""
        params = self.sampling_params(
            n=k, temperature=temperature, top_p=top_p, top_k=top_k if top_k > 0 else -1, max_tokens=max_new_tokens,
            stop_token_ids=list(stop_ids), detokenize=False, **({} if self.seed is None else {"seed": self.seed}),
        )  # fmt: skip
        results = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
        if len(results) != len(ids):
            raise RuntimeError(f"vLLM returned {len(results)} results for {len(ids)} prompts")
        return [[_stop_terminated(c, stop_ids) for c in r.outputs] for r in results]

    def close(self) -> None:
        """Free the GPU: the LLM object, vLLM's process groups and the CUDA cache (the reward models come next)."""
        self.llm = None
        gc.collect()
        try:
            from vllm.distributed import cleanup_dist_env_and_memory
        except ImportError:  # older vLLM
            try:
                from vllm.distributed import destroy_distributed_environment, destroy_model_parallel
            except ImportError:
                pass
            else:
                destroy_model_parallel()
                destroy_distributed_environment()
        else:
            cleanup_dist_env_and_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _stop_terminated(completion, stop_ids) -> list[int]:
    """A vLLM completion's token ids, ending with the stop id that ended it (as the native engine's do):
    whether vLLM keeps that id in `token_ids` depends on its version."""
    ids = list(completion.token_ids)
    if completion.finish_reason == "stop" and (not ids or ids[-1] not in stop_ids):
        reason = getattr(completion, "stop_reason", None)
        ids.append(reason if reason in stop_ids else next(iter(stop_ids)))
    return ids


def max_model_len(longest_prompt: int, max_new_tokens: int, max_seq_len: int, given: int | None = None) -> int:
    """vLLM's max_model_len: `given` (--vllm-max-model-len), else the longest prompt + max_new_tokens rounded
    up to MODEL_LEN_MULTIPLE, at most the model's max_seq_len. SystemExit naming the option that is too small."""
    need = longest_prompt + max_new_tokens
    if need > max_seq_len:
        raise SystemExit(
            f"error: the longest prompt ({longest_prompt} tokens) + --max-new-tokens ({max_new_tokens}) = {need} exceeds the "
            f"policy's max_seq_len {max_seq_len}"
        )
    if given is None:
        return min(-(-need // MODEL_LEN_MULTIPLE) * MODEL_LEN_MULTIPLE, max_seq_len)
    if not need <= given <= max_seq_len:
        raise SystemExit(
            f"error: --vllm-max-model-len {given}: must be at least the longest prompt ({longest_prompt} tokens) + "
            f"--max-new-tokens ({max_new_tokens}) = {need}, and at most the policy's max_seq_len {max_seq_len}"
        )
    return given


def vllm_engine(
    policy_dir: str, chat: ChatFormat, seed: int, tensor_parallel: int, export_dir: str, model_len: int,
    gpu_memory_utilization: float = 0.9, seed_per_request: bool = False,
) -> VLLMEngine:  # fmt: skip
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
    llm = vllm.LLM(
        model=folder, dtype="bfloat16", seed=seed, tensor_parallel_size=tensor_parallel, max_model_len=model_len,
        gpu_memory_utilization=gpu_memory_utilization,
    )  # fmt: skip
    return VLLMEngine(llm, vllm.SamplingParams, seed if seed_per_request else None)
