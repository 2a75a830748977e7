"""Attention one document at a time: the CPU's form of the row rule (model.py's module docstring).

A packed row holds many documents, and a dense (T, T) mask makes SDPA compute every score of the row, masked
or not: at 200 dialogs of 20 tokens in a 4096-token row, 99.5% of them. Here each micro-batch's documents are
gathered into padded batches of similar length (a document's slots in order; each pad is a one-token
document), one SDPA runs per batch, causal where the documents have no branches and with a small (L, L)
branch mask where they do, and the outputs are put back in the rows' order.

The result is the dense mask's up to rounding (the flash kernel sums a document's keys in other blocks):
tests/test_segments.py holds it to a float64 reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Documents of lengths in [L, L * SPREAD) share one padded batch: the shortest pays at most SPREAD^2 times
# its own scores, and a row of T slots makes at most 2 log2(T) + 1 batches.
SPREAD = 2**0.5


class Segments:
    """A micro-batch's documents, gathered: for each batch of similar lengths the flat (B * T) slots of its
    (n, L) grid (a short document's tail repeats its last slot) and its branch mask (None: causal), and
    `inverse`, each flat slot's place in the batches' concatenated grids."""

    def __init__(self, doc: Tensor, branch: Tensor):
        B, T = doc.shape
        device = doc.device
        slot = torch.arange(T, device=device).expand(B, T)
        real = doc >= 0
        top = int(doc.max()) + 1 if bool(real.any()) else 0
        # one key per document of a row, and one per pad (a pad attends only itself)
        row = torch.arange(B, device=device)[:, None] * (top + T)
        key = (row + torch.where(real, doc, top + slot)).flatten()
        order = torch.argsort(key, stable=True)  # slots by document, in row order within each
        _, lengths = torch.unique_consecutive(key[order], return_counts=True)
        starts = lengths.cumsum(0) - lengths
        band = torch.floor(torch.log(lengths.double()) / torch.log(torch.tensor(SPREAD, dtype=torch.double)))
        flat_branch = branch.flatten()
        self.batches: list[tuple[Tensor, int, int, Tensor | None]] = []
        self.inverse = torch.empty(B * T, dtype=torch.long, device=device)
        offset = 0
        for b in torch.unique(band).tolist():
            docs = (band == b).nonzero().flatten()
            n_len, n_start = lengths[docs], starts[docs]
            L = int(n_len.max())
            j = torch.arange(L, device=device)
            grid = order[n_start[:, None] + torch.minimum(j, n_len[:, None] - 1)]  # (n, L) flat slots
            inside = j < n_len[:, None]
            self.inverse[grid[inside]] = offset + torch.arange(grid.numel(), device=device).view_as(grid)[inside]
            offset += grid.numel()
            br = flat_branch[grid]
            mask = None
            if bool((br != 0).any()):
                causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
                mask = (causal & ((br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])))[:, None]  # (n,1,L,L)
            self.batches.append((grid.flatten(), len(docs), L, mask))

    def scores(self) -> int:
        """(query, key) scores the batches compute, per head and layer (the dense mask: B * T * T)."""
        return sum(n * L * L for _, n, L, _ in self.batches)


def attend_segments(q: Tensor, k: Tensor, v: Tensor, seg: Segments) -> Tensor:
    """q (B, nh, T, hd), k/v (B, nkv, T, hd) -> (B, nh, T, hd), each document's attention on its own."""
    B, nh, T, hd = q.shape
    nkv = k.shape[1]
    qf = q.transpose(1, 2).reshape(B * T, nh, hd)  # views where q is (B, T, nh, hd) underneath, as in the model
    kf = k.transpose(1, 2).reshape(B * T, nkv, hd)
    vf = v.transpose(1, 2).reshape(B * T, nkv, hd)
    outs = []
    for grid, n, L, mask in seg.batches:
        qi = qf[grid].view(n, L, nh, hd).transpose(1, 2)
        ki = kf[grid].view(n, L, nkv, hd).transpose(1, 2)
        vi = vf[grid].view(n, L, nkv, hd).transpose(1, 2)
        # a tail slot (a repeat) comes after its document's real ones: causal, no real query attends it
        y = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        outs.append(y.transpose(1, 2).reshape(n * L, nh, hd))
    return torch.cat(outs)[seg.inverse].view(B, T, nh, hd).transpose(1, 2)
