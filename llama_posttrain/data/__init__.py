"""Data: reading files (records), record schemas, rows (encoding, packing, targets), the tokenized cache
(prepare, cache), the loader, and tasks for the pipeline."""
