"""The trainer: the loop and its entry points (rm.py, sft.py, dpo.py: their configs; *_objective.py: the rest)."""
