"""Worker for test_distributed.py: one SFT step on this rank's share, gradients summed over ranks.

torchrun --nproc_per_node 2 tests/dist_sft_worker.py OUT.pt
"""

import os
import sys
from collections import Counter

import torch
import torch.distributed as dist

from llama_posttrain.data.loader import DataLoader
from llama_posttrain.data.rows import encode_sft
from llama_posttrain.data.schema import SFTRecord
from llama_posttrain.llama import Transformer, get_preset
from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer
from llama_posttrain.losses.sft import sft_loss
from llama_posttrain.train.targets import target_logps


def main(out_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = Transformer(get_preset("debug")).double()
    chat = ChatFormat(load_tokenizer())
    records = [
        SFTRecord([{"role": "user", "content": f"{i}*3="}, {"role": "assistant", "content": str(3 * i) * (1 + i % 4)}])
        for i in range(12)
    ]
    examples = [encode_sft(r, chat, 64, "truncate", Counter()) for r in records]
    loader = DataLoader(examples, batch_size=12, max_len=64, tokens_per_microbatch=128, rank=rank, world_size=world)
    step = next(iter(loader))
    total = torch.zeros((), dtype=torch.float64)
    for b in step.micro_batches:
        h = model.trunk(b.tokens, b.positions, b.doc_ids, b.branch_ids)
        loss, _ = sft_loss(target_logps(h, model.output_weight, b), step.num_targets)
        loss.backward()
        total += loss.detach()
    dist.all_reduce(total)
    grads = {k: p.grad for k, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    if rank == 0:
        torch.save({"loss": total, "grads": grads, "micro_batches": len(step.micro_batches)}, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1])
