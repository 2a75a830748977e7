"""Data: record schemas, rows (packing, targets), the loader, and tasks for the pipeline."""
