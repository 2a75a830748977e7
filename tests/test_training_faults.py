"""Faults around a training run: one run per folder, a changed config on resume, a torn metrics
line, a truncated checkpoint, signals (mid-step, and under torchrun), bad configs, and a clean
exit of every entry point on an oversubscribed CPU."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import ENV, QUICK, ROOT, SHORT, in_process, torchrun_cmd

from llama_posttrain.train import lifecycle, logger, loop
from llama_posttrain.train.config import load_config
from llama_posttrain.train.distributed import torchrun_command
from llama_posttrain.train.sft import SFTConfig


def sft_argv(run_dir, *extra):
    return ["--config", str(QUICK / "sft.yaml"), f"train.run_dir={run_dir}", "logging.progress=false", *SHORT, *extra]


def read_metrics(run_dir):
    return logger.read_metrics(Path(run_dir) / "metrics.jsonl")


def fresh_group():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def test_resume_never_refuses_another_runs_folder_and_restart_starts_over(tmp_path, one_rank):
    in_process("sft", sft_argv(tmp_path, "train.steps=4", "train.save_every=2"))
    fresh_group()
    with pytest.raises(ValueError, match=r"holds another run \(checkpoints, model, metrics.jsonl, config.yaml"):
        in_process("sft", sft_argv(tmp_path, "train.steps=2", "train.resume=never"))
    fresh_group()
    in_process("sft", sft_argv(tmp_path, "train.steps=2", "train.resume=restart", "data.seed=1"))
    fresh_group()
    # only the new run is left: a later resume: auto cannot continue the old one
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]
    assert [m["step"] for m in read_metrics(tmp_path) if "loss" in m] == [1, 2]
    assert load_config(SFTConfig, str(tmp_path / "config.yaml")).data.seed == 1


def test_changed_config_on_resume_is_refused_and_the_record_kept(tmp_path, one_rank, capsys):
    in_process("sft", sft_argv(tmp_path, "train.steps=2"))
    fresh_group()
    record = (tmp_path / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match=r"(?s)different config.*optim\.lr: 0\.003 \(saved\) -> 0\.001 \(now\)"):
        in_process("sft", sft_argv(tmp_path, "train.steps=4", "optim.lr=1e-3"))
    fresh_group()
    with pytest.raises(ValueError, match=r"data\.train: .*sft_train\.jsonl' \(saved\) -> '.*sft_eval\.jsonl'"):
        in_process("sft", sft_argv(tmp_path, "train.steps=4", f"data.train={QUICK / 'data' / 'sft_eval.jsonl'}"))
    fresh_group()
    in_process("sft", sft_argv(tmp_path, "train.steps=3", "logging.log_every=1"))  # steps may change
    fresh_group()
    assert "resuming with changed train.steps: 2 -> 3" in capsys.readouterr().out
    assert (tmp_path / "config.yaml").read_bytes() == record
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, one_rank):
    in_process("sft", sft_argv(tmp_path, "train.steps=2"))
    fresh_group()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # the process died mid-write
    in_process("sft", sft_argv(tmp_path, "train.steps=3"))
    fresh_group()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_truncated_checkpoint_falls_back_to_the_previous(tmp_path, one_rank, capsys):
    in_process("sft", sft_argv(tmp_path, "train.steps=3", "train.save_every=1", "train.keep_last=0"))
    fresh_group()
    newest = tmp_path / "checkpoints" / "step_00000003"
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    in_process("sft", sft_argv(tmp_path, "train.steps=4", "train.save_every=1", "train.keep_last=0"))
    fresh_group()
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is unusable: {shard.name} is truncated" in out
    assert "resumed from" in out and "step_00000002 (step 2)" in out
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_a_signal_mid_step_saves_the_last_finished_step_and_resumes_exactly(tmp_path, one_rank, monkeypatch):
    import llama_posttrain.train.sft_objective as sft

    args = ["train.steps=5", "data.tokens_per_microbatch=256"]  # several micro-batches per step
    in_process("sft", sft_argv(tmp_path / "ref", *args))
    fresh_group()
    real_make_objective, calls = sft.make_objective, []

    def signalled_objective(model, backend):
        objective = real_make_objective(model, backend)

        def loss(batch, step):
            if not calls or calls[-1][0] is not step:
                calls.append([step, 0])
            calls[-1][1] += 1
            if len(calls) == 4 and calls[-1][1] == 2:  # step 4, its second micro-batch: as if SIGTERM came now
                lifecycle.StopSignal.received = signal.SIGTERM
            return objective.loss(batch, step)

        return loop.Objective(loss, objective.ratios, objective.derive)

    monkeypatch.setattr(sft, "make_objective", signalled_objective)
    monkeypatch.setattr(lifecycle.StopSignal, "received", None)
    with pytest.raises(SystemExit) as stopped:
        in_process("sft", sft_argv(tmp_path / "run", *args))
    fresh_group()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000003"]
    assert lifecycle.read_result(tmp_path / "run") == {"saved_step": 3, "stopped_by": "SIGTERM"}  # the launcher's
    monkeypatch.setattr(lifecycle.StopSignal, "received", None)
    monkeypatch.setattr(sft, "make_objective", real_make_objective)
    in_process("sft", sft_argv(tmp_path / "run", *args))
    fresh_group()
    ref, run = (
        load_file(tmp_path / "ref" / "model" / "model.safetensors"),
        load_file(tmp_path / "run" / "model" / "model.safetensors"),
    )
    assert all(torch.equal(ref[k], run[k]) for k in ref)
    assert lifecycle.read_result(tmp_path / "run") == {"saved_step": 5, "stopped_by": None}  # finished
    keys = ("loss", "grad_norm", "lr", "tokens")
    assert [{k: m[k] for k in keys} for m in read_metrics(tmp_path / "ref")] == [
        {k: m[k] for k in keys} for m in read_metrics(tmp_path / "run")
    ]


@pytest.mark.slow
@pytest.mark.long
def test_sigterm_and_ctrl_c_under_torchrun_save_and_exit_without_tracebacks(tmp_path):
    args = ["train.steps=400", "train.save_every=0"]
    for sig, expect in ((signal.SIGTERM, "SIGTERM: saved step"), (signal.SIGINT, "SIGINT: saved step")):
        proc = subprocess.Popen(
            torchrun_cmd("sft", QUICK / "sft.yaml", tmp_path, [*SHORT, *args]), cwd=ROOT, env=ENV, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
        before = len(read_metrics(tmp_path))
        while time.time() < deadline and len(read_metrics(tmp_path)) < before + 3:
            time.sleep(0.05)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # Ctrl-C reaches the whole foreground group: torchrun and workers
        else:
            proc.send_signal(sig)  # a scheduler signals torchrun, which forwards it
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode != 0 and expect in out, out[-3000:]
        # torchrun itself prints a traceback of its SignalException; the workers print none
        assert str(ROOT / "llama_posttrain" / "train") not in out and "KeyboardInterrupt" not in out, out[-3000:]
        saved = int(out.split(expect)[1].split(";")[0])
        assert (tmp_path / "checkpoints" / f"step_{saved:08d}").is_dir()
        assert metrics.exists()
    out = subprocess.run(
        torchrun_cmd("sft", QUICK / "sft.yaml", tmp_path, [*SHORT, "train.steps=" + str(saved + 2)]), cwd=ROOT,
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert [m["step"] for m in read_metrics(tmp_path)] == list(range(1, saved + 3))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["logging.log_every=0"], r"logging\.log_every: must be >= 1, got 0"),
        (["train.steps=0"], r"train\.steps: must be >= 1, got 0"),
        (["train.steps=-3"], r"train\.steps: must be >= 1, got -3"),
        (["optim.lr=[1e-5"], r"override 'optim\.lr=\[1e-5': YAML syntax error"),
        (["train.resume=sometimes"], r"train\.resume must be one of \('auto', 'never', 'restart'\)"),
    ],
)
def test_bad_config_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(SFTConfig, str(QUICK / "sft.yaml"), overrides)


def test_bad_config_files_are_named(tmp_path):
    empty, broken = tmp_path / "empty.yaml", tmp_path / "broken.yaml"
    empty.write_text("# nothing here\n")
    broken.write_text("train:\n  steps: [3\n")
    with pytest.raises(ValueError, match=r"empty\.yaml: the config file is empty"):
        load_config(SFTConfig, str(empty))
    with pytest.raises(ValueError, match=r"broken\.yaml: YAML syntax error"):
        load_config(SFTConfig, str(broken))
    with pytest.raises(ValueError, match=r"is a directory"):
        load_config(SFTConfig, str(tmp_path))


def test_help_lists_every_key_with_its_default(capsys):
    from llama_posttrain.train import dpo

    with pytest.raises(SystemExit) as e:
        dpo.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for line in ("train.steps = 100", "dpo.beta = 0.1", "optim.schedule = 'cosine'  cosine|linear|constant"):
        assert line in out


class busy_cores:
    """`n` busy-loop processes beside the test's: the CPU oversubscribed, as on a shared machine."""

    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


def exits_cleanly(name, cmd):
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, name + ": " + out.stderr[-3000:]
    assert "terminate called" not in out.stderr, name + ": " + out.stderr[-3000:]


def sample_cmd(policy, rm, out):
    return torchrun_command(str(ROOT / "llama_posttrain" / "jobs" / "sample.py"), 2, [
        "--policy", str(policy), "--rm", str(rm), "--prompts", str(QUICK / "data" / "pref_eval.jsonl"),
        "--k", "2", "--max-new-tokens", "4", "--out-sft", str(out),
    ])  # fmt: skip


QUICK_RUN = ["data.eval=null", "train.steps=2", "optim.warmup_steps=0"]


@pytest.mark.long  # 15 s: three busy-machine runs (pytest -m long)
def test_sft_exits_0_on_a_busy_machine(tmp_path):
    """2-rank SFT (which once aborted at exit under load) with the cores oversubscribed. Every entry
    point, three times: test_every_entry_point_exits_0_on_a_busy_machine (long)."""
    with busy_cores(2):
        exits_cleanly("sft", torchrun_cmd("sft", QUICK / "sft.yaml", tmp_path / "sft", QUICK_RUN))


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("repeat", range(3))
def test_every_entry_point_exits_0_on_a_busy_machine(tmp_path, repeat):
    """2-rank runs of rm, sft, dpo and sample with busy-loop processes taking the cores, three times."""
    with busy_cores(3):
        for entry in ("rm", "sft", "dpo"):
            exits_cleanly(entry, torchrun_cmd(entry, QUICK / f"{entry}.yaml", tmp_path / entry, QUICK_RUN))
        exits_cleanly("sample", sample_cmd(tmp_path / "sft" / "model", tmp_path / "rm" / "model", tmp_path / "s.jsonl"))


def test_training_refuses_a_checkpoint_whose_vocabulary_is_not_the_byte_tokenizers(tmp_path):
    from conftest import CONFIGS, random_model

    from llama_posttrain.llama import save_model
    from llama_posttrain.train.distributed import model_tokenizer

    save_model(random_model(CONFIGS["gqa-tied-scaled"]), tmp_path / "ckpt")  # vocab 300, no tokenizer file
    with pytest.raises(ValueError, match=r"checkpoint .*ckpt has vocab_size 300 .*pass the model's tokenizer"):
        model_tokenizer(str(tmp_path / "ckpt"), None, None)
    assert model_tokenizer(None, "tiny", None).vocab_size == 512  # the preset made for the byte tokenizer
