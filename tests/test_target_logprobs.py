"""The chunked pure-torch target_logprobs: equal to the naive formula, and memory far under N*V*4."""

import subprocess
import sys

import pytest
import torch

from kernels import IGNORE, naive_target_logprobs, target_logprobs
from kernels.chunked import target_logprobs as chunked


@pytest.mark.parametrize("N,H,V,chunk", [(37, 16, 101, 5), (64, 24, 1000, None), (5, 8, 7, 1)])
def test_chunked_equals_naive_float64(N, H, V, chunk):
    g = torch.Generator().manual_seed(N)
    h = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = IGNORE
    up = torch.randn(N, dtype=torch.float64, generator=g)
    a = chunked(h, w, t, chunk_size=chunk)
    (ga_h, ga_w) = torch.autograd.grad((a * up).sum(), (h, w))
    b = naive_target_logprobs(h, w, t)
    (gb_h, gb_w) = torch.autograd.grad((b * up).sum(), (h, w))
    assert torch.allclose(a, b, atol=1e-12) and (a[::4] == 0).all()
    assert torch.allclose(ga_h, gb_h, atol=1e-12) and torch.allclose(ga_w, gb_w, atol=1e-12)


def test_gradcheck():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.tensor([0, 3, IGNORE, 10, 7, 7])
    assert torch.autograd.gradcheck(lambda x, y: chunked(x, y, t, chunk_size=4), (h, w))


def test_fp32_and_bf16_inputs_against_float64():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(50, 32, generator=g), torch.randn(300, 32, generator=g) * 0.3
    t = torch.randint(0, 300, (50,), generator=g)
    exact = naive_target_logprobs(h.double(), w.double(), t)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.1)):
        out = target_logprobs(h.to(dtype), w.to(dtype), t)
        assert out.dtype == torch.float32
        naive_err = (naive_target_logprobs(h.to(dtype), w.to(dtype), t) - exact).abs().max()
        assert (out - exact).abs().max() <= naive_err + tol


def test_shape_errors():
    with pytest.raises(ValueError, match="expected hidden"):
        target_logprobs(torch.zeros(3, 4), torch.zeros(5, 6), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        target_logprobs(torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


PEAK_SCRIPT = """
import resource, sys, torch
torch.manual_seed(0)
N, H, V = 2048, 16, 128256
h = torch.randn(N, H, requires_grad=True); w = (torch.randn(V, H) * 0.02).requires_grad_()
t = torch.randint(0, V, (N,))
from kernels.chunked import target_logprobs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
target_logprobs(h, w, t).sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before, N * V * 4)
"""


def test_chunked_peak_memory_far_under_full_logits():
    """Forward + backward at V = 128256 in a fresh process: peak RSS growth vs the [N, V] fp32 logits.
    The chunked path holds a few [64 MiB / (4 V), V] chunks (~260 MiB at any N), the full logits N*V*4 bytes."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True)
    extra, full = map(int, out.stdout.split())
    print(f"peak extra {extra / 2**20:.0f} MiB vs N*V*4 = {full / 2**20:.0f} MiB")
    assert extra < full / 3
