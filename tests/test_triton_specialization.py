"""How many Triton binaries the log-prob kernels compile over many micro-batch sizes N
(llama_posttrain/kernels/triton_logprobs.py): counted without a GPU, by Triton's own specialization.

Triton compiles a kernel once per (argument specialization, constexprs, launch options): its JIT computes the
specialization of each launch's arguments (an integer's == 1 and divisibility by 16, a pointer's 16-byte
alignment) with the binder `create_function_from_signature` builds, and keys its binary cache by the result.
The test builds that binder for an H100 target (Triton's CUDA backend object; no device needed), replaces the
kernels' launches by recorders that run it on the real arguments (the forward and backward as on CUDA: the
autotuner's configs at a new N bucket, the tuned one after), and counts the distinct keys."""

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from llama_posttrain.kernels import triton_logprobs as tk

H100 = GPUTarget("cuda", 90, 32)


def as_jit(kernel, unspecialized: bool = True) -> JITFunction:
    """The module's kernel as a JITFunction (under TRITON_INTERPRET=1 it holds an InterpretedFunction, which
    keeps the decorator's arguments); unspecialized=False: without its do_not_specialize."""
    kw = {k: getattr(kernel, "kwargs", {}).get(k) for k in ("do_not_specialize", "do_not_specialize_on_alignment")}
    if isinstance(kernel, JITFunction):
        kw = {"do_not_specialize": kernel.do_not_specialize}
    if not unspecialized:
        kw["do_not_specialize"] = None
    return JITFunction(kernel.fn, **kw)


def binaries(monkeypatch, sizes, unspecialized: bool = True, V: int = 32000, D: int = 64) -> dict[str, int]:
    """Forward (stats off, then on) and backward at every N in `sizes`, bf16 -> {kernel: binaries compiled}."""
    backend = make_backend(H100)
    keys = {"forward": set(), "dlogits": set()}

    def recorder(name, kernel, configs=None):
        jit = as_jit(kernel, unspecialized)
        binder = create_function_from_signature(jit.signature, jit.params, backend)

        class Launch:
            best_config = tk.GPU_CONFIGS[1]  # what "autotuning" picks

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    for cfg in configs or [None]:  # the autotuner compiles and times every config
                        if cfg is not None:
                            kwargs |= {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
                        _, specialization, options = binder(*args, **kwargs)
                        keys[name].add((tuple(specialization), str(sorted(options.items()))))

                return launch

        return Launch()

    real_options = tk._launch_options
    monkeypatch.setattr(tk, "_forward_tuned", recorder("forward", tk._forward_kernel, tk.GPU_CONFIGS))
    monkeypatch.setattr(tk, "_forward_kernel", recorder("forward", tk._forward_kernel))
    monkeypatch.setattr(tk, "_dlogits_kernel", recorder("dlogits", tk._dlogits_kernel))
    # CUDA's path on CPU tensors: the autotuned config (not the interpreter's), an H100's SMs, no upcast
    monkeypatch.setattr(tk, "_pinned_config", lambda h, V, det: tk._TUNED.get(tk._tuned_key(h, V)))
    monkeypatch.setattr(tk, "_num_sms", lambda device: 132)
    monkeypatch.setattr(tk, "_launch_options", lambda h, cfg: real_options(h, cfg) | {"UPCAST": False})
    monkeypatch.setattr(tk, "_TUNED", {})
    w = torch.empty(V, D, dtype=torch.bfloat16)
    for N in sizes:
        h, t = torch.empty(N, D, dtype=torch.bfloat16), torch.zeros(N, dtype=torch.long)
        for stats in (False, True):
            _, lse, row_max, tile_max, cfg = tk.forward(h, w, t, stats=stats)
        tk.backward(h, w, t, lse, row_max, tile_max, cfg, torch.zeros(N), need_dh=False, need_dw=False)
    return {k: len(v) for k, v in keys.items()}


def test_a_new_micro_batch_size_compiles_nothing_new(monkeypatch):
    """N from 1000 to 1040 (two autotune buckets, N % 16 == 0 and not, N * n_splits of every alignment): the
    forward's binaries are one per config (the autotuning, STATS off) and the tuned config's with STATS; the
    backward's one. Before do_not_specialize and the aligned outputs: 17 and 2 (every 37th N to 16384: 44 and 3)."""
    assert binaries(monkeypatch, range(1000, 1041)) == {"forward": len(tk.GPU_CONFIGS) + 1, "dlogits": 1}


def test_the_count_sees_specialization(monkeypatch):
    """The counting itself: the same kernels without their do_not_specialize compile again by N % 16."""
    assert binaries(monkeypatch, [1000]) == {"forward": len(tk.GPU_CONFIGS) + 1, "dlogits": 1}
    monkeypatch.undo()
    got = binaries(monkeypatch, [1000, 1008], unspecialized=False)
    assert got == {"forward": len(tk.GPU_CONFIGS) + 1 + 2, "dlogits": 2}  # 1008: the tuned config again, x STATS
