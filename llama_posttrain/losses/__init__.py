"""The three objectives, as functions of tensors; each file's docstring holds its formula.

Contract: a loss takes tensors only and returns `(loss, sums)`. `sums` are on-device sums over
this micro-batch, each with a denominator declared in the module's `RATIOS` (logged metric ->
(sum, denominator)); the loop adds them over micro-batches and ranks and divides once per logged
step, so an empty micro-batch adds zeros, never NaN. Turning a packed `Batch` into these tensors
(gathering target positions, per-sequence sums, chosen/rejected indices) is llama_posttrain/train/targets.py's job.
"""

from llama_posttrain.losses.common import sequence_sums
from llama_posttrain.losses.dpo import dpo_loss
from llama_posttrain.losses.ranking import LLAMA2_MARGINS, ranked_pairs, ranking_loss
from llama_posttrain.losses.sft import sft_loss

__all__ = ["LLAMA2_MARGINS", "dpo_loss", "ranked_pairs", "ranking_loss", "sequence_sums", "sft_loss"]
