"""Model averaging equals the float64 mean of the tensors; mismatches are refused clearly."""

import pytest
import torch
from conftest import CONFIGS, random_model, with_fields
from safetensors.torch import load_file

from llama import save_model
from train.average import average_checkpoints, greedy_soup


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
    save_model(random_model(a), tmp_path / "hf", format="hf")
    with pytest.raises(ValueError, match="is a hf checkpoint; convert it first"):
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
