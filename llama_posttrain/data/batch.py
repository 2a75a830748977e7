"""A micro-batch of packed rows (llama_posttrain/data/rows.py `collate` builds them): its tensors, and how they are
made from collate's numpy arrays without importing torch until a field is read."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from llama_posttrain.llama.config import PAD_DOC

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """One micro-batch. Flat indices address the (B*T) hidden states of `model.trunk(...)`.

    Its fields are torch tensors. `collate` builds them as numpy arrays, and each becomes a tensor
    (torch.from_numpy: no copy) when first read, so that a process that only packs and collates rows (a
    loader's pass, the tokenizer's workers) never imports torch: 220 MiB and a second of every start."""

    tokens: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, T)
    doc_ids: torch.Tensor  # (B, T), PAD_DOC = padding
    branch_ids: torch.Tensor  # (B, T)
    target_hidden_index: torch.Tensor  # (N,) hidden state predicting each target
    target_token: torch.Tensor  # (N,)
    target_seq: torch.Tensor  # (N,) sequence (response, or SFT dialog) of each target
    target_format: torch.Tensor  # (N,) bool: header span or turn terminator
    seq_score_index: torch.Tensor  # (S,) final token of each sequence: where its reward is read
    seq_group: torch.Tensor  # (S,) example (prompt group) of each sequence
    seq_rank: torch.Tensor  # (S,) 0 = best within its group
    group_strength: torch.Tensor  # (G,) index into STRENGTHS, -1 unknown
    group_uid: torch.Tensor  # (G,) Example.uid of each group

    def __post_init__(self):
        self._arrays = {}  # numpy fields not read yet (see __getattr__)
        for f in fields(self):
            value = self.__dict__[f.name]
            if isinstance(value, np.ndarray):
                self._arrays[f.name] = value
                del self.__dict__[f.name]

    def __getattr__(self, name: str):
        """A field still held as a numpy array: made a tensor sharing its memory, once (only then is torch
        imported). Called only when `name` is not an attribute (Python's normal lookup failed). The array
        stays in `_arrays` (no copy), so a shallow copy of the batch, sharing that dict, reads it too."""
        arrays = self.__dict__.get("_arrays", {})
        if name not in arrays:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        import torch

        value = self.__dict__[name] = torch.from_numpy(arrays[name])
        return value

    def _held(self, name: str):
        """The field as collate built it (numpy) if not yet read, else its tensor."""
        return self.__dict__[name] if name in self.__dict__ else self._arrays[name]

    @property
    def num_targets(self) -> int:
        return int(self._held("target_token").shape[0])

    @property
    def num_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int((self._held("doc_ids") != PAD_DOC).sum())

    def to(self, device) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})
