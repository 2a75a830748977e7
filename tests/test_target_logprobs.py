"""The chunked pure-torch target_logprobs: equal to the naive formula, and memory far under N*V*4."""

import subprocess
import sys

import pytest
import torch

from llama_posttrain.kernels import IGNORE, naive_target_logprobs, target_logprobs
from llama_posttrain.kernels.chunked import target_logprobs as chunked


@pytest.mark.parametrize(
    "N,H,V,chunk,block", [(37, 16, 101, 5, None), (64, 24, 1000, None, None), (5, 8, 7, 1, None), (37, 16, 1000, 5, 96)]
)
def test_chunked_equals_naive_float64(N, H, V, chunk, block):
    """block: vocabulary columns per block (the online log-sum-exp across blocks, the weight gradient written
    block by block by the first row chunk and added by the others)."""
    g = torch.Generator().manual_seed(N)
    h = torch.randn(N, H, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = IGNORE
    up = torch.randn(N, dtype=torch.float64, generator=g)
    a = chunked(h, w, t, chunk_size=chunk, vocab_block=block)
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
from llama_posttrain.kernels.chunked import target_logprobs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
target_logprobs(h, w, t).sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before, N * V * 4)
"""


def test_chunked_peak_memory_far_under_full_logits():
    """Forward + backward at V = 128256 in a fresh process: peak RSS growth vs the [N, V] fp32 logits.
    The chunked path holds a few blocks of logits (4 MiB each on the CPU) at any N, the full logits N*V*4 bytes
    (here 36 MiB against 1002 MiB, with 64 MiB row chunks before the blocks ~260 MiB)."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True)
    extra, full = map(int, out.stdout.split())
    print(f"peak extra {extra / 2**20:.0f} MiB vs N*V*4 = {full / 2**20:.0f} MiB")
    assert extra < full / 3


def stats_inputs(N, H, V, seed=0):
    """Integer-valued hidden states and weights (every logit exact in fp32, in any order of summation), with
    exact ties: vocabulary row V - 1 repeats row 3. Targets: the row's argmax for every third row, the
    tied twin of row 3 where row 3 is the max, IGNORE for every fifth, random otherwise."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randint(-3, 4, (N, H), generator=g).float()
    w = torch.randint(-3, 4, (V, H), generator=g).float()
    w[V - 1] = w[3]
    logits = h.double() @ w.double().T
    t = torch.randint(0, V, (N,), generator=g)
    t[::3] = logits[::3].argmax(-1)  # the first index of the max: never V - 1 (row 3 comes first)
    h[1] = w[3]  # row 1's max is row 3's logit |w_3|^2, shared with V - 1: target the twin
    t[1] = V - 1
    t[::5] = IGNORE
    return h, w, t


def check_stats(fn, h, w, t):
    """fn(h, w, t, stats) -> TokenStats: against float64 full logits, with the log-probs and gradients
    bitwise those of stats=False."""
    logits = h.double() @ w.double().T  # (N, V), exact here
    valid = t != IGNORE
    target_logit = logits.gather(-1, t.clamp(min=0)[:, None]).squeeze(-1)
    want_hit = valid & (target_logit >= logits.max(-1).values)  # a tie with the max counts as a hit
    assert want_hit[1] and logits[1].argmax() != t[1]  # the tie: argmax() picks the other index
    up = torch.randn(len(t), generator=torch.Generator().manual_seed(1))
    results = []
    for stats in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(hh, ww, t, stats)
        logp = out.logprobs if stats else out
        results.append((logp.detach(), *torch.autograd.grad((logp * up).sum(), (hh, ww))))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert out.is_argmax.dtype == torch.bool and not out.is_argmax.requires_grad
    assert torch.equal(out.is_argmax, want_hit) and 2 < int(want_hit.sum()) < int(valid.sum())
    mean_logit = torch.where(valid, logits.mean(-1), 0.0)  # TRL's logits/*: the mean over the vocabulary
    assert torch.allclose(out.logit_sum.double() / w.shape[0], mean_logit, rtol=0, atol=1e-6)
    assert out.logit_sum.dtype == torch.float32 and (out.logit_sum[~valid] == 0).all()


@pytest.mark.parametrize("chunk,block", [(None, None), (1, None), (7, None), (7, 64), (None, 300)])
def test_stats_against_float64_full_logits(chunk, block):
    h, w, t = stats_inputs(40, 12, 301)
    check_stats(lambda a, b, c, stats: chunked(a, b, c, chunk_size=chunk, stats=stats, vocab_block=block), h, w, t)
    check_stats(lambda a, b, c, stats: target_logprobs(a, b, c, backend="torch", stats=stats), h, w, t)


def test_naive_stats_against_the_definitions():
    h, w, t = stats_inputs(30, 8, 50, seed=2)
    check_stats(lambda a, b, c, stats: naive_target_logprobs(a, b, c, stats=stats), h, w, t)
