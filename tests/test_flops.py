"""MFU's FLOP count (llama_posttrain/train/flops.py step_flops) against formulas written out by hand."""

import torch

from llama_posttrain.data.rows import Batch
from llama_posttrain.llama import get_preset
from llama_posttrain.llama.model import PAD_DOC, structure_mask
from llama_posttrain.train.flops import attended_keys, step_flops


def batch(doc, branch, num_targets):
    doc, branch = torch.tensor(doc), torch.tensor(branch)
    n, empty = torch.zeros(num_targets, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return Batch(
        torch.zeros_like(doc), torch.zeros_like(doc), doc, branch, n, n, n, n.bool(), empty, empty, empty, empty, empty
    )


P = PAD_DOC
# row 0: doc 0 = prompt (3 tokens) + a response on branch 1 (2) + one on branch 2 (2); doc 1 (2 tokens); 1 pad
# row 1: doc 0 (4 tokens), 6 pads
DOC = [[0, 0, 0, 0, 0, 0, 0, 1, 1, P], [0, 0, 0, 0, P, P, P, P, P, P]]
BRANCH = [[0, 0, 0, 1, 1, 2, 2, 0, 0, 0], [0] * 10]
# keys attended, token by token: prompt 1+2+3, each response (3+1)+(3+2), doc 1 1+2; row 1 1+2+3+4
KEYS = (1 + 2 + 3) + 2 * ((3 + 1) + (3 + 2)) + (1 + 2) + (1 + 2 + 3 + 4)  # = 37
TOKENS = 13


def test_attended_keys_by_hand_and_against_the_dense_mask():
    assert attended_keys(torch.tensor(DOC), torch.tensor(BRANCH)) == KEYS == 37
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # random contiguous docs and branches, pads at the end: the dense mask's count
        B, T = 3, 40
        doc = torch.randint(0, 4, (B, T), generator=g).sort(dim=1).values
        branch = torch.randint(0, 3, (B, T), generator=g)
        doc[:, -5:] = PAD_DOC
        slots = torch.arange(T)
        dense = structure_mask(doc, branch, slots, doc, branch, slots)[:, 0] & (doc >= 0)[:, :, None]
        assert attended_keys(doc, branch) == int(dense.sum())
    assert attended_keys(torch.full((1, 8), PAD_DOC), torch.zeros(1, 8, dtype=torch.long)) == 0  # an empty micro-batch


def test_step_flops_by_hand():
    c = get_preset("debug")  # dim 32, 2 layers, 4 heads of 8, 2 kv heads, ffn 64, vocab 512
    shape = (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size)
    assert shape == (32, 2, 4, 2, 8, 64, 512)
    block = 32 * 8 * 4 * 2 + 32 * 8 * 2 * 2 + 3 * 32 * 64  # wq, wo; wk, wv; w1, w2, w3 = 9216
    trunk = 2 * 2 * block * TOKENS + 4 * 2 * 32 * KEYS  # matmuls per real token + attention per (query, key)
    lm_head = 2 * 512 * 32 * 5  # 5 targets projected on the vocabulary
    mb = batch(DOC, BRANCH, num_targets=5)
    assert step_flops(c, "lm", [mb]) == 3 * (trunk + lm_head) == 1957632
    assert step_flops(c, "lm", [mb], reference_forward=True) == 4 * (trunk + lm_head)  # + the reference's forward
    assert step_flops(c, "reward", [mb]) == 3 * (trunk + 2 * 32 * 20)  # the head on all 2 x 10 positions
    assert step_flops(c, "lm", [mb, mb]) == 2 * step_flops(c, "lm", [mb])
    assert step_flops(c, "lm", [batch([[P] * 8], [[0] * 8], 0)]) == 0
