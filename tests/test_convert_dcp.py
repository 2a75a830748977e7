"""python -m llama_posttrain.llama.convert --from dcp: a model out of a training checkpoint equals the run's export
at that step, bit for bit; the head comes from the run's kind; bad inputs are named."""

import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import QUICK, SHORT, in_process

from llama_posttrain.llama import load_model
from llama_posttrain.llama.convert import main as convert


@pytest.mark.parametrize("entry", ["sft", "rm"])
def test_dcp_checkpoint_converts_to_the_runs_exported_model(tmp_path, one_rank, entry, capsys):
    run = tmp_path / "run"
    argv = ["--config", str(QUICK / f"{entry}.yaml"), f"train.run_dir={run}", "logging.progress=false", *SHORT]
    in_process(entry, [*argv, "train.steps=2", "train.save_every=2"])  # the final export is step 2's model
    step = run / "checkpoints" / "step_00000002"
    convert(["--from", "dcp", "--to", "native", str(step), str(tmp_path / "native")])
    assert f"head {'reward' if entry == 'rm' else 'lm'}" in capsys.readouterr().out
    exported, converted = (
        load_file(run / "model" / "model.safetensors"),
        load_file(tmp_path / "native" / "model.safetensors"),
    )
    assert sorted(converted) == sorted(exported)
    for name, t in exported.items():
        assert converted[name].dtype == t.dtype and torch.equal(converted[name], t), name
    assert ("score.weight" in exported) == (entry == "rm")

    convert(["--from", "dcp", "--to", "hf", "--dtype", "bfloat16", str(step), str(tmp_path / "hf")])
    hf = load_model(tmp_path / "hf")
    assert hf.head == ("reward" if entry == "rm" else "lm")
    for name, t in hf.state_dict().items():  # the HF layout (q/k permuted, renamed) read back is the same model
        assert torch.equal(t, exported[name].to(torch.bfloat16)), name


def test_dcp_conversion_errors_name_the_problem(tmp_path, one_rank):
    run = tmp_path / "run"
    argv = ["--config", str(QUICK / "sft.yaml"), f"train.run_dir={run}", "logging.progress=false", *SHORT]
    in_process("sft", [*argv, "train.steps=1"])
    step = run / "checkpoints" / "step_00000001"

    def fails(match, src=step, *extra):
        with pytest.raises(SystemExit, match=match):
            convert(["--from", "dcp", "--to", "native", *extra, str(src), str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()

    fails("not a training checkpoint", run / "model")  # a safetensors folder given as dcp
    fails("is a checkpoint of a run with the lm head, not reward", step, "--head", "reward")
    elsewhere = tmp_path / "copy" / "step_00000001"
    shutil.copytree(step, elsewhere)  # out of its run folder: no config.yaml to take the model from
    fails("no run config at", elsewhere)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("preset: tiny", "preset: debug"))
    fails(r"does not match its run's model config:\n  unexpected: layers.2.attention.wk.weight(.|\n)*and 30 more")
    (run / "config.yaml").write_text("model: {preset: debug}\ndata: {}\n")
    fails("cannot tell the run's kind")
