"""Config files and overrides map onto the dataclasses field by field; mistakes name the key."""

import pytest
import yaml

from llama_posttrain.train.config import load_config
from llama_posttrain.train.dpo import DPOConfig
from llama_posttrain.train.sft import SFTConfig


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  preset: tiny\noptim:\n  lr: 3.0e-4\n  betas: [0.9, 0.99]\ndpo:\n  beta: 0.5\n")
    cfg = load_config(
        DPOConfig, path, ["optim.lr=1e-5", "train.steps=7", "dpo.mask_format=false", "data.keep_strengths=[better]"]
    )
    assert cfg.model.preset == "tiny" and cfg.optim.lr == 1e-5 and cfg.optim.betas == [0.9, 0.99]
    assert cfg.train.steps == 7 and cfg.dpo.beta == 0.5 and cfg.dpo.mask_format is False
    assert cfg.data.keep_strengths == ["better"]
    assert load_config(DPOConfig, None).optim.lr == 1e-5 and load_config(DPOConfig, None).dpo.alpha == 0.2  # Llama 3


def test_unknown_keys_and_bad_values_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"c\.yaml: unknown key optim\.learning_rate"):
        load_config(SFTConfig, write(tmp_path, "optim:\n  learning_rate: 1\n"))
    with pytest.raises(ValueError, match=r"unknown section 'dpo'"):
        load_config(SFTConfig, write(tmp_path, "dpo:\n  beta: 1\n"))
    with pytest.raises(ValueError, match=r"train\.steps: expected int, got 'many'"):
        load_config(SFTConfig, None, ["train.steps=many"])
    with pytest.raises(ValueError, match=r"optim\.schedule must be one of"):
        load_config(SFTConfig, None, ["optim.schedule=wiggly"])
    with pytest.raises(ValueError, match=r"must look like section\.key=value"):
        load_config(SFTConfig, None, ["steps=3"])


def test_shipped_configs_load():
    from pathlib import Path

    from llama_posttrain.train.rm import RMConfig

    root = Path(__file__).parent.parent / "experiments"
    kinds = {"rm": RMConfig, "sft": SFTConfig, "dpo": DPOConfig}
    files = sorted(root.glob("*/*.yaml"))
    assert len(files) >= 3
    for f in files:
        kind = f.stem.split("_")[0]
        if kind in kinds:
            load_config(kinds[kind], str(f))
        else:
            assert isinstance(yaml.safe_load(f.read_text()), dict)
