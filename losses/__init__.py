"""losses: filled in by later issues."""
