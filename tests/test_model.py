"""Row structure (shared prompts, packed docs), the KV cache and batched generation."""

import pytest
import torch
from conftest import CONFIGS, random_model

import llama_posttrain.llama.model as llama_model
from llama_posttrain.llama import Transformer, get_preset
from llama_posttrain.llama.generate import generate, sample_next
from llama_posttrain.llama.heads import model_params
from llama_posttrain.llama.model import attention_mask


def ids(n, vocab, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def reward_row(prompt, responses, order):
    """[prompt][resp order[0]][resp order[1]]...: positions continue the prompt, branch k for response k."""
    toks, pos, branch = [prompt], [torch.arange(len(prompt))], [torch.zeros(len(prompt), dtype=torch.long)]
    for k in order:
        r = responses[k]
        toks.append(r)
        pos.append(torch.arange(len(prompt), len(prompt) + len(r)))
        branch.append(torch.full((len(r),), k + 1))
    return torch.cat(toks)[None], torch.cat(pos)[None], torch.cat(branch)[None]


@pytest.mark.parametrize("kind", llama_model.MASK_KINDS)
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_shared_prompt_row_equals_separate_rows(config, kind, monkeypatch):
    monkeypatch.setattr(llama_model, "_compiled_flex", llama_model.flex_attention)  # eager flex on CPU
    model = random_model(config)
    V = config.vocab_size
    prompt = ids(7, V, 0)
    responses = [ids(5, V, 1), ids(3, V, 2), ids(6, V, 3)]
    order = [2, 0, 1]  # shuffled, as in the reward-model row
    tokens, positions, branch = reward_row(prompt, responses, order)
    mask = attention_mask(torch.zeros_like(tokens), branch, kind=kind)
    want = {"flex": llama_model.BlockMask, "segments": llama_model.Segments, "dense": torch.Tensor}[kind]
    assert isinstance(mask, want) and (kind != "dense" or mask.shape == (1, 1, 21, 21))
    with torch.no_grad():
        h = model.trunk(tokens, positions, mask=mask)[0]
        start = len(prompt)
        for k in order:
            alone = model.trunk(torch.cat([prompt, responses[k]])[None])[0]
            n = len(responses[k])
            assert (h[start : start + n] - alone[len(prompt) :]).abs().max() <= 1e-5
            assert (h[: len(prompt)] - alone[: len(prompt)]).abs().max() <= 1e-5
            start += n


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attention_mask_is_built_by_the_caller_once_per_micro_batch(monkeypatch):
    """The caller builds a micro-batch's mask once and passes it to the policy's and the reference's
    forward: the models build none. Without a mask a forward builds its own from the ids, and
    holds none after (no cache): edited ids give another mask. Block mask and dense agree.
    (Eager here: the compiled create_block_mask runs in test_shared_prompt_row_equals_separate_rows.)"""
    monkeypatch.setattr(llama_model, "_compiled_flex", llama_model.flex_attention)  # eager flex on CPU
    built, real = [], llama_model.create_block_mask
    monkeypatch.setattr(llama_model, "_compiled_create_block_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    config = CONFIGS["gqa-tied-scaled"]
    policy, reference = random_model(config), random_model(config, seed=1)
    V = config.vocab_size
    tokens, positions, branch = reward_row(ids(7, V, 0), [ids(5, V, 1), ids(3, V, 2)], [1, 0])
    doc = torch.zeros_like(tokens)

    def both(mask):
        with torch.no_grad():
            return policy(tokens, positions, mask=mask), reference(tokens, positions, mask=mask)

    flex = both(attention_mask(doc, branch, kind="flex"))
    assert len(built) == 1
    dense = both(attention_mask(doc, branch, kind="dense"))
    segments = both(attention_mask(doc, branch, kind="segments"))
    assert len(built) == 1
    with torch.no_grad():
        assert torch.equal(policy(tokens, positions, doc, branch), segments[0])  # built from the ids: on CPU
    branch[0, -1] = 0  # edited in place: the last token now counts as prompt
    with torch.no_grad():
        edited = policy(tokens, positions, doc, branch)
    assert torch.equal(edited, both(attention_mask(doc, branch, kind="segments"))[0])
    assert (edited - segments[0]).abs().max() > 1e-3  # the edit changed the attention
    for a, b, c in zip(flex, dense, segments):
        assert (a - b).abs().max() <= 1e-5 and (c - b).abs().max() <= 1e-5
    assert attention_mask(None, None) is None  # plain causal rows: SDPA's causal kernel


def test_packed_docs_equal_separate_rows(config):
    model = random_model(config)
    docs = [ids(9, config.vocab_size, 4), ids(4, config.vocab_size, 5), ids(11, config.vocab_size, 6)]
    tokens = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    doc_ids = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(tokens, positions, doc_ids=doc_ids)[0]
        separate = torch.cat([model(d[None])[0] for d in docs])
    assert (packed - separate).abs().max() <= 1e-5


def test_kv_cache_decoding_matches_full_forward(config):
    model = random_model(config)
    seq = ids(20, config.vocab_size, 7)[None]
    with torch.no_grad():
        full = model(seq)[0]  # (T, V)
        cache = llama_model.KVCache(config, 1, 32)
        steps = [model(seq[:, :6], cache=cache)[0]]  # prefill 6, then one token at a time
        for t in range(6, 20):
            steps.append(model(seq[:, t : t + 1], cache=cache)[0])
    assert cache.length == 20
    assert (torch.cat(steps) - full).abs().max() <= 1e-5


def test_batched_greedy_equals_one_by_one():
    """Prompts of different lengths (left padding), K samples each, rows stopping at different steps."""
    config = CONFIGS["gqa-untied-scaled"]
    model = random_model(config, seed=5)
    prompts = [ids(n, config.vocab_size, 10 + n).tolist() for n in (3, 9, 5, 12)]
    free = [generate(model, [p], max_new_tokens=10, temperature=0)[0][0] for p in prompts]
    # stop ids chosen so rows end at different steps, and one never stops
    stop = {free[0][2], free[1][6]} - set(free[3])
    expected = []
    for seq in free:
        cut = next((i for i, t in enumerate(seq) if t in stop), None)
        expected.append(seq if cut is None else seq[: cut + 1])
    assert len({len(e) for e in expected}) >= 3, expected
    alone = [generate(model, [p], max_new_tokens=10, stop_ids=stop, temperature=0)[0][0] for p in prompts]
    batched = generate(model, prompts, num_samples=3, max_new_tokens=10, stop_ids=stop, temperature=0)
    assert alone == expected
    assert batched == [[e] * 3 for e in expected]


def test_token_ids_are_checked_without_a_device_sync():
    """Out-of-range ids fail on the host (CPU tensors, generate's prompts); the model's forward reads
    no device value. (Decoding's host syncs: tests/test_generate.py, one every STOP_CHECK_EVERY steps.)"""
    model = random_model(CONFIGS["gqa-tied-scaled"])
    with pytest.raises(ValueError, match="prompt 1: token id 300 is out of range for vocab_size 300"):
        generate(model, [[1, 2], [3, 300]])
    with torch.device("meta"):  # a device whose values cannot be read: a host sync would raise
        meta = Transformer(CONFIGS["gqa-tied-scaled"])
    x = torch.zeros(2, 8, dtype=torch.long, device="meta")
    assert meta(x, doc_ids=x, branch_ids=x).shape == (2, 8, 300)


def test_sampling_filters_and_seed():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5], [0.0, 0.1, 5.0, 4.9]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=0).tolist() == [1, 2]
    assert sample_next(logits, top_k=1, generator=g).tolist() == [1, 2]
    # top_p keeps the smallest prefix whose mass reaches p: probs row 0 (.63, .23, ...), row 1 (.52, .47, ...)
    draws = torch.stack([sample_next(logits, top_p=0.7, generator=g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2} and set(draws[:, 1].tolist()) == {2, 3}
    assert set(torch.stack([sample_next(logits, top_p=0.5, generator=g) for _ in range(100)])[:, 0].tolist()) == {1}
    draws = torch.stack([sample_next(logits, top_k=2, generator=g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}
    # unfiltered frequencies follow softmax(logits / T)
    draws = torch.stack([sample_next(logits, temperature=2.0, generator=g) for _ in range(4000)])
    freq = torch.bincount(draws[:, 0], minlength=4).double() / 4000
    assert torch.allclose(freq, torch.softmax(logits[0].double() / 2, -1), atol=0.03)
    a = sample_next(logits.repeat(50, 1), generator=torch.Generator().manual_seed(1))
    b = sample_next(logits.repeat(50, 1), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown model preset 'llama9'; known presets: llama3.2-1b"):
        get_preset("llama9")
    with pytest.raises(ValueError, match="n_heads 4 is not a multiple of n_kv_heads 3"):
        get_preset("debug", n_kv_heads=3)
    model = Transformer(get_preset("debug"))
    with pytest.raises(ValueError, match="token id 512 is out of range for vocab_size 512"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        model(torch.tensor([[-1, 5]]))
    with pytest.raises(ValueError, match="unknown head"):
        Transformer(get_preset("debug"), head="value")


def test_reward_head_swap_keeps_trunk():
    model = random_model(CONFIGS["gqa-untied-scaled"])
    x = ids(12, 301, 9)[None]
    with torch.no_grad():
        h = model.trunk(x)
        model.set_head("reward")
        r = model(x)
    assert r.shape == (1, 12) and not hasattr(model, "output")
    assert torch.allclose(r, (h @ model.score.weight.T).squeeze(-1), atol=1e-6)


def test_presets_match_released_sizes():
    # parameter counts of the released models (model cards: 1.24B, 3.21B, 8.03B, 70.6B)
    expected = {"llama3.2-1b": 1.236e9, "llama3.2-3b": 3.213e9, "llama3.1-8b": 8.030e9, "llama3.1-70b": 70.55e9}
    for name, n in expected.items():
        assert abs(model_params(get_preset(name)) / n - 1) < 0.002, name
    assert get_preset("llama3.2-1b").rope_scaling.factor == 32 and get_preset("llama3.1-8b").rope_scaling.factor == 8


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_attend_makes_the_compiled_flex_attention_it_calls(monkeypatch):
    """`attend` on a block mask made elsewhere (not by flex_block_mask) gets its compiled FlexAttention made
    on first use (compiled_flex), not a None left until another function ran; it agrees with the dense mask."""
    monkeypatch.setattr(llama_model, "_compiled_flex", None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # eager flex on CPU
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, -1]])
    branch = torch.zeros_like(doc)
    block = llama_model.create_block_mask(
        lambda b, h, q, k: (k <= q) & (doc[b, q] == doc[b, k]) & ((doc[b, q] >= 0) | (k == q)), 1, None, 8, 8
    )
    q, k, v = (torch.randn(1, 4, 8, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: 2 kv heads
    dense = llama_model.attend(q, k, v, attention_mask(doc, branch, kind="dense"))
    torch.testing.assert_close(llama_model.attend(q, k, v, block), dense, rtol=1e-5, atol=1e-5)
    assert llama_model._compiled_flex is llama_model.flex_attention
