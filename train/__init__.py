"""train: filled in by later issues."""
