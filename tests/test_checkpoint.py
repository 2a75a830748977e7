"""Our model against transformers' Llama on the same weights; HF / Meta / native round trips."""

import json

import pytest
import torch
from conftest import CONFIGS, random_model, with_fields
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, LlamaForSequenceClassification

from llama_posttrain.llama import CheckpointError, RopeScaling, load_model, save_model
from llama_posttrain.llama.checkpoint import read_config


def tokens(config, B=2, T=23, seed=1):
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_match_transformers(config, tmp_path):
    ours = random_model(config)
    save_model(ours, tmp_path / "hf", format="hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, attn_implementation="eager").eval()
    x = tokens(config)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_hf_model_loads_into_ours(config, tmp_path):
    """The other direction: weights written by transformers itself (its own q/k layout)."""
    torch.manual_seed(3)
    save_model(random_model(config), tmp_path / "seed", format="hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "seed", dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights no export of ours produced
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.config == config
    x = tokens(config)
    with torch.no_grad():
        diff = (ours(x) - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_hf_native_hf_roundtrip_is_bit_exact(config, tmp_path):
    save_model(random_model(config), tmp_path / "a", format="hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "hf")  # transformers' own files
    load = load_model(tmp_path / "hf")
    save_model(load, tmp_path / "native", format="native")
    save_model(load_model(tmp_path / "native"), tmp_path / "back", format="hf")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    if config.tie_embeddings:
        a.pop("lm_head.weight", None)  # a tied copy, if transformers stored one
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sharded_native_and_dtype(tmp_path):
    config = CONFIGS["gqa-untied-scaled"]
    model = random_model(config)
    save_model(model, tmp_path / "n", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "n" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back = load_model(tmp_path / "n", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in back.parameters())
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v.bfloat16(), v2)


def _save_meta(model, path, n_shards: int, ffn_dim_multiplier: float, multiple_of: int):
    """Write `model` the way Meta's model-parallel reference saves it: split column/row-parallel."""
    split = {"tok_embeddings": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}
    sd = model.state_dict()
    shards = [{} for _ in range(n_shards)]
    for name, t in sd.items():
        dim = split.get(name.split(".")[-2])
        parts = t.chunk(n_shards, dim=dim) if dim is not None else [t] * n_shards
        for s, p in zip(shards, parts):
            s[name] = p.clone()
    if model.config.tie_embeddings:  # Meta's checkpoints store the tied matrix twice
        for s, p in zip(shards, sd["tok_embeddings.weight"].chunk(n_shards, 0)):
            s["output.weight"] = p.clone()
    path.mkdir()
    for i, s in enumerate(shards):
        torch.save(s, path / f"consolidated.{i:02d}.pth")
    c = model.config
    params = dict(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, vocab_size=c.vocab_size)
    params.update(multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier, norm_eps=c.norm_eps)
    params.update(rope_theta=c.rope_theta, use_scaled_rope=True, rope_scaling_factor=c.rope_scaling.factor)
    params.update(max_seq_len=c.max_seq_len)
    (path / "params.json").write_text(json.dumps(params))


@pytest.mark.parametrize("name", ["gqa-tied-scaled", "gqa-untied-scaled"])
def test_meta_two_shards_same_logits(name, tmp_path):
    # params.json gives the FFN size through Meta's sizing rule and no original RoPE context (8192)
    base = CONFIGS[name]
    hidden = int(1.3 * int(2 * 4 * base.dim / 3))
    rope = RopeScaling(factor=base.rope_scaling.factor)
    config = with_fields(base, ffn_dim=32 * ((hidden + 31) // 32), n_kv_heads=2, rope_scaling=rope)
    model = random_model(config)
    _save_meta(model, tmp_path / "meta", n_shards=2, ffn_dim_multiplier=1.3, multiple_of=32)
    loaded = load_model(tmp_path / "meta")
    assert loaded.config == config
    x = tokens(config)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_reward_head_exports_as_sequence_classifier(tmp_path):
    config = CONFIGS["gqa-tied-scaled"]
    save_model(random_model(config), tmp_path / "lm")
    rm = load_model(tmp_path / "lm", head="reward", new_head_ok=True)  # LM checkpoint -> fresh scalar head
    assert rm.head == "reward" and not hasattr(rm, "output")
    save_model(rm, tmp_path / "rm", format="hf")
    assert read_config(tmp_path / "rm")[1] == "reward"
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    x = tokens(config)
    with torch.no_grad():
        ours = rm(x)  # (B, T): a reward at every position
        theirs = torch.cat([hf(row[None]).logits[:, 0] for row in x])  # HF scores the last token
    assert ours.shape == x.shape
    assert torch.allclose(ours[:, -1], theirs, atol=1e-5)
    native = load_model(tmp_path / "rm")  # HF reward checkpoint back into ours
    with torch.no_grad():
        assert torch.allclose(native(x), ours, atol=1e-6)


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    config = CONFIGS["gqa-untied-scaled"]
    save_model(random_model(config), tmp_path / "ok")
    sd = load_file(tmp_path / "ok" / "model.safetensors")
    sd.pop("layers.1.feed_forward.w2.weight")
    sd["layers.0.attention.wq.weight"] = torch.zeros(3, 3)
    sd["layers.7.extra.weight"] = torch.zeros(1)
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "ok" / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "ok")
    msg = str(e.value)
    assert "missing: layers.1.feed_forward.w2.weight" in msg
    assert "unexpected: layers.7.extra.weight" in msg
    assert "shape: layers.0.attention.wq.weight is (3, 3)" in msg


def test_reward_checkpoint_cannot_become_untied_lm(tmp_path):
    save_model(random_model(CONFIGS["gqa-untied-scaled"], head="reward"), tmp_path / "rm")
    with pytest.raises(CheckpointError, match="no LM head"):
        load_model(tmp_path / "rm", head="lm")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        load_model(tmp_path)


def test_save_is_atomic_and_replaces(tmp_path):
    config = CONFIGS["gqa-tied-scaled"]
    save_model(random_model(config, seed=1), tmp_path / "c")
    save_model(random_model(config, seed=2), tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp or old directory left
    x = tokens(config)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "c")(x), random_model(config, seed=2)(x))


def test_convert_cli(tmp_path):
    from llama_posttrain.llama.convert import main

    config = CONFIGS["gqa-untied-scaled"]
    save_model(random_model(config), tmp_path / "hf", format="hf")
    main(["--from", "hf", "--to", "native", str(tmp_path / "hf"), str(tmp_path / "native")])
    main(["--from", "native", "--to", "hf", str(tmp_path / "native"), str(tmp_path / "hf2")])
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="is a native checkpoint"):
        main(["--from", "hf", "--to", "native", str(tmp_path / "native"), str(tmp_path / "x")])
