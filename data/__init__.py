"""data: filled in by later issues."""
