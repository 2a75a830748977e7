"""The Triton target_logprobs kernel under TRITON_INTERPRET=1, against float64.

Cut Cross-Entropy's bound: the kernel's error against float64 is no larger than plain torch's
error in the same precision, plus a small tolerance."""

import pytest
import torch

from llama_posttrain import kernels
from llama_posttrain.kernels import IGNORE, naive_target_logprobs
from llama_posttrain.kernels import triton_logprobs as tk

SIZES = [(37, 24, 101), (64, 48, 300), (5, 16, 33), (130, 40, 517)]  # odd N, H, V


def inputs(N, H, V, dtype, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    t = torch.randint(0, V, (N,), generator=g)
    t[::ignore_every] = IGNORE
    return h.to(dtype), w.to(dtype), t


def grads(fn, h, w, t, up):
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    out = fn(h, w, t)
    return (out, *torch.autograd.grad((out * up).sum(), (h, w)))


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


# tolerance relative to the largest exact value: 1e-5 in fp32; 2^-7 (two bf16 ulps) in bf16
@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
@pytest.mark.parametrize("N,H,V", SIZES)
def test_values_and_gradients_within_torch_error(N, H, V, dtype, rel):
    h, w, t = inputs(N, H, V, dtype, seed=N + V)
    up = torch.randn(N, generator=torch.Generator().manual_seed(1))
    exact = grads(naive_target_logprobs, h.double(), w.double(), t, up.double())
    torch_same = grads(naive_target_logprobs, h, w, t, up)
    kernel = grads(lambda a, b, c: kernels.target_logprobs(a, b, c, backend="triton"), h, w, t, up)
    assert kernel[0].dtype == torch.float32 and (kernel[0][t == IGNORE] == 0).all()
    for k, name in enumerate(("logp", "d hidden", "d weight")):
        tol = rel * exact[k].abs().max().item()
        assert err(kernel[k], exact[k]) <= err(torch_same[k], exact[k]) + tol, name
    assert kernel[1].dtype == dtype and kernel[2].dtype == dtype


def test_vocab_splits_combine():
    h, w, t = inputs(20, 16, 300, torch.float32)
    exact = naive_target_logprobs(h.double(), w.double(), t)
    for split in (64, 128, 192, 320):  # 5, 3, 2, 1 splits, the last one partial
        logp, *_ = tk.forward(h, w, t, v_per_split=split)
        assert err(logp, exact) < 1e-5, split
    with pytest.raises(ValueError, match="multiple of every BLOCK_V"):  # splits must align with the tiles
        tk.forward(h, w, t, v_per_split=tk.INTERPRETER_CONFIG.kwargs["BLOCK_V"] + 1)


def test_backward_is_bitwise_deterministic():
    """No atomics: two backward runs give the same bits (on the GPU the old atomics did not)."""
    h, w, t = inputs(40, 24, 150, torch.bfloat16)
    up = torch.randn(40, generator=torch.Generator().manual_seed(1))
    fn = lambda a, b, c: tk.target_logprobs(a, b, c, deterministic=True)  # noqa: E731
    first, second = grads(fn, h, w, t, up), grads(fn, h, w, t, up)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,rel", [(torch.float32, 1e-5), (torch.bfloat16, 2**-7)])
def test_tile_skipping_stays_within_torch_error(dtype, rel):
    """Rows with one dominant logit: the backward skips the vocabulary tiles whose softmax is below
    fp32 resolution (writing g * onehot there, e.g. for targets in a skipped tile) and stays in the bound."""
    cfg = tk.INTERPRETER_CONFIG.kwargs
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    N, H, V = 2 * bn, 16, 5 * bv  # two token blocks, five vocabulary tiles
    g = torch.Generator().manual_seed(4)
    w = 0.1 * torch.randn(V, H, generator=g, dtype=torch.float64)
    w[:8, 0] += 3.0  # tokens 0-7 (tile 0) take logits ~30, the rest |logit| < ~5
    h = 0.3 * torch.randn(N, H, generator=g, dtype=torch.float64)
    h[:, 0] = 10.0
    h[bn + 8, 0] = 0.0  # one flat row in the second block: none of its tiles may be skipped
    t = torch.randint(0, 8, (N,), generator=g)
    t[3], t[bn + 3], t[5] = 3 * bv + 7, 3 * bv + 7, IGNORE  # targets in a skippable tile; an ignored one
    h, w = h.to(dtype), w.to(dtype)
    up = torch.randn(N, generator=torch.Generator().manual_seed(1))
    exact = grads(naive_target_logprobs, h.double(), w.double(), t, up.double())
    torch_same = grads(naive_target_logprobs, h, w, t, up)
    logp, lse, row_max, tile_max, used = tk.forward(h, w, t)
    dh, dw, skipped = tk.backward(h, w, t, lse, row_max, tile_max, used, up, slab=2 * bv)  # 3 slabs
    assert skipped.item() == 4  # tiles 1-4 of the first block; the second block has the flat row
    for k, (ours, name) in enumerate(zip((logp, dh, dw), ("logp", "d hidden", "d weight"))):
        tol = rel * exact[k].abs().max().item()
        assert err(ours, exact[k]) <= err(torch_same[k], exact[k]) + tol, name


def test_forward_only_saves_nothing_and_matches():
    h, w, t = inputs(30, 16, 70, torch.float32)
    with torch.no_grad():
        a = kernels.target_logprobs(h, w, t, backend="triton")
    assert a.grad_fn is None
    assert err(a, naive_target_logprobs(h.double(), w.double(), t)) < 1e-5


def test_tied_weights_accumulate_both_gradients():
    """Hidden states that come from the same embedding the head projects with (tied weights)."""
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(50, 16, generator=g, dtype=torch.float64) * 0.3
    ids, t = torch.randint(0, 50, (21,), generator=g), torch.randint(0, 50, (21,), generator=g)

    def run(fn, dtype):
        e = emb.to(dtype).detach().requires_grad_()
        out = fn(torch.tanh(e[ids]), e, t)
        out.sum().backward()
        return e.grad

    exact = run(naive_target_logprobs, torch.float64)
    ours = run(lambda a, b, c: kernels.target_logprobs(a, b, c, backend="triton"), torch.float32)
    assert err(ours, exact) < 1e-5


def test_dispatch_and_errors(monkeypatch):
    h, w, t = inputs(8, 16, 20, torch.float32)
    assert torch.equal(kernels.target_logprobs(h, w, t, backend="auto"), kernels.chunked_target_logprobs(h, w, t))
    with pytest.raises(ValueError, match="unknown kernels backend"):
        kernels.target_logprobs(h, w, t, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        kernels.target_logprobs(h, w, t, backend="triton")


BACKENDS = {
    "naive": naive_target_logprobs,
    "torch": lambda h, w, t: kernels.target_logprobs(h, w, t, backend="torch"),
    "triton": lambda h, w, t: kernels.target_logprobs(h, w, t, backend="triton"),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_input_gives_empty_output_and_zero_grads(backend, dtype):
    """An empty micro-batch (N == 0: ranks pad with them) in every backend, forward and backward."""
    fn = BACKENDS[backend]
    h = torch.zeros(0, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(50, 16).to(dtype).requires_grad_()
    out = fn(h, w, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32
    gh, gw = torch.autograd.grad(out.sum(), (h, w))
    assert gh.shape == (0, 16) and gw.dtype == dtype and torch.equal(gw, torch.zeros_like(w))
    with torch.no_grad():
        assert fn(h, w, torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_losses_through_the_kernel_match_torch():
    """The SFT loss of a tiny model through the Triton backend equals the torch backend, grads too."""
    from collections import Counter

    from conftest import random_model

    from llama_posttrain.data.rows import encode_sft, pack
    from llama_posttrain.data.schema import SFTRecord
    from llama_posttrain.llama import get_preset
    from llama_posttrain.llama.chat import ChatFormat
    from llama_posttrain.llama.tokenizer import load_tokenizer
    from llama_posttrain.losses.sft import sft_loss
    from llama_posttrain.train.targets import target_logps

    chat = ChatFormat(load_tokenizer())
    recs = [
        SFTRecord([{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}])
        for i in range(6)
    ]
    batch = pack([encode_sft(r, chat, 64, "truncate", Counter()) for r in recs], 64, 256)[0]
    model = random_model(get_preset("debug"))
    results = []
    for backend in ("torch", "triton"):
        model.zero_grad()
        logps = model(
            batch.tokens, batch.positions, batch.doc_ids, head_fn=lambda h, w, b=backend: target_logps(h, w, batch, b)
        )
        loss, _ = sft_loss(logps, batch.num_targets)
        loss.backward()
        results.append((loss.item(), model.tok_embeddings.weight.grad.clone()))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


def test_autotune_key_has_an_n_bucket():
    """The autotuner keys on N rounded up to a power of two as well as (V, D): the first N seen does
    not fix the tiles for every N."""
    assert tk._forward_tuned.keys == ["N_BUCKET", "V", "D"]
    assert [tk.n_bucket(n) for n in (0, 1, 255, 256, 257, 10_000, 16_384, 20_000)] == [
        256, 256, 256, 256, 512, 16_384, 16_384, 32_768,
    ]  # fmt: skip


def test_split_size_fills_the_sms():
    """The vocabulary splits fill the last wave: 132 SMs (H100 SXM) at Llama 3 shapes."""
    V = 128256
    for N in (1000, 4096, 10_000, 16_384, 20_000, 32_768, 65_536):
        for bn, bv in ((64, 256), (128, 128), (128, 64)):
            v_per = tk.split_size(N, V, bn, bv, 132)
            splits = -(-V // v_per)
            programs = -(-N // bn) * splits
            assert v_per % bv == 0 and 1 <= splits <= tk.MAX_SPLITS
            assert programs >= min(2 * 132, -(-N // bn) * tk.MAX_SPLITS)  # two per SM where the splits allow
            assert programs / (-(-programs // 132) * 132) >= 0.9, (N, bn, bv)
    assert -(-V // tk.split_size(20_000, V, 64, 256, 132)) == 2  # one split: 313 programs, 79% of 3 waves
    assert tk.split_size(10, 300, 32, 64, 8) == 64  # tiny N: as many splits as tiles


@pytest.mark.parametrize("sms", [1, 3, 5, 16])
def test_sm_sized_grid_covers_every_tile(sms, monkeypatch):
    """The grid sized from a small fake SM count: every (token block, vocabulary tile) is computed
    once (the tile maxima of the backward's skip map equal the exact ones) and the log-probs match."""
    monkeypatch.setattr(tk, "_num_sms", lambda device: sms)
    cfg = tk.INTERPRETER_CONFIG.kwargs
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    for N, H, V in ((37, 24, 101), (130, 16, 517)):
        h, w, t = inputs(N, H, V, torch.float32, seed=N + sms)
        logp, lse, row_max, tile_max, _ = tk.forward(h, w, t)
        logits = h.double() @ w.double().T
        exact = naive_target_logprobs(h.double(), w.double(), t)
        assert err(logp, exact) < 1e-5 and err(row_max, logits.max(1).values) < 1e-5
        nb, nv = -(-N // bn), -(-V // bv)
        want = torch.stack(
            [logits[i * bn : (i + 1) * bn, j * bv : (j + 1) * bv].max() for i in range(nb) for j in range(nv)]
        )
        assert err(tile_max[: nb * nv], want) < 1e-5, (N, V, sms)


@pytest.mark.parametrize("split", [None, 64, 128])
def test_stats_against_float64_full_logits(split, monkeypatch):
    """TokenStats from the kernel's running max and an extra running sum, over 1 to 5 vocabulary splits
    (the max combined across them), checked as the torch path's (tests/test_target_logprobs.py)."""
    from test_target_logprobs import check_stats, stats_inputs

    if split is not None:  # the forward's own v_per_split, pinned
        real = tk.forward
        monkeypatch.setattr(tk, "forward", lambda *a, **k: real(*a, **{**k, "v_per_split": split}))
    h, w, t = stats_inputs(40, 12, 301)
    check_stats(lambda a, b, c, stats: kernels.target_logprobs(a, b, c, backend="triton", stats=stats), h, w, t)
    with torch.no_grad():  # forward only (nothing saved): the same numbers
        only = kernels.target_logprobs(h, w, t, backend="triton", stats=True)
    saved = kernels.target_logprobs(h, w.clone().requires_grad_(), t, backend="triton", stats=True)
    assert only.logprobs.grad_fn is None and saved.logprobs.grad_fn is not None
    assert all(torch.equal(a, b.detach()) for a, b in zip(only, saved))
    empty = kernels.target_logprobs(h[:0], w, t[:0], backend="triton", stats=True)
    assert [tuple(x.shape) for x in empty] == [(0,)] * 4


def entropy_float64(h, w, t):
    """TRL's entropy (trl.trainer.utils.entropy_from_logits: -sum p log p per row) over float64 full logits."""
    logp = (h.double() @ w.double().T).log_softmax(-1)
    return torch.where(t != IGNORE, -(logp.exp() * logp).sum(-1), 0.0)


@pytest.mark.parametrize("scale", [1.0, 10.0])  # logits of a few units, and of tens (a peaked softmax)
@pytest.mark.parametrize("split", [None, 64])  # 1 or 6 vocabulary splits, each with several tiles
def test_entropy_online_against_float64_full_softmax(scale, split, monkeypatch):
    """TokenStats.entropy of the Triton kernel (an online sum rescaled with the running max, then combined
    across splits), the chunked torch path (chunks of 1, 7 and all rows) and the naive formula, against float64.
    Error bound: fp32 rounding of lse - E[logit], a few ulps of the largest logit."""
    if split is not None:
        real = tk.forward
        monkeypatch.setattr(tk, "forward", lambda *a, **k: real(*a, **{**k, "v_per_split": split}))
    N, H, V = 37, 24, 333
    h, w, t = inputs(N, H, V, torch.float32, seed=7)
    w = w * scale
    want = entropy_float64(h, w, t)
    big = (h.double() @ w.double().T).abs().max().item()
    tol = 4 * big * 2**-23 + 1e-6
    assert 0.1 < want.max() < 0.9 * torch.log(torch.tensor(V))  # neither all one-hot nor flat
    backends = {
        "triton": lambda: kernels.target_logprobs(h, w, t, backend="triton", stats=True),
        "triton, grad": lambda: kernels.target_logprobs(h, w.clone().requires_grad_(), t, backend="triton", stats=True),
        "torch": lambda: kernels.target_logprobs(h, w, t, backend="torch", stats=True),
        "chunk 1": lambda: kernels.chunked_target_logprobs(h, w, t, chunk_size=1, stats=True),
        "chunk 7, grad": lambda: kernels.chunked_target_logprobs(h, w.clone().requires_grad_(), t, 7, stats=True),
        "naive": lambda: naive_target_logprobs(h, w, t, stats=True),
    }
    for name, fn in backends.items():
        out = fn()
        assert out.entropy.dtype == torch.float32 and not out.entropy.requires_grad, name
        assert (out.entropy[t == IGNORE] == 0).all(), name
        assert err(out.entropy, want) < tol, (name, err(out.entropy, want), tol)
