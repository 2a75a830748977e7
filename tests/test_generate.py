"""The decode loop (llama_posttrain/llama/generate.py): sampler, host syncs, the static-shape (compiled) step; greedy equivalence
is in test_model.py."""

import os

import pytest
import torch
from conftest import CONFIGS, random_model

import llama_posttrain.llama.generate as llama_generate
import llama_posttrain.llama.model as llama_model
from llama_posttrain.llama.generate import generate, sample_categorical, sample_next


def test_sample_categorical_follows_softmax_over_a_padded_vocabulary():
    """Frequencies match an fp64 softmax, including the padded last block (V = 700, blocks of 256)."""
    V, n = 700, 40_000
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 2
    logits[::7] = float("-inf")  # filtered entries (top-k / top-p) are never drawn
    draws = sample_categorical(logits.repeat(n, 1), torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=V).double() / n
    expected = torch.softmax(logits.double(), -1)
    assert draws.max() < V and freq[::7].sum() == 0
    assert (freq - expected).abs().max() < 0.006, (freq - expected).abs().max()
    # mass on the last real entry only, or split across a block boundary
    one_hot = torch.full((3, V), float("-inf"))
    one_hot[0, V - 1] = 0
    one_hot[1, 255] = one_hot[1, 256] = 0
    one_hot[2, 0] = 0
    out = sample_categorical(one_hot.repeat(200, 1), torch.Generator().manual_seed(2)).view(200, 3)
    assert (out[:, 0] == V - 1).all() and set(out[:, 1].tolist()) == {255, 256} and (out[:, 2] == 0).all()


def test_sampling_is_deterministic_given_the_generator():
    model = random_model(CONFIGS["gqa-tied-scaled"], seed=3)
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, 4, 10, generator=torch.Generator().manual_seed(7), top_k=50, top_p=0.9)
    b = generate(model, prompts, 4, 10, generator=torch.Generator().manual_seed(7), top_k=50, top_p=0.9)
    c = generate(model, prompts, 4, 10, generator=torch.Generator().manual_seed(8), top_k=50, top_p=0.9)
    assert a == b and a != c


def test_stop_checks_sync_the_host_once_every_few_steps(monkeypatch):
    model = random_model(CONFIGS["gqa-tied-scaled"])
    monkeypatch.setattr(llama_model, "check_token_range", lambda tokens, vocab_size: None)  # CPU-only check
    reads = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, _n=name: reads.append(_n) or _real(t, *a))
    out = generate(model, [[1, 2, 3], [4, 5]], num_samples=3, max_new_tokens=32)
    assert [len(s) for p in out for s in p] == [32] * 6
    # a check after steps 8, 16, 24 (none after the last step), and one transfer of the samples at the end
    assert len(reads) == 32 // llama_generate.STOP_CHECK_EVERY - 1 + 1, reads


def _count_compiles(monkeypatch):
    """Route generate(compile=True) through a backend that counts compiled graphs and runs them eagerly."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    step = torch.compile(llama_generate.decode_step, backend=counter, dynamic=False, fullgraph=True)
    monkeypatch.setattr(llama_generate, "_compiled_decode_step", step)
    return counter


def test_compiled_decode_step_has_static_shapes(monkeypatch):
    """One graph for the whole decode (fullgraph: no breaks), reused by a second call whose prompts are a bit
    longer (the cache length is rounded up): the step takes no shape from the step number."""
    model = random_model(CONFIGS["gqa-tied-scaled"])
    counter = _count_compiles(monkeypatch)
    eager = generate(model, [[1, 2, 3], [4, 5]], 3, 20, stop_ids=[7], temperature=0)
    compiled = generate(model, [[1, 2, 3], [4, 5]], 3, 20, stop_ids=[7], temperature=0, compile=True)
    assert compiled == eager and counter.frame_count == 1
    generate(model, [[1, 2, 3, 4, 5], [4, 5]], 3, 20, temperature=0.7, top_k=20, compile=True)
    assert counter.frame_count == 2  # new sampling settings: a new graph; new prompt lengths alone would not
    generate(model, [[1, 2, 3, 4, 5, 6], [4]], 3, 20, temperature=0.7, top_k=20, compile=True)
    assert counter.frame_count == 2


@pytest.mark.slow  # ~5 s with inductor's on-disk cache warm, ~22 s cold (C++ kernels built on 2 cores):
@pytest.mark.long  # CI (a fresh clone) is always cold; test_compiled_decode_step_has_static_shapes stays in it
def test_inductor_compiled_decode_equals_eager_greedy():
    """The real compiler (CPU inductor): the same greedy tokens as the eager step, and as one-by-one."""
    import shutil

    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler for the CPU inductor")
    torch._dynamo.reset()
    model = random_model(CONFIGS["gqa-tied-scaled"], seed=1)
    prompts = [[1, 2, 3], [4, 5], [9, 8, 7, 6]]
    eager = generate(model, prompts, 2, 16, temperature=0)
    assert generate(model, prompts, 2, 16, temperature=0, compile=True) == eager
    assert [generate(model, [p], 1, 16, temperature=0)[0][0] for p in prompts] == [s[0] for s in eager]


def test_sampling_in_place_equals_sampling_a_copy():
    """overwrite=True (the decode loop's own logits buffer) draws the same tokens as the copying path, at
    any temperature and filter, and overwrite=False leaves the caller's logits as they were."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 700, generator=g) * 3
    for temperature, top_k, top_p in ((1.0, 0, 1.0), (0.7, 0, 1.0), (2.0, 50, 1.0), (0.5, 0, 0.9), (1.0, 20, 0.8)):
        u = torch.rand(16, 1, generator=g)
        before = logits.clone()
        copied = sample_next(logits, temperature, top_k, top_p, u=u)
        assert torch.equal(logits, before)
        in_place = sample_next(logits.clone(), temperature, top_k, top_p, u=u, overwrite=True)
        assert torch.equal(in_place, copied), (temperature, top_k, top_p)
    assert len(set(sample_next(logits, 1.0, u=torch.rand(16, 1, generator=g)).tolist())) > 8  # u is used
