"""Training: the loop and its entry points (rm, sft, dpo), sampling, averaging, the round pipeline."""
