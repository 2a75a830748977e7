"""Small synthetic tasks with verifiable answers, for experiments and tests."""
