"""The DPO losses by name: the one table of them. For each loss of llama_posttrain/losses/dpo.py, the
hyperparameters it reads and how it scores a response (against a reference model or not, per token
or summed). No torch here: llama_posttrain/train/dpo.py checks `dpo.loss` and the values it reads
when the config is read, before torch is imported; losses/dpo.py adds each loss's function (the
function of the same name) to its row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple


class LossKeys(NamedTuple):
    reads: tuple[str, ...]  # its hyperparameters (dpo.beta, ...): a value it does not read is a config error
    reference: bool = True  # score: log-ratio to the reference model; False: the policy's log-prob alone
    per_token: bool = False  # score divided by the response's token count


# alpha (the NLL term on chosen) is read by every loss
LOSS_KEYS = {
    "sigmoid": LossKeys(("beta", "alpha", "label_smoothing")),
    "ipo": LossKeys(("beta", "alpha"), per_token=True),
    "hinge": LossKeys(("beta", "alpha")),
    "robust": LossKeys(("beta", "alpha", "label_smoothing")),
    "simpo": LossKeys(("beta", "alpha", "label_smoothing", "gamma"), reference=False, per_token=True),
    "apo_zero": LossKeys(("beta", "alpha")),
    "nca_pair": LossKeys(("beta", "alpha")),
    "bco_pair": LossKeys(("beta", "alpha")),
}
REFERENCE_FREE = {name for name, keys in LOSS_KEYS.items() if not keys.reference}
SFT = "sft"  # in a list of losses: the NLL term (TRL's loss_type "sft")


def needs_reference(loss: str | Sequence[str]) -> bool:
    """Whether dpo.loss (a name or a list) scores against a reference model."""
    names = [loss] if isinstance(loss, str) else loss
    return any(LOSS_KEYS[n].reference for n in names if n != SFT)
