"""The three objectives, as functions of tensors; each file's docstring holds its formula.

Contract: a loss takes tensors only and returns `(loss, sums)`. `sums` are on-device sums over
this micro-batch, each with a denominator declared in the module's `RATIOS` (logged metric ->
(sum, denominator)); the loop adds them over micro-batches and ranks and divides once per logged
step, so an empty micro-batch adds zeros, never NaN. Turning a packed `Batch` into these tensors
(gathering target positions, per-sequence sums, chosen/rejected indices) is llama_posttrain/train/targets.py's job.

No imports here: llama_posttrain/losses/dpo_names.py (the DPO losses' names and the hyperparameters each
reads) is read by a training config before torch is imported; import each loss from its module.
"""
