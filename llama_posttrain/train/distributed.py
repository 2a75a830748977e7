"""Process group from torchrun's environment, and FSDP2 applied to the (pure) model from outside.

NCCL on CUDA, gloo on CPU; one process per GPU; several nodes work as torchrun sets them up.
`parallelize` shards each transformer block and then the root with `fully_shard`, optionally
with activation checkpointing and `torch.compile` per block, and bf16 params with fp32 gradient
reduction on CUDA; over all ranks (FSDP) or, for a model that outgrows a node's interconnect budget,
within each node and replicated across nodes (HSDP, `train.shard_degree`), optionally with the
sharded state in CPU memory (`train.cpu_offload`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from llama_posttrain.llama import Transformer, get_preset, load_model
from llama_posttrain.llama.checkpoint import read_config
from llama_posttrain.llama.tokenizer import Tokenizer, resolve_tokenizer
from llama_posttrain.train.lifecycle import die_with_parent

# FSDP2, activation checkpointing and torch.distributed.checkpoint's state dicts (with the DTensor and sympy
# modules they load, ~0.7 s here) are imported in `parallelize` and `build_model`, not here: a sampling or
# evaluation job (one process per rank, no sharding) imports this module for its process group only.


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: object

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Set up from torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK); a plain `python` run is 1 rank.
    A torchrun worker asks for SIGTERM when torchrun dies (llama_posttrain/train/lifecycle.py `die_with_parent`)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun for its workers
        die_with_parent()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, mesh)


def param_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[mixed_precision]


def shard_mesh(d: Dist, shard_degree: int = 0):
    """The mesh FSDP2 shards over: all ranks (shard_degree 0 or the world size: FSDP), or HSDP's 2D mesh
    (replicate, shard): the model sharded within each group of `shard_degree` consecutive ranks (one
    node's GPUs, so the per-layer all-gathers and reduce-scatters stay on the node's fast links) and
    replicated across the groups, whose gradients are all-reduced once per step."""
    if shard_degree in (0, d.world_size):
        return d.mesh
    if shard_degree > d.world_size or d.world_size % shard_degree:
        raise ValueError(f"train.shard_degree={shard_degree} must divide the number of ranks ({d.world_size})")
    shape = (d.world_size // shard_degree, shard_degree)
    return init_device_mesh(d.device.type, shape, mesh_dim_names=("replicate", "shard"))


def describe_layout(d: Dist, shard_degree: int = 0, cpu_offload: bool = False) -> str:
    if shard_degree in (0, d.world_size):
        layout = f"FSDP, sharded over {d.world_size} rank(s)"
    else:
        layout = f"HSDP, {d.world_size // shard_degree} replicas x {shard_degree} shards"
    return layout + (", state offloaded to CPU memory" if cpu_offload else "")


def parallelize(
    model: nn.Module,
    d: Dist,
    mixed_precision: str = "auto",
    activation_checkpointing: bool = False,
    compile: bool = False,
    trainable: bool = True,
    shard_degree: int = 0,
    cpu_offload: bool = False,
    static_shapes: int = 0,
    compile_backend: str | Callable = "inductor",
) -> nn.Module:
    """FSDP2 per block, an fp32 head (the reward head), then the root. Parameters stay fp32 (the optimizer's
    master copy) and are gathered in the compute dtype, except an fp32 head's: fp32 throughout
    (llama_posttrain/llama/heads.py RewardHead). `trainable=False` (a frozen reference model): stored in the compute
    dtype, no activation checkpointing, no grads, and the root resharded after each forward.
    shard_degree: see `shard_mesh`. cpu_offload: FSDP2's CPUOffloadPolicy, the sharded parameters,
    their gradients and so the optimizer state live in CPU memory and each block is copied to the
    device for its forward and backward. compile: torch.compile each block with `compile_backend`;
    static_shapes: how many (B, T) shapes the micro-batches take (llama_posttrain/data/loader.py `DataLoader.shapes`),
    each compiled once with dynamic=False; 0: shapes vary freely, compiled with torch's dynamic default."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    compute = param_dtype(mixed_precision, d.device)
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    mesh = shard_mesh(d, shard_degree)
    if cpu_offload and d.device.type != "cuda":
        raise ValueError(
            "train.cpu_offload moves the sharded state from GPU to CPU memory: it needs CUDA (on the CPU it is there)"
        )
    offload = {"offload_policy": CPUOffloadPolicy()} if cpu_offload else {}
    if compile and static_shapes:
        # All blocks share one compiled frame (TransformerBlock.forward), holding a graph per shape and
        # grad mode (training, evaluation): past the recompile limit (8) a shape would run eagerly.
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 2 * static_shapes)
    if not trainable:  # nothing to update: no fp32 master copy, half the memory in bf16
        model.to(compute)
    for i, block in enumerate(model.layers):
        if activation_checkpointing and trainable:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile:
            block.compile(backend=compile_backend, dynamic=False if static_shapes else None)
        fully_shard(block, mesh=mesh, mp_policy=mp, **offload)
        model.layers[i] = block
    if compile and d.device.type == "cpu":
        model.attention_kind = "dense"  # (llama/model.py Transformer.attention_kind)
    if model.head_spec.fp32:  # its own unit, kept and gathered in fp32 (llama_posttrain/llama/heads.py)
        head = model.head_spec.module(model).float()
        fully_shard(head, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.float32), **offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, **offload)
    if not trainable:
        model.requires_grad_(False).eval()
        # FSDP2 keeps the root (embeddings, final norm, LM head) gathered after forward, expecting the
        # backward; a frozen model has none, so it would hold them (~2 GB at 8B) until the next forward.
        model.register_forward_hook(lambda module, args, output: module.reshard())
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Our losses divide by the whole step's counts (all ranks), so rank gradients must be
            # summed, not averaged: divide factor 1 and a plain SUM reduce-scatter (gloo has no PREMUL_SUM).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def reduce_on_device(values: dict[str, torch.Tensor], extrema: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Sum 0-d tensors over ranks, or take their max / min for the names in `extrema` ({name: "max" |
    "min"}), on their device: one collective (two with extrema), no host sync. -> {name: 0-d fp64
    tensor}. Keys must match on every rank."""
    extrema = extrema or {}
    out, several = {}, dist.is_initialized() and dist.get_world_size() > 1
    for names, op in ((sorted(set(values) - set(extrema)), "sum"), (sorted(set(values) & set(extrema)), "max")):
        if not names:
            continue
        flip = [extrema.get(k) == "min" for k in names]  # min(x) = -max(-x); negated on the device, no host copy
        t = torch.stack([(-values[k] if f else values[k]).double().reshape(()) for k, f in zip(names, flip)])
        if several:
            dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        out.update({k: -v if f else v for k, f, v in zip(names, flip, t.unbind())})
    return out


def all_reduce_sum(values: dict, device, extrema: dict[str, str] | None = None) -> dict[str, float]:
    """`reduce_on_device` of numbers or scalar tensors, then one device-to-host transfer. -> Python floats."""
    tensors = {k: torch.as_tensor(v, dtype=torch.float64, device=device) for k, v in values.items()}
    reduced = reduce_on_device(tensors, extrema)
    return dict(zip(reduced, torch.stack(list(reduced.values())).tolist())) if reduced else {}


def gather_lists(parts: dict[str, list[torch.Tensor]], d: Dist) -> dict[str, list[float]]:
    """{name: this rank's 1-D tensors} -> on rank 0, {name: the values of every rank, in rank order}
    (one gather of Python lists: for eval-time values, not the step's sums); {} on the other ranks."""
    mine = {k: torch.cat(v).tolist() if v else [] for k, v in parts.items()}
    if not mine or d.world_size == 1:
        return mine
    every = [None] * d.world_size if d.is_main else None
    dist.gather_object(mine, every, dst=0)
    return {k: [x for rank in every for x in rank[k]] for k in mine} if d.is_main else {}


def model_tokenizer(
    checkpoint: str | None, preset: str | None, tokenizer: str | None, verbose: bool = True
) -> Tokenizer:
    """`model.tokenizer`, else the checkpoint folder's, else the byte tokenizer if the vocabularies match:
    checked against the model's vocab_size before anything is trained (llama.tokenizer.resolve_tokenizer).
    verbose: print the choice (local rank 0 only, so a node prints it once)."""
    if bool(checkpoint) == bool(preset):
        raise ValueError("give exactly one of model.checkpoint and model.preset")
    vocab_size = read_config(checkpoint)[0].vocab_size if checkpoint else get_preset(preset).vocab_size
    return resolve_tokenizer(tokenizer, checkpoint, vocab_size, verbose)


def build_model(
    d: Dist,
    checkpoint: str | None,
    preset: str | None,
    head: str,
    seed: int,
    mixed_precision: str = "auto",
    activation_checkpointing: bool = False,
    compile: bool = False,
    trainable: bool = True,
    shard_degree: int = 0,
    cpu_offload: bool = False,
    static_shapes: int = 0,
) -> Transformer:
    """Rank 0 reads the full weights (a checkpoint, or a seeded random init) and broadcasts them
    into a model that every rank built on the meta device and sharded: one full copy, on rank 0.
    static_shapes: see `parallelize`."""
    if bool(checkpoint) == bool(preset):
        raise ValueError("give exactly one of model.checkpoint and model.preset")
    torch.manual_seed(seed)  # a fresh reward head or a random init: the same on any world size
    full, config = {}, [None]
    if d.is_main:
        if checkpoint:
            source = load_model(checkpoint, head=head, dtype=torch.float32, new_head_ok=True)  # RM from an LM
        else:
            source = Transformer(get_preset(preset), head=head)
        config, full = [source.config], source.state_dict()
    if d.world_size > 1:
        dist.broadcast_object_list(config, src=0)
    config = config[0]
    with torch.device("meta"):
        model = Transformer(config, head=head)
    layout = dict(shard_degree=shard_degree, cpu_offload=cpu_offload, static_shapes=static_shapes)
    parallelize(model, d, mixed_precision, activation_checkpointing, compile, trainable, **layout)
    model.to_empty(device="cpu" if cpu_offload else d.device)
    if d.is_main and trainable:
        print(f"model: {describe_layout(d, shard_degree, cpu_offload)}", flush=True)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=options)
    return model


def torchrun_command(script: str, nproc: int, args: list[str]) -> list[str]:
    """The command that runs `script args...` as `nproc` ranks on this machine (torchrun, one node):
    the one builder the pipeline, the experiment scripts and the tests use."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]
