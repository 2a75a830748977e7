"""Padding attends only to itself (issue 30 item 4): the dense mask, the FlexAttention block mask and the
KV-cache prefill keep every real token's output and drop the (pad, earlier pad) pairs."""

import pytest
import torch
from conftest import CONFIGS, random_model

import llama_posttrain.llama.model as llama_model
from llama_posttrain.llama.model import PAD_DOC, KVCache, attention_mask

T = 256  # two 128-token tiles of the block mask per row


def rows():
    """A partly filled micro-batch as collate lays it out: packed docs, a shared prompt with two branches,
    padding at the end of each row, and a row all padding. -> doc, branch, positions (4, T)."""
    doc = torch.full((4, T), PAD_DOC)
    branch = torch.zeros(4, T, dtype=torch.long)
    pos = torch.zeros(4, T, dtype=torch.long)
    doc[0, :90], doc[0, 90:200] = 0, 1
    pos[0, :90], pos[0, 90:200] = torch.arange(90), torch.arange(110)
    doc[1, :60] = 0  # prompt 0..39, branch 1 at 40..49, branch 2 at 50..59 (both continue from 40)
    pos[1, :40], pos[1, 40:50], pos[1, 50:60] = torch.arange(40), torch.arange(40, 50), torch.arange(40, 50)
    branch[1, 40:50], branch[1, 50:60] = 1, 2
    doc[2, :150] = 0
    pos[2, :150] = torch.arange(150)
    return doc, branch, pos


def reference_mask(doc, branch):
    """The rule written out pair by pair: i attends j iff j <= i, same doc and branch_j in (0, branch_i),
    for a real i; a pad i attends only j == i."""
    B, n = doc.shape
    out = torch.zeros(B, 1, n, n, dtype=torch.bool)
    for b in range(B):
        d, br = doc[b].tolist(), branch[b].tolist()
        for i in range(n):
            if d[i] < 0:
                out[b, 0, i, i] = True
                continue
            for j in range(i + 1):
                out[b, 0, i, j] = d[j] == d[i] and br[j] in (0, br[i])
    return out


def dense_of(block_mask, B, n):
    """Every (query, key) pair's value under the block mask's own mask_mod."""
    b, q, k = torch.meshgrid(torch.arange(B), torch.arange(n), torch.arange(n), indexing="ij")
    return block_mask.mask_mod(b, torch.zeros_like(b), q, k)[:, None]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_pads_attend_only_themselves_in_the_dense_and_the_block_mask(monkeypatch):
    """Dense mask and block mask equal the rule written out; the all-padding row's tiles are the diagonal
    ones only, and the attended pairs of pads drop from a causal triangle per row to one per pad."""
    monkeypatch.setattr(llama_model, "_compiled_create_block_mask", llama_model.create_block_mask)  # eager
    doc, branch, _ = rows()
    want = reference_mask(doc, branch)
    dense = attention_mask(doc, branch, kind="dense")
    assert torch.equal(dense, want)
    block = attention_mask(doc, branch, kind="flex")
    assert torch.equal(dense_of(block, 4, T), want)
    pad = doc < 0
    assert int(dense[pad[:, None, :, None].expand_as(dense)].sum()) == int(pad.sum())  # one pair per pad: itself
    tiles = block.kv_num_blocks + (block.full_kv_num_blocks if block.full_kv_num_blocks is not None else 0)
    assert tiles[3, 0].tolist() == [1, 1]  # the padding row: tile (0, 0) and (1, 1), not (1, 0)
    assert tiles[2, 0].tolist() == [1, 2]  # row 2's real tokens reach into tile 1: its tiles as before


@pytest.mark.parametrize("kind", llama_model.MASK_KINDS)
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_real_outputs_equal_each_doc_alone_and_a_pad_sees_only_itself(kind, monkeypatch):
    """float64: each real token's hidden state is its document's computed alone (the branches of row 1
    each with its prompt), and each pad's is the pad token's alone at its position, as one-token row."""
    monkeypatch.setattr(llama_model, "_compiled_flex", llama_model.flex_attention)  # eager flex on CPU
    monkeypatch.setattr(llama_model, "_compiled_create_block_mask", llama_model.create_block_mask)
    config = CONFIGS["gqa-tied-scaled"]
    model = random_model(config).double()
    doc, branch, pos = rows()
    # pads of random tokens: pads of one token at one position have the same q, k, v, and would hide what
    # they attend (any mix of equal values is that value)
    tokens = torch.randint(0, config.vocab_size, (4, T), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.trunk(tokens, pos, mask=attention_mask(doc, branch, kind=kind))

        def alone(b, idx):  # the slots idx of row b, as a row of their own
            return model.trunk(tokens[b, idx][None], pos[b, idx][None])[0]

        segments = [(0, range(0, 90)), (0, range(90, 200)), (2, range(0, 150)), (1, range(0, 50))]
        segments += [(1, [*range(0, 40), *range(50, 60)])]
        for b, idx in segments:
            idx = torch.tensor(list(idx))
            torch.testing.assert_close(h[b, idx], alone(b, idx), rtol=0, atol=1e-12)
        pad = doc < 0
        pad_alone = model.trunk(tokens[pad][:, None])[:, 0]  # each pad's token at position 0, a row of its own
        torch.testing.assert_close(h[pad], pad_alone, rtol=0, atol=1e-12)


def test_prefill_with_a_kv_cache_left_pads_see_only_themselves():
    """generate's prefill: left-padded prompts through the KV cache (the mask built from the cache's ids).
    The prompts' outputs are each prompt's alone; each pad's its token's alone (pads of distinct tokens)."""
    config = CONFIGS["gqa-untied-scaled"]
    model = random_model(config).double()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    L = 6
    tokens = torch.arange(100, 100 + 3 * L).view(3, L)
    doc = torch.full((3, L), PAD_DOC)
    pos = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p) :], doc[i, L - len(p) :], pos[i, L - len(p) :] = torch.tensor(p), 0, torch.arange(len(p))
    with torch.no_grad():
        cache = KVCache(config, 3, L + 4, dtype=torch.float64)
        h = model.trunk(tokens, pos, doc_ids=doc, cache=cache)
        for i, p in enumerate(prompts):
            torch.testing.assert_close(h[i, L - len(p) :], model.trunk(torch.tensor([p]))[0], rtol=0, atol=1e-12)
        pad = doc < 0
        torch.testing.assert_close(h[pad], model.trunk(tokens[pad][:, None])[:, 0], rtol=0, atol=1e-12)
