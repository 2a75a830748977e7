"""Attention one document at a time (llama/segments.py), the CPU's default: outputs and gradients equal the
row rule's attention written out in float64, over packed rows of many lengths, branches, pads, a document
whose slots are not contiguous, and an all-padding row."""

import math

import torch
from test_pad_attention import reference_mask

from llama_posttrain.llama.model import PAD_DOC, attend, attention_mask
from llama_posttrain.llama.segments import SPREAD, Segments


def packed_rows(T=300):
    """Row 0: documents of 1..120 tokens packed, then pads; row 1: shared prompts with 2-3 branches;
    row 2: a document split in two runs around another one; row 3: all padding."""
    doc = torch.full((4, T), PAD_DOC)
    branch = torch.zeros(4, T, dtype=torch.long)
    t, d = 0, 0
    for n in [1, 2, 3, 7, 15, 30, 61, 120, 5, 40]:
        doc[0, t : t + n] = d
        t, d = t + n, d + 1
    t = 0
    for d, (p, responses) in enumerate([(20, [9, 14]), (33, [3, 50, 21]), (7, [60, 1])]):
        doc[1, t : t + p] = d
        t += p
        for k, n in enumerate(responses):
            doc[1, t : t + n], branch[1, t : t + n] = d, k + 1
            t += n
    doc[2, :50], doc[2, 50:80], doc[2, 80:200] = 0, 1, 0  # doc 0 in two runs: its later run attends its first
    return doc, branch


def reference_attention(q, k, v, allowed):
    """softmax(q k^T / sqrt(d) over the allowed keys) v, per head, GQA by repeating k/v: float64."""
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ v


def test_segments_equal_the_rule_written_out_with_gradients():
    doc, branch = packed_rows()
    B, T = doc.shape
    allowed = reference_mask(doc, branch)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, T, 4, 8, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, 2, 8, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, 2, 8, generator=g, dtype=torch.float64).transpose(1, 2).requires_grad_()
    w = torch.randn(B, 4, T, 8, generator=g, dtype=torch.float64)
    mask = attention_mask(doc, branch)  # the CPU's default
    assert isinstance(mask, Segments)
    got = attend(q, k, v, mask)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    want = reference_attention(q, k, v, allowed)
    want_grads = torch.autograd.grad((want * w).sum(), (q, k, v))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the dense mask (the reference form) agrees in float32 up to rounding
    q32, k32, v32 = (x.detach().float() for x in (q, k, v))
    dense = attend(q32, k32, v32, attention_mask(doc, branch, kind="dense"))
    torch.testing.assert_close(attend(q32, k32, v32, mask), dense, rtol=0, atol=1e-5)


def test_batches_cover_each_slot_once_with_similar_lengths():
    doc, branch = packed_rows()
    B, T = doc.shape
    seg = Segments(doc, branch)
    # every slot appears in exactly one grid place (inverse is one-to-one), and that place holds the slot
    grids = torch.cat([grid for grid, _, _, _ in seg.batches])
    assert torch.equal(grids[seg.inverse], torch.arange(B * T))
    assert seg.inverse.unique().numel() == B * T
    # a document's lengths are within SPREAD of its batch's grid length; few batches
    lengths = {}
    for b in range(B):
        for t in range(T):
            key = (b, int(doc[b, t])) if doc[b, t] >= 0 else (b, "pad", t)
            lengths[key] = lengths.get(key, 0) + 1
    assert sum(n * L for _, n, L, _ in seg.batches) >= B * T
    assert len(seg.batches) <= 2 * math.log2(T) + 1
    for grid, n, L, mask in seg.batches:
        rows = grid.view(n, L)
        for i in range(n):
            slots = rows[i].unique()
            size = slots.numel()  # a short document's tail repeats its last slot
            assert L / SPREAD < size <= L or (L == 1 and size == 1)
        branched = bool((branch.flatten()[grid] != 0).any())
        assert (mask is None) != branched  # causal without branches, the (L, L) branch mask with them
    # computed scores: far under the dense mask's B * T * T
    attended = int(reference_mask(doc, branch).sum())
    assert attended <= seg.scores() <= 2 * SPREAD**2 * attended
    assert seg.scores() < B * T * T / 4
