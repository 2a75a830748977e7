"""Reliability round 2, the run folder: restart deletes only what this project wrote, one process per
folder (the lock), train.steps below the checkpoint, changed data on resume, a stray file among the
checkpoints, a full disk, a foreign model folder found at start, an override named in its error."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from test_reliability_train import fresh_group, read_metrics, sft_argv
from test_train import QUICK, ROOT, in_process

from llama_posttrain.train import run_lock, train_state
from llama_posttrain.train.lifecycle import main_guard


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------------ restart


def test_restart_refuses_a_folder_no_run_of_ours_recorded(tmp_path, one_rank):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "notes.md").write_text("my notes")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"holds model, metrics.jsonl but no config.yaml .* refusing to delete"):
        in_process("sft", sft_argv(tmp_path, "train.steps=1", "train.resume=restart"))
    assert files_under(tmp_path) == ["metrics.jsonl", "model/notes.md", "run.lock"]


def test_restart_never_deletes_what_the_new_run_reads(tmp_path, one_rank):
    run = tmp_path / "run"
    in_process("sft", sft_argv(run, "train.steps=1"))
    fresh_group()
    before = files_under(run / "model")
    argv = sft_argv(
        run, "train.steps=1", "train.resume=restart", f"model.checkpoint={run / 'model'}", "model.preset=null"
    )
    with pytest.raises(ValueError, match=r"would delete .*model/config.json, which this run reads \(model.checkpoint"):
        in_process("sft", argv)
    assert files_under(run / "model") == before and (run / "config.yaml").is_file()


def test_restart_deletes_only_our_files_and_lists_them(tmp_path, one_rank, capsys):
    in_process("sft", sft_argv(tmp_path, "train.steps=2", "train.save_every=1"))
    fresh_group()
    (tmp_path / "model" / "notes.md").write_text("mine")
    (tmp_path / "checkpoints" / "README").write_text("mine too")
    (tmp_path / "results.csv").write_text("a,b")
    capsys.readouterr()
    in_process("sft", sft_argv(tmp_path, "train.steps=1", "train.resume=restart"))
    fresh_group()
    out = capsys.readouterr().out
    for deleted in ("metrics.jsonl", "config.yaml", "data.json", "checkpoints/step_00000001/", "model/config.json"):
        assert f"  deleted {deleted}\n" in out, out
    assert "  kept model/notes.md (not written by this project)" in out
    assert "  kept checkpoints/README (not written by this project)" in out
    assert (tmp_path / "model" / "notes.md").read_text() == "mine"
    assert (tmp_path / "checkpoints" / "README").read_text() == "mine too"
    assert (tmp_path / "results.csv").read_text() == "a,b"
    assert [p.name for p in train_state.list_checkpoints(tmp_path)] == ["step_00000001"]
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]


# ------------------------------------------------------------------------------------------------ the lock

HOLD = "import sys, time; from llama_posttrain.train import run_lock; run_lock.hold(sys.argv[1], 'holder'); print('held', flush=True); time.sleep(60)"


def hold_in_a_child(folder):
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ},
    )  # fmt: skip
    assert child.stdout.readline() == "held\n"
    return child


def test_a_second_run_on_a_held_folder_is_refused_naming_the_holder(tmp_path, one_rank, capsys):
    child = hold_in_a_child(tmp_path)
    try:
        with pytest.raises(ValueError, match=rf"is in use by pid {child.pid} on host .* \(holder\)"):
            in_process("sft", sft_argv(tmp_path, "train.steps=1"))
        assert not (tmp_path / "config.yaml").exists()  # refused before anything was written
    finally:
        child.kill()  # kill -9: the lock's content stays, the kernel drops the flock
        child.wait()
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == child.pid
    in_process("sft", sft_argv(tmp_path, "train.steps=1"))
    err = capsys.readouterr().err
    assert f"taking over the lock of pid {child.pid}" in err and "not running" in err
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]


def test_a_finished_run_releases_its_folder(tmp_path):
    """The lock file is emptied at exit; a second run then starts without a takeover message."""
    cmd = [sys.executable, str(ROOT / "llama_posttrain" / "train" / "sft.py"), *sft_argv(tmp_path, "train.steps=1")]
    env = {**os.environ, "MASTER_PORT": str(29500 + os.getpid() % 400)}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run.lock").read_text() == ""
    held = run_lock.hold(tmp_path)
    assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    held.release()


def test_a_lock_from_another_host_is_refused_until_stale(tmp_path, capsys):
    lock = tmp_path / "run.lock"
    lock.write_text(
        json.dumps({"pid": 1234, "host": "node-b", "since": time.time(), "command": "llama_posttrain/train/dpo.py"})
    )
    with pytest.raises(run_lock.FolderInUse, match=r"pid 1234 on host node-b .*refreshed \d+ s ago from another host"):
        run_lock.hold(tmp_path)
    old = time.time() - run_lock.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    held = run_lock.hold(tmp_path)
    assert "taking over the lock of pid 1234 on host node-b" in capsys.readouterr().err
    held.release()


def test_the_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    held = run_lock.hold(tmp_path)
    old = time.time() - 1000
    os.utime(tmp_path / "run.lock", (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / "run.lock").stat().st_mtime < 5
    held.release()


# ------------------------------------------------------------------------------------------------ resume


def test_lower_steps_than_the_checkpoint_is_refused(tmp_path, one_rank):
    in_process("sft", sft_argv(tmp_path, "train.steps=4", "train.save_every=2", "train.keep_last=0"))
    fresh_group()
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"train.steps=2 is below the step of the checkpoint .*step 4"):
        in_process("sft", sft_argv(tmp_path, "train.steps=2", "train.save_every=2", "train.keep_last=0"))
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == before
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics


def test_a_run_saved_before_a_config_key_existed_resumes_at_its_default(tmp_path, one_rank):
    """A key added to the code since the run was saved (optim.fused, train.shape_buckets) reads as its
    default in the saved config: the resume goes on; a value other than the default is refused."""
    import yaml

    in_process("sft", sft_argv(tmp_path, "train.steps=2"))
    fresh_group()
    record = tmp_path / "config.yaml"
    saved = yaml.safe_load(record.read_text())
    del saved["optim"]["fused"], saved["train"]["shape_buckets"]  # as an older version wrote it
    record.write_text(yaml.safe_dump(saved))
    with pytest.raises(
        ValueError,
        match=r"train.shape_buckets: 'auto' \(saved\) -> 64 \(now\)",
    ):
        in_process("sft", sft_argv(tmp_path, "train.steps=3", "train.shape_buckets=64"))
    fresh_group()
    in_process("sft", sft_argv(tmp_path, "train.steps=3", "logging.log_every=1"))
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]


def test_changed_data_on_resume_is_refused_naming_the_file(tmp_path, one_rank):
    data = tmp_path / "train.jsonl"
    shutil.copy(QUICK / "data" / "sft_train.jsonl", data)
    run = tmp_path / "run"
    in_process("sft", sft_argv(run, "train.steps=2", f"data.train={data}"))
    fresh_group()
    lines = data.read_text().splitlines()
    record = json.loads(lines[0])
    record["messages"][-1]["content"] = record["messages"][-1]["content"][::-1] + "9"
    data.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=rf"(?s)trained on other data.*train: {data}: sha256 \w+\.\.\. \(saved\)"):
        in_process("sft", sft_argv(run, "train.steps=4", f"data.train={data}"))
    fresh_group()
    data.write_text("\n".join(lines) + "\n")  # the original content back: the resume goes on
    in_process("sft", sft_argv(run, "train.steps=3", f"data.train={data}", "logging.log_every=1"))
    assert [m["step"] for m in read_metrics(run)] == [1, 2, 3]


def test_a_stray_tmp_file_among_the_checkpoints_is_left_alone(tmp_path, one_rank):
    (tmp_path / "checkpoints").mkdir(parents=True)
    (tmp_path / "checkpoints" / "notes.tmp").write_text("mine")
    in_process("sft", sft_argv(tmp_path, "train.steps=2", "train.save_every=1"))
    assert (tmp_path / "checkpoints" / "notes.tmp").read_text() == "mine"
    assert [p.name for p in train_state.list_checkpoints(tmp_path)] == ["step_00000001", "step_00000002"]


def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, one_rank, monkeypatch, capsys):
    real_save, calls = train_state.dcp.save, []

    def full_disk(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(train_state.dcp, "save", full_disk)
    with pytest.raises(SystemExit) as stopped:
        main_guard(lambda: in_process("sft", sft_argv(tmp_path, "train.steps=3", "train.save_every=1")))
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    tmp = tmp_path / "checkpoints" / "step_00000002.tmp"
    assert f"error: [Errno 28] the disk holding {tmp} is full (No space left on device)" in err
    assert "Traceback" not in err and not tmp.exists()
    assert [p.name for p in train_state.list_checkpoints(tmp_path)] == ["step_00000001"]


# ------------------------------------------------------------------------------------------------ at start


def test_a_foreign_model_folder_is_refused_before_training(tmp_path, one_rank):
    (tmp_path / "model").mkdir(parents=True)
    (tmp_path / "model" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match=r"train.run_dir: the run's export would fail: refusing to write .*model"):
        in_process("sft", sft_argv(tmp_path, "train.steps=1"))
    assert not (tmp_path / "metrics.jsonl").exists()
    fresh_group()
    (tmp_path / "model" / "config.json").unlink()  # a user's tokenizer files that the export would replace
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    with pytest.raises(ValueError, match=r"the run's export would fail: .*tokenizer_config.json"):
        in_process("sft", sft_argv(tmp_path, "train.steps=1"))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_an_override_is_named_in_its_error(tmp_path):
    from llama_posttrain.train.config import load_config
    from llama_posttrain.train.sft import SFTConfig

    with pytest.raises(ValueError, match=r"^override 'model.chat_template=llama3.3': model.chat_template must be"):
        load_config(SFTConfig, str(QUICK / "sft.yaml"), ["model.chat_template=llama3.3"])
    config = tmp_path / "sft.yaml"  # the file's own bad value is still blamed on the file
    config.write_text((QUICK / "sft.yaml").read_text().replace("preset: tiny", "preset: tiny\n  chat_template: x"))
    with pytest.raises(ValueError, match=rf"^{config}: model.chat_template must be"):
        load_config(SFTConfig, str(config), ["model.preset=tiny"])


def test_a_second_pipeline_on_a_held_folder_is_refused_naming_the_holder(tmp_path):
    from llama_posttrain.train.pipeline import Pipeline, PipelineError, load_pipeline_config

    child = hold_in_a_child(tmp_path / "quick")
    try:
        cfg = load_pipeline_config(None, [f"root={tmp_path}", "name=quick"])
        with pytest.raises(PipelineError, match=rf"quick is in use by pid {child.pid} on host .* \(holder\)"):
            Pipeline(cfg).run()
        assert sorted(p.name for p in (tmp_path / "quick").iterdir()) == ["run.lock"]
    finally:
        child.kill()
        child.wait()


def test_rerunning_a_finished_run_changes_nothing_but_the_export(tmp_path, one_rank, capsys):
    argv = sft_argv(tmp_path, "train.steps=2", f"data.eval={QUICK / 'data' / 'sft_eval.jsonl'}")
    in_process("sft", argv)
    fresh_group()
    ckpt = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    (tmp_path / "model" / "model.safetensors").unlink()  # as if killed while exporting
    in_process("sft", argv)
    assert "trained to step 2 before; nothing to train, exporting the model" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == ckpt
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics  # no second final eval line
    assert (tmp_path / "model" / "model.safetensors").is_file()
