"""MFU's FLOP count (llama_posttrain/train/flops.py step_flops) against formulas written out by hand, and against
torch.profiler's count of one step (experiments/bench/mfu.py's executed count and common.py's by shape too)."""

import importlib.util
from pathlib import Path

import torch

from llama_posttrain.data.batch import Batch
from llama_posttrain.llama import Transformer, get_preset
from llama_posttrain.llama.model import PAD_DOC, structure_mask
from llama_posttrain.train.flops import attended_keys, step_flops, step_flops_parts
from llama_posttrain.train.targets import model_logps

BENCH = Path(__file__).parent.parent / "experiments/bench"


def bench_module(name):
    """experiments/bench/NAME.py as a module (mfu.py and common.py import no bench module at their top)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_step_flops_against_the_profiler():
    """A tiny DPO-like step (a live reference's forward, the policy's forward and backward through the chunked
    log-prob head) under torch.profiler(with_flops=True), whose count has formulas for aten::mm/addmm/bmm only.
    Against step_flops_parts, it differs by what is written out here: the trunk runs on pads too (x positions /
    real tokens); attention (SDPA) has no formula (0); the chunked head runs 4 matmuls per target where the
    model count has 3 (forward, recomputed logits, grad of the hidden states, grad of the weight), all counted
    here: the weight gradient is an aten::mm for a first row chunk (an aten::addmm_, without a formula, for
    the chunks after it: experiments/bench/mfu.py addmm_flops; none here, 5 targets)."""
    from torch.profiler import ProfilerActivity, profile

    c = get_preset("debug")
    torch.manual_seed(0)
    policy, reference = Transformer(c), Transformer(c).requires_grad_(False)
    mb = batch(DOC, BRANCH, num_targets=5)
    mb.tokens = torch.randint(0, c.vocab_size, mb.doc_ids.shape)
    mb.positions = torch.arange(10).expand(2, 10).contiguous()
    mb.target_hidden_index = torch.tensor([2, 3, 5, 7, 12])  # flat (B*T) positions of real tokens
    mb.target_token = torch.randint(0, c.vocab_size, (5,))
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        with torch.no_grad():
            model_logps(reference, mb, "torch")
        model_logps(policy, mb, "torch").sum().backward()
    counted = sum(e.flops for e in prof.events() if e.name in ("aten::mm", "aten::addmm", "aten::bmm"))

    parts = step_flops_parts(c, "lm", [mb], reference_forward=True)
    positions, real = mb.tokens.numel(), TOKENS
    trunk_forward, head_forward = parts["trunk matmuls"] // 3, parts["head"] // 3
    assert parts["reference forward"] == trunk_forward + parts["attention"] // 3 + head_forward
    assert counted == (3 + 1) * trunk_forward // real * positions + (4 + 1) * head_forward  # policy + reference

    # experiments/bench/mfu.py: its executed count without SDPA's share = the matmuls common.py counts from the
    # recorded shapes (addmm_ included) = the profiler's
    mfu, common = bench_module("mfu"), bench_module("common")
    executed = mfu.executed_flops(c, "lm", [mb], reference_forward=True)
    # what the CPU computes (llama/segments.py): row 0's doc 0 7 x 7, its doc 1 2 x 2, row 1's doc 4 x 4, 7 pads 1 each
    scores = c.n_layers * c.n_heads * c.head_dim * (49 + 4 + 16 + 7)
    assert executed["attention"] == 14 * scores and executed["head"] == 4 * head_forward
    roots = prof.profiler.kineto_results.experimental_event_tree()
    by_shape = sum(f for *_, f in common._attribute(roots, 0, 1)["ops"])
    assert by_shape == sum(executed.values()) - (14 + 4) * scores == counted
    assert mfu.addmm_flops(c, "lm", [mb], True)["head"] == 0
