"""experiments/cpu-llama3-vocab: the SFT -> RM / DPO configs of the tiny real-vocabulary model run
(2 steps each) with the real Llama 3 tokenizer, on TRL-format preference data."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from test_train import ROOT, in_process

from llama_posttrain.llama import get_preset, load_model
from llama_posttrain.llama.convert import main as convert
from llama_posttrain.train import logger

EXP = ROOT / "experiments" / "cpu-llama3-vocab"


def read_metrics(run_dir):
    return logger.read_metrics(Path(run_dir) / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.long
def test_each_stage_config_runs_with_the_real_tokenizer(tmp_path, one_rank, llama3_tokenizer_dir):
    def run(stage, *extra):
        argv = ["--config", str(EXP / f"{stage}.yaml"), f"model.tokenizer={llama3_tokenizer_dir / 'tokenizer.model'}"]
        in_process(
            stage, [*argv, f"train.run_dir={tmp_path / stage}", "logging.progress=false", "train.steps=2", *extra]
        )
        dist.destroy_process_group()
        metrics = read_metrics(tmp_path / stage)
        assert [m["step"] for m in metrics if "loss" in m] == [1, 2]
        assert all(math.isfinite(m["loss"]) for m in metrics if "loss" in m)
        assert (tmp_path / stage / "model_hf" / "config.json").is_file()  # export_hf: true
        return metrics

    sft = run("sft")
    # a random init over the real vocabulary: the first loss is about ln(128256)
    assert sft[0]["eval/loss"] == pytest.approx(math.log(128256), abs=0.1)
    model = tmp_path / "sft" / "model"
    assert load_model(model).config == get_preset("tiny-llama3-vocab")
    # the training checkpoint to HF: the run's tokenizer (model.tokenizer) is written with the weights
    convert(
        ["--from", "dcp", "--to", "hf", str(tmp_path / "sft" / "checkpoints" / "step_00000002"), str(tmp_path / "hf")]
    )
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    exported, converted = (
        load_file(tmp_path / "sft" / "model_hf" / "model.safetensors"),
        load_file(tmp_path / "hf" / "model.safetensors"),
    )
    assert sorted(exported) == sorted(converted) and all(torch.equal(exported[k], converted[k]) for k in exported)
    for stage in ("rm", "dpo"):  # from the SFT model, on the TRL implicit-prompt records with scores
        metrics = run(stage, f"model.checkpoint={model}")
        assert metrics[0]["eval/examples"] == 32  # every record of prefs_eval.jsonl
    assert load_model(tmp_path / "rm" / "model").head == "reward"
