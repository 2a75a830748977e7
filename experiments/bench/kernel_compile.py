"""Compile the Triton log-prob kernels for a GPU without one: registers, spills, shared memory, pipelining.

    python experiments/bench/kernel_compile.py                 # sm_90a (H100) and sm_80 (A100), bf16
    python experiments/bench/kernel_compile.py --arch 90 --dtype fp32

Runs Triton's whole compiler (TTIR, TTGIR, LLVM, ptxas) on the CPU for every autotune config in
llama_posttrain/kernels/triton_logprobs.py, with the specializations a real launch gets (16-byte aligned pointers;
H, V, strides and slab offsets divisible by 16: without them loads are not vectorized and not
pipelined, and the report would be wrong). Prints one line per (kernel, config): registers, spill
bytes (from ptxas), shared memory, and the number of asynchronous copies (0: loads not pipelined).
It says nothing about speed; experiments/gpu/validate.sh measures that on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v's report (registers, spills)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llama_posttrain.kernels import triton_logprobs as tk  # noqa: E402

CONSTEXPRS = ("BLOCK_N", "BLOCK_V", "BLOCK_D", "IEEE", "UPCAST", "stride_hd", "stride_wd")
INTS = {"N", "N_BUCKET", "V", "D", "n_splits", "v_per_split", "v0", "v_slab", "stride_dl", "stride_hn", "stride_wv"}
DIVISIBLE_BY_16 = {"N_BUCKET", "V", "D", "v_per_split", "v0", "stride_dl", "stride_hn", "stride_wv"}  # + every pointer
POINTERS = {"T": "*i64", "SKIPPED": "*i32"}  # the rest: hidden/weight/d logits in the input dtype, fp32 buffers


def signature(fn, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in CONSTEXPRS:
            sig[name] = "constexpr"
        elif name in INTS:
            sig[name] = "i32"
        elif name == "skip_below":
            sig[name] = "fp32"
        else:
            sig[name] = POINTERS.get(name, f"*{dtype}" if name in ("H", "W", "DL") else "*fp32")
    return sig


def compile_one(fn, dtype: str, arch: int, cfg: triton.Config):
    names = list(fn.arg_names)
    const = {"stride_hd": 1, "stride_wd": 1, "IEEE": dtype == "fp32", "UPCAST": False, **cfg.kwargs}
    sig = signature(fn, dtype)
    attrs = {
        (i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in DIVISIBLE_BY_16 or sig[n].startswith("*")
    }
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    with contextlib.redirect_stdout(io.StringIO()) as log:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    registers = re.search(r"Used (\d+) registers", log.getvalue())
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if registers is None or spills is None:
        raise SystemExit(f"no ptxas report for {fn.__name__} {cfg}:\n{log.getvalue()}")
    return compiled, int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 or 80 (default both)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = ap.parse_args(argv)
    for arch in args.arch or [90, 80]:
        for kernel in (tk._forward_kernel, tk._dlogits_kernel):
            for cfg in tk.GPU_CONFIGS:
                compiled, registers, spilled = compile_one(kernel, args.dtype, arch, cfg)
                tiles = "x".join(str(v) for v in cfg.kwargs.values())
                copies = compiled.asm["ttgir"].count("async_copy_global_to_local")
                print(
                    f"sm_{arch} {kernel.__name__:16s} {args.dtype} {tiles:10s} warps {cfg.num_warps} "
                    f"stages {cfg.num_stages}: registers {registers}, spill bytes {spilled}, "
                    f"shared {compiled.metadata.shared} B, async copies {copies}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
