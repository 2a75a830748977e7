"""llama_posttrain/driver/plan.py: the memory arithmetic, written out independently, and the verdict (fast, no training).
The estimate against measured CPU peaks of real runs: experiments/bench/plan_check.py."""

import dataclasses
from pathlib import Path

import pytest
import torch

from llama_posttrain.driver import memory, plan
from llama_posttrain.llama import Transformer, get_preset
from llama_posttrain.llama.heads import model_params
from llama_posttrain.llama.model import TransformerBlock, rope_cos_sin, rope_inv_freq, structure_mask

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
B8 = get_preset("llama3.1-8b")


def setting(**kw) -> memory.Setting:
    base = dict(model=B8, kind="sft", nproc=8, tokens_per_microbatch=16384, max_len=4096, activation_checkpointing=True)
    return memory.Setting(**{**base, **kw})


@pytest.mark.parametrize("preset", ["tiny", "tiny-untied", "debug"])
@pytest.mark.parametrize("head", ["lm", "reward"])
def test_parameter_counts_are_those_of_a_real_model(preset, head):
    config = get_preset(preset)
    model = Transformer(config, head=head)
    counts = memory.param_counts(config, head)
    assert counts["total"] == sum(p.numel() for p in model.parameters()) == model_params(config, head)
    assert counts["block"] == sum(p.numel() for p in model.layers[0].parameters())
    root = [p for n, p in model.named_parameters() if not n.startswith(("layers.", "score."))]
    assert counts["root"] == sum(p.numel() for p in root)


def test_the_released_shapes():
    assert memory.param_counts(get_preset("llama3.2-1b"))["total"] == 1_235_814_400
    assert memory.param_counts(B8)["total"] == 8_030_261_248
    assert memory.param_counts(get_preset("llama3.1-70b"))["total"] == 70_553_706_496


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_activations_are_what_autograd_saves_in_a_block(dtype):
    """Every distinct tensor a block's forward saves for its backward (the CPU path: the dense mask), by storage."""
    config = dataclasses.replace(get_preset("tiny"), dim=64, n_heads=4, n_kv_heads=2, ffn_dim=160)
    block = TransformerBlock(config).to(dtype)
    B, T = 3, 40
    x = torch.randn(B, T, config.dim, dtype=dtype)  # the previous block's output: saved (as fp32) by the norm
    cos, sin = rope_cos_sin(torch.arange(T)[None].expand(B, T), rope_inv_freq(config))
    ids, slots = torch.zeros(B, T, dtype=torch.long), torch.arange(T)
    mask = structure_mask(ids, ids, slots, ids, ids, slots)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    shared = {t.untyped_storage().data_ptr() for t in (cos, sin, mask)}  # made once per forward, not per layer
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x.requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin, mask)
    measured = sum(n for ptr, n in saved.items() if ptr not in params | shared)
    c = 2 if dtype == torch.bfloat16 else 4
    assert memory.layer_activation_bytes(config, c, "cpu", T) * B * T == measured


def test_parameters_gradients_optimizer_bytes_and_the_shard_degree():
    P = memory.param_counts(B8)["total"]
    e = memory.estimate(setting())
    assert (e.params, e.grads, e.optimizer) == (int(4 * P / 8), int(4 * P / 8), int(8 * P / 8))
    two_nodes = memory.estimate(setting(nproc=16))
    assert two_nodes.optimizer == int(8 * P / 16)
    hsdp = memory.estimate(setting(nproc=16, shard_degree=8))  # sharded within 8, replicated twice: as 8 ranks
    assert (hsdp.params, hsdp.grads, hsdp.optimizer) == (e.params, e.grads, e.optimizer)
    assert hsdp.total == e.total
    with pytest.raises(ValueError, match="shard_degree=3 must divide"):
        memory.estimate(setting(nproc=16, shard_degree=3))


def test_gathered_weights_blocks_root_and_lm_head_grad():
    counts, c = memory.param_counts(B8), 2
    e = memory.estimate(setting())
    blocks = 2 * c * counts["block"] + c * counts["block"] + 4 * counts["block"]  # 2 in flight, grad, fp32 reduce
    assert e.gathered == blocks + c * counts["root"] + c * B8.vocab_size * B8.dim
    cpu = memory.estimate(setting(device="cpu", compute_bytes=4, kernels="torch"))
    assert cpu.gathered == 16 * counts["block"] + 4 * counts["root"] + 4 * B8.vocab_size * B8.dim


def test_cpu_offload_moves_the_sharded_state_to_host_memory():
    P = memory.param_counts(B8)["total"]
    e = memory.estimate(setting(cpu_offload=True))
    assert (e.params, e.grads, e.optimizer) == (0, 0, 0)
    assert e.host == int(16 * P / 8)
    assert e.total < memory.estimate(setting()).total


def test_activation_checkpointing_keeps_each_layers_input_and_recomputes_one():
    s = setting(activation_checkpointing=False)
    e = memory.estimate(s)
    n, d, f, L, c = 16384, B8.dim, B8.ffn_dim, B8.n_layers, 2
    layer = n * memory.layer_activation_bytes(B8, c, "cuda", 4096)
    assert e.activations_off - e.activations_on == L * layer - (L * n * c * d + layer)
    assert e.activations_on < e.activations_off / 10
    # 8B in bf16 on CUDA per token and layer: norms 2 x (4d + 2cd + 4), attention c(3d + 2kv) + 4 heads, SwiGLU 4cf
    assert (
        memory.layer_activation_bytes(B8, 2, "cuda", 4096) == 2 * (8 * d + 4) + 2 * (3 * d + 2 * 1024) + 4 * 32 + 8 * f
    )
    # on the CPU, the dense mask made additive per layer: (n_heads / n_kv_heads) x row length x c
    assert (
        memory.layer_activation_bytes(B8, 2, "cpu", 4096) - memory.layer_activation_bytes(B8, 2, "cuda", 4096)
        == 4 * 4096 * 2
    )
    assert e.activations == e.activations_off and memory.estimate(setting()).activations == e.activations_on


def test_the_micro_batch_is_full_rows_of_max_len():
    assert setting(tokens_per_microbatch=16384, max_len=4096).tokens == 16384
    assert setting(tokens_per_microbatch=1024, max_len=4096).tokens == 4096  # one row, however small the budget
    assert setting(tokens_per_microbatch=1000, max_len=100).tokens == 10 * 104  # rows padded to a multiple of 8


def test_logprob_chunk():
    V, d = B8.vocab_size, B8.dim
    torch_path = setting(kernels="torch", tokens_per_microbatch=4096, max_len=4096)
    rows = 64 * 2**20 // (4 * V)  # 130 rows of fp32 logits per chunk
    assert memory.logprob_chunk_bytes(torch_path) == 16 * rows * V + 4 * V * d + 4096 * d * 2
    triton = setting(tokens_per_microbatch=16384, max_len=4096)
    slab = (2**30 // (16384 * 2 * 128)) * 128  # columns of bf16 d logits in 1 GiB
    assert memory.logprob_chunk_bytes(triton) == 16384 * slab * 2 + 16384 * d * (8 + 2)
    assert memory.logprob_chunk_bytes(setting(kind="rm")) == 0


def test_dpo_reference():
    P, c = memory.param_counts(B8)["total"], 2
    live = memory.estimate(setting(kind="dpo", reference="model"))
    assert live.reference == int(c * P / 8)
    assert memory.estimate(setting(kind="dpo", reference="precompute")).reference == 0
    assert live.total > memory.estimate(setting(kind="dpo", reference="precompute")).total
    assert memory.estimate(setting(kind="dpo", reference="model", cpu_offload=True)).reference == 0


def test_the_peak_is_the_largest_phase():
    e = memory.estimate(setting())
    assert e.total == max(e.phases.values()) == e.phases["start of a backward"]
    assert e.total == e.params + e.grads + e.optimizer + e.gathered + e.activations + e.logprob_chunk
    one = memory.estimate(setting(accumulating=False))  # one micro-batch per step: no gradients yet at its peak
    assert one.phases["start of a backward"] == e.phases["start of a backward"] - e.grads


def test_verdict_and_suggestions_in_order_of_cost():
    s = setting(activation_checkpointing=False, tokens_per_microbatch=8192)  # 8B SFT: too big for 8 x 80 GiB
    assert not memory.fits(s, 80) and memory.fits(setting(), 80)
    assert not memory.suggest(setting(activation_checkpointing=False), 80)[0][0].startswith("--nproc")  # activations
    changes = [text for text, _ in memory.suggest(s, 80)]
    assert changes[0].startswith("--nproc") and changes[1] == "train.activation_checkpointing=true"
    assert changes[2].startswith("data.tokens_per_microbatch=")
    assert all(memory.fits(t, 80) for _, t in memory.suggest(s, 80))
    live = setting(kind="dpo", reference="model")
    pre = dataclasses.replace(live, reference="precompute")
    gib = (memory.estimate(live).total + memory.estimate(pre).total) / 2 / GIB / 0.9  # between the two
    assert not memory.fits(live, gib) and memory.fits(pre, gib)
    assert "dpo.reference=precompute" in [text for text, _ in memory.suggest(live, gib)]
    big = setting(model=get_preset("llama3.1-70b"))
    (text, t), *_ = memory.suggest(big, 80)
    assert text.startswith("--nproc") and t.nproc % 8 == 0 and memory.fits(t, 80)
    assert not memory.fits(dataclasses.replace(t, nproc=t.nproc - 8), 80)  # the fewest nodes
    assert memory.suggest(setting(), 80) == []  # fits: nothing to change


def test_detect_kind():
    assert plan.detect_kind(str(ROOT / "experiments/quickstart/dpo.yaml"), []) == "dpo"
    assert plan.detect_kind(str(ROOT / "experiments/llama3.2-1b/rm.yaml"), []) == "rm"  # no rm: section, its name
    assert plan.detect_kind(str(ROOT / "experiments/quickstart/sft.yaml"), ["dpo.beta=0.2"]) == "dpo"


def test_cli(capsys):
    assert plan.main(["--config", str(ROOT / "experiments/quickstart/sft.yaml"), "--nproc", "1", "--gpu-gib", "1", "--device", "cpu"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "parameters" in out and "activations, checkpointing on" in out and "\nfits in 1 GiB" in out
    cfg = str(ROOT / "experiments/llama3.1-8b/sft.yaml")
    assert plan.main(["--config", cfg, "--nproc", "8", "--gpu-gib", "80"]) == 2  # the placeholder checkpoint
    assert "--preset" in capsys.readouterr().err
    args = ["--config", cfg, "--nproc", "8", "--gpu-gib", "80", "--preset", "llama3.1-70b"]
    assert plan.main(args) == plan.NOT_FIT == 3  # the verdict, for scripts
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "try: --nproc" in out
