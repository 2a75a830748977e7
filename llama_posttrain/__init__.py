"""llama-posttrain: Llama 3 style post-training. One importable name, so that nothing here shadows a package
its users have (transformers imports Hugging Face's `kernels`; `llama`, `data`, `train` and `losses` are names
other projects install too):

    llama_posttrain.llama     the model, tokenizers, chat formats, checkpoints, generation
    llama_posttrain.losses    ranking, SFT and DPO losses
    llama_posttrain.data      records -> token rows, the cache and the loader
    llama_posttrain.kernels   Triton target log-probs and their torch references
    llama_posttrain.train     the training entry points, the jobs and the round driver

A script started by its path (`python llama_posttrain/train/sft.py`, `torchrun .../train/dpo.py`) has its own
folder first on sys.path, where a module such as jobs/evaluate.py would stand in for the `evaluate` package
and data/io.py for anything that imports `io` late. Every import here is absolute, so that folder is taken off.
"""

import sys as _sys
from pathlib import Path as _Path

_HERE = _Path(__file__).resolve().parent
if _sys.path and _sys.path[0] and _HERE in _Path(_sys.path[0]).resolve().parents:
    del _sys.path[0]
