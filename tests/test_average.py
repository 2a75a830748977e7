"""Model averaging equals the float64 mean of the tensors; mismatches are refused clearly."""

import pytest
import torch
from conftest import CONFIGS, random_model, with_fields
from safetensors.torch import load_file

from llama_posttrain.jobs.average import main as average_main
from llama_posttrain.jobs.averaging import average_checkpoints, greedy_soup
from llama_posttrain.llama import RopeScaling, load_model, save_checkpoint, save_model


def test_average_of_three_equals_float64_mean(tmp_path):
    config = CONFIGS["gqa-untied-scaled"]
    paths = []
    for seed in range(3):
        save_model(random_model(config, seed=seed), tmp_path / f"m{seed}")
        paths.append(tmp_path / f"m{seed}")
    average_checkpoints(paths, tmp_path / "avg")
    avg = load_file(tmp_path / "avg" / "model.safetensors")
    tensors = [load_file(p / "model.safetensors") for p in paths]
    for name in tensors[0]:
        expected = sum(t[name].double() for t in tensors) / 3
        # the float64 mean, up to its rounding to the stored fp32 (half an ulp)
        assert torch.allclose(avg[name].double(), expected, rtol=2**-24, atol=1e-30), name
    average_checkpoints(paths, tmp_path / "w", weights=[0.5, 0.5, 0.0])
    w = load_file(tmp_path / "w" / "model.safetensors")
    name = "layers.0.attention.wq.weight"
    half = (tensors[0][name].double() + tensors[1][name].double()) / 2
    assert torch.allclose(w[name].double(), half, rtol=2**-24, atol=1e-30)


def test_mismatched_configs_are_refused(tmp_path):
    a = CONFIGS["gqa-untied-scaled"]
    save_model(random_model(a), tmp_path / "a")
    save_model(random_model(with_fields(a, ffn_dim=96)), tmp_path / "b")
    with pytest.raises(ValueError, match="model configs or heads differ"):
        average_checkpoints([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    save_model(random_model(a, head="reward"), tmp_path / "rm")
    with pytest.raises(ValueError, match="model configs or heads differ"):
        average_checkpoints([tmp_path / "a", tmp_path / "rm"], tmp_path / "out")
    save_model(random_model(with_fields(a, n_kv_heads=2)), tmp_path / "hf", format="hf")
    with pytest.raises(ValueError, match=f"cannot average {tmp_path / 'a'} and {tmp_path / 'hf'}: model configs"):
        average_checkpoints([tmp_path / "a", tmp_path / "hf"], tmp_path / "out")
    with pytest.raises(ValueError, match="weights must be"):
        average_checkpoints([tmp_path / "a"], tmp_path / "out", weights=[0.3])
    assert not (tmp_path / "out").exists()


def test_greedy_soup_keeps_what_helps(tmp_path):
    config = CONFIGS["gqa-tied-scaled"]
    for seed in range(3):
        save_model(random_model(config, seed=seed), tmp_path / f"m{seed}")
    target = load_file(tmp_path / "m0" / "model.safetensors")["norm.weight"]

    def score(path):  # closeness of the final norm to m0's: m0 alone is best; averaging only hurts
        return -(load_file(path / "model.safetensors")["norm.weight"] - target).abs().sum().item()

    soup, members = greedy_soup([tmp_path / f"m{s}" for s in (2, 0, 1)], score, tmp_path / "soup", tmp_path / "work")
    assert members == [tmp_path / "m0"]
    assert torch.equal(load_file(soup / "model.safetensors")["norm.weight"], target)


def test_hf_and_meta_inputs_average_like_native_ones(tmp_path):
    from test_checkpoint import _save_meta

    # a config that round-trips through Meta's params.json (FFN sizing rule, default RoPE context); tied,
    # so the Meta input (output stored twice) must be recognized as tied to match the others
    base = CONFIGS["gqa-tied-scaled"]
    config = with_fields(
        base, ffn_dim=32 * ((int(1.3 * int(2 * 4 * base.dim / 3)) + 31) // 32), rope_scaling=RopeScaling(factor=32.0)
    )
    models = [random_model(config, seed=s) for s in range(3)]
    for i, m in enumerate(models):
        save_model(m, tmp_path / f"n{i}")
    save_model(models[1], tmp_path / "hf1", format="hf")
    _save_meta(models[2], tmp_path / "meta2", n_shards=2, ffn_dim_multiplier=1.3, multiple_of=32)
    average_checkpoints([tmp_path / "n0", tmp_path / "hf1", tmp_path / "meta2"], tmp_path / "avg")
    average_checkpoints([tmp_path / f"n{i}" for i in range(3)], tmp_path / "ref")
    avg, ref = load_file(tmp_path / "avg" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert sorted(avg) == sorted(ref) and "output.weight" not in avg
    for name, t in ref.items():
        assert torch.equal(avg[name], t), name
        mean = sum(m.state_dict()[name].double() for m in models) / 3
        assert torch.allclose(t.double(), mean, rtol=2**-24, atol=1e-30), name
    assert sorted(p.name for p in tmp_path.iterdir() if ".inputs-" in p.name) == []  # temp copies removed

    average_main([str(tmp_path / "hf1"), str(tmp_path / "n0"), "--out", str(tmp_path / "avg_hf"), "--format", "hf"])
    assert torch.is_grad_enabled()  # an in-process call leaves the caller's grad mode as it was
    hf = load_model(tmp_path / "avg_hf").state_dict()
    two = {k: (models[0].state_dict()[k].double() + models[1].state_dict()[k].double()) / 2 for k in hf}
    for name, t in hf.items():
        assert torch.allclose(t.double(), two[name], rtol=2**-24, atol=1e-30), name


def test_inputs_in_different_dtypes_need_dtype(tmp_path):
    config = CONFIGS["gqa-untied-scaled"]
    a, b = random_model(config, seed=0), random_model(config, seed=1)
    save_model(a, tmp_path / "fp32")
    save_checkpoint({k: v.bfloat16() for k, v in b.state_dict().items()}, config, "lm", tmp_path / "bf16", format="hf")
    paths = [tmp_path / "fp32", tmp_path / "bf16"]
    with pytest.raises(SystemExit, match="different dtypes .*choose the average's with --dtype"):
        average_main([*map(str, paths), "--out", str(tmp_path / "avg")])
    assert not (tmp_path / "avg").exists()
    average_checkpoints(paths, tmp_path / "avg", dtype=torch.bfloat16)
    avg = load_file(tmp_path / "avg" / "model.safetensors")
    name = "layers.0.feed_forward.w1.weight"
    expected = (a.state_dict()[name].double() + b.state_dict()[name].bfloat16().double()) / 2
    assert avg[name].dtype == torch.bfloat16 and torch.equal(avg[name], expected.bfloat16())
