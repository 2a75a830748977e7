"""What a training run prints when it cannot start: a config or data error is one line, printed
once (rank 0), exit status 2; an error after training started keeps its traceback. And no FSDP2
warning from the reward head on every rank of every RM/DPO run."""

import subprocess
import warnings

import pytest
import torch
from test_train import ENV, QUICK, ROOT, SHORT, torchrun_cmd

from llama_posttrain.llama import Transformer, get_preset
from llama_posttrain.train import loop, sft
from llama_posttrain.train.lifecycle import main_guard


def argv(tmp_path, *extra):
    return ["--config", str(QUICK / "sft.yaml"), f"train.run_dir={tmp_path}", "logging.progress=false", *SHORT, *extra]


def test_a_data_error_before_training_is_one_line_and_exit_2(tmp_path, one_rank, capsys):
    with pytest.raises(SystemExit) as e:
        main_guard(lambda: sft.main(argv(tmp_path, "data.batch_size=5000")))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error" in line] == [
        "error: data.train experiments/quickstart/data/sft_train.jsonl: 2000 examples (after the drops reported "
        "above), fewer than one batch of data.batch_size=5000"
    ]


def test_an_error_after_training_started_keeps_its_traceback(tmp_path, one_rank, monkeypatch):
    def failing_step(self, batch, step):
        raise ValueError("raised inside a training step")

    monkeypatch.setattr(loop.Trainer, "train_step", failing_step)
    with pytest.raises(ValueError, match="raised inside a training step"):
        main_guard(lambda: sft.main(argv(tmp_path, "train.steps=1")))


@pytest.mark.long  # torchrun's 2 ranks (pytest -m long); the one-process errors stay in CI
def test_batch_size_errors_under_torchrun_name_the_key_once(tmp_path):
    """Every rank fails alike after reading the data; the error is printed once. (One case: each
    torchrun launch costs seconds; the other checks run in-process above.)"""
    cases = [("data.batch_size=5000", "fewer than one batch of data.batch_size=5000")]
    for i, (override, message) in enumerate(cases):
        cmd = torchrun_cmd("sft", QUICK / "sft.yaml", tmp_path / str(i), [*SHORT, override], nproc=2)
        out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        text = out.stdout + out.stderr
        assert out.returncode != 0 and "exitcode  : 2" in text, text[-3000:]
        assert [line for line in text.splitlines() if message in line][0].startswith("error: ")
        assert len([line for line in text.splitlines() if message in line]) == 1, text[-3000:]
        # torchrun prints its own summary; the workers print no traceback
        assert "ValueError" not in text and f'File "{ROOT / "llama_posttrain" / "train"}' not in text, text[-3000:]


def test_reward_model_under_fsdp2_returns_no_view(one_rank):
    from llama_posttrain.train.distributed import init_distributed, parallelize

    d = init_distributed()
    model = Transformer(get_preset("debug"), head="reward")
    parallelize(model, d)
    tokens = torch.randint(0, 512, (2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rewards = model(tokens)
        rewards.sum().backward()
    assert rewards.shape == (2, 8) and not rewards._is_view()
    assert [str(w.message) for w in caught if "view" in str(w.message)] == []


def test_batch_size_smaller_than_ranks_is_refused_before_tokenizing(tmp_path):
    from llama_posttrain.data.loader import build_loaders
    from llama_posttrain.train.config import DataSection

    dc = DataSection(train=str(tmp_path / "never_read.jsonl"), batch_size=1)  # the check comes before the file
    with pytest.raises(ValueError, match=r"^data\.batch_size=1 is smaller than the number of ranks \(2\)"):
        build_loaders(dc, "sft", None, rank=0, world_size=2)
