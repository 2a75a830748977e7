"""Precision and memory of the sharded models, under a 1-rank gloo group on the CPU: the reward head
computes in fp32 on a bf16 trunk (issue 13 item 3); the frozen DPO reference is stored in the
compute dtype and its root is resharded after a forward (item 4)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, random_model
from torch.distributed.tensor import DTensor

from llama_posttrain.train.distributed import build_model, init_distributed, parallelize

CONFIG = CONFIGS["gqa-untied-scaled"]


def tokens(n=24, seed=0):
    return torch.randint(0, CONFIG.vocab_size, (2, n), generator=torch.Generator().manual_seed(seed))


def test_reward_head_is_fp32_on_a_bf16_trunk():
    """Rewards are the fp32 head applied to the bf16 trunk's final hidden states, not bf16 values."""
    model = random_model(CONFIG, head="reward").to(torch.bfloat16)
    x = tokens()
    with torch.no_grad():
        r = model(x)
        h = model.trunk(x)  # (B, T, dim) bf16
    w = model.score.weight[0]
    assert r.dtype == torch.float32 and h.dtype == torch.bfloat16
    assert torch.equal(r, F.linear(h.float(), w.float()))
    in_bf16 = F.linear(h, w).float()  # what a bf16 head gives: rounded to steps of 2^-8 .. 2^-6 here
    assert r.abs().max() > 0.5 and (r - in_bf16).abs().max() > 1e-4


def test_sharded_reward_head_gathers_fp32_weights_under_bf16_mixed_precision(one_rank):
    d = init_distributed()
    model = random_model(CONFIG, head="reward")
    master = model.score.weight.detach().clone()  # fp32
    parallelize(model, d, mixed_precision="bf16")
    seen = {}
    model.score.register_forward_pre_hook(lambda m, args: seen.update(h=args[0], w=m.weight.detach().clone()))
    x = tokens()
    r = model(x)
    r.sum().backward()
    assert torch.equal(seen["w"], master) and r.dtype == torch.float32  # gathered in fp32, not rounded
    assert seen["h"].dtype == torch.float32  # cast by the head's own policy; the trunk ran in bf16
    assert torch.equal(r.detach(), F.linear(seen["h"], seen["w"][0]))
    assert model.score.weight.grad.dtype == torch.float32


def test_frozen_reference_is_stored_in_bf16_and_resharded_after_forward(one_rank):
    d = init_distributed()
    ref = build_model(d, None, "debug", "lm", seed=0, mixed_precision="bf16", trainable=False)
    policy = build_model(d, None, "debug", "lm", seed=0, mixed_precision="bf16")
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in policy.parameters()} == {torch.float32}  # the optimizer's master copy
    for p, q in zip(ref.parameters(), policy.parameters()):  # the same weights, rounded once
        assert torch.equal(p.full_tensor(), q.full_tensor().to(torch.bfloat16))
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref(x)
        policy(x)
    # sharded parameters are DTensors; gathered ones plain tensors registered in their place
    assert isinstance(ref.tok_embeddings.weight, DTensor) and isinstance(ref.norm.weight, DTensor)
    assert not isinstance(policy.tok_embeddings.weight, DTensor)  # FSDP2's default for a root: kept for backward


def test_sampling_scores_of_a_bf16_reward_model_are_fp32():
    """Best-of-K scores from a bf16 reward model: the fp32 head on the bf16 trunk (no bf16 ties)."""
    from llama_posttrain.jobs.scoring import score
    from llama_posttrain.llama import get_preset
    from llama_posttrain.llama.chat import ChatFormat
    from llama_posttrain.llama.tokenizer import load_tokenizer

    chat = ChatFormat(load_tokenizer())
    rm = random_model(get_preset("debug"), head="reward").to(torch.bfloat16)
    with torch.no_grad():
        rm.score.weight.mul_(4)  # rewards of a few units, where bf16 steps are 2^-6 .. 2^-5
    prompt = [{"role": "user", "content": "12+30="}]
    texts = ["42", "41", "forty-two", "4 2", "42.", "42!"]
    got = score(rm, chat, [prompt], [texts])[0]
    for j, text in enumerate(texts):
        ids = chat.encode_dialog(prompt + [{"role": "assistant", "content": text}]).tokens
        with torch.no_grad():
            h = rm.trunk(torch.tensor([ids]))[0, -1]  # bf16
        exact = F.linear(h.float(), rm.score.weight[0].float()).item()
        assert got[j] == pytest.approx(exact, abs=1e-5)
        assert got[j] != F.linear(h, rm.score.weight[0]).float().item()  # not the bf16-rounded value
