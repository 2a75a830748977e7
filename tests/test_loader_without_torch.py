"""A process that only tokenizes, packs and collates rows never imports torch (220 MiB and a second of its
start: 15.6 bytes per token of a 14.8M-token set, experiments/bench/results/data.md); the first read of a
batch's field makes the tensor, sharing collate's array."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from llama_posttrain.data.loader import build_loaders
    from llama_posttrain.llama.chat import ChatFormat
    from llama_posttrain.llama.tokenizer import load_tokenizer
    from llama_posttrain.train.config import Config

    work = Path(sys.argv[1])
    with open(work / "d.jsonl", "w") as f:
        for i in range(40):
            turns = [{"role": "user", "content": "q" * (i + 1)}, {"role": "assistant", "content": "a" * (i % 7 + 2)}]
            f.write(json.dumps({"messages": turns}) + "\\n")
    d = Config().data
    d.train, d.max_len, d.batch_size, d.tokens_per_microbatch = str(work / "d.jsonl"), 128, 8, 256
    d.cache_dir, d.num_workers = str(work / "cache"), 2  # the tokenizer's worker processes too
    loader, _ = build_loaders(d, "sft", ChatFormat(load_tokenizer()), verbose=False)
    tokens = targets = 0
    for step in loader.eval_steps():
        tokens += sum(mb.num_tokens for mb in step.micro_batches)
        targets += sum(mb.num_targets for mb in step.micro_batches)
    assert tokens == int(loader.data.lengths.sum()) and targets == int(loader.data.num_targets.sum())
    assert "torch" not in sys.modules, "a pass over the loader imported torch"
    mb = next(iter(loader)).micro_batches[0]
    held = mb._arrays["doc_ids"]
    doc = mb.doc_ids  # the first read: a tensor over the same memory
    import torch

    assert isinstance(doc, torch.Tensor) and doc.data_ptr() == held.ctypes.data and mb.doc_ids is doc
    assert mb.num_tokens == int((doc >= 0).sum()) and mb.num_targets == mb.target_token.numel()
    print("ok")
    """
)


def test_a_pass_over_the_loader_imports_no_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
