"""The three objectives, as pure functions of tensors; each file's docstring holds its formula."""

from losses.common import sequence_sums, target_logps
from losses.dpo import chosen_nll, dpo_logps, dpo_loss, dpo_pairs
from losses.ranking import LLAMA2_MARGINS, ranked_pairs, ranking_loss, strength_margins
from losses.sft import sft_loss

__all__ = [
    "LLAMA2_MARGINS",
    "chosen_nll",
    "dpo_logps",
    "dpo_loss",
    "dpo_pairs",
    "ranked_pairs",
    "ranking_loss",
    "sequence_sums",
    "sft_loss",
    "strength_margins",
    "target_logps",
]
