"""The run folder of a training run (llama_posttrain/train/run_folder.py, run_lock.py, train_state.py): restart
deletes only what this project wrote and keeps every path a config names; one process per folder (the lock; a
holder whose lock was deleted or replaced stops before writing); a recorded run is never replaced by another
config, checkpoints or not; train.steps below the checkpoint, changed data on resume, a stray file among the
checkpoints; a full disk (checkpoint, export) names the path and keeps the previous files; a foreign model
folder found at start; nothing unpickled from a folder not verified as ours; a checkpoint of another world
size named as such; an override named in its error."""

import dataclasses
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
import typing

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from test_train import QUICK, ROOT, in_process
from test_training_faults import fresh_group, read_metrics, sft_argv

from llama_posttrain.llama.formats import native
from llama_posttrain.llama.formats.dcp_metadata import SafeReader
from llama_posttrain.train import loop, run_folder, run_lock, train_state
from llama_posttrain.train.config import load_config
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
    real_save, calls = dcp.save, []

    def full_disk(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", full_disk)
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
    from llama_posttrain.driver.pipeline import Pipeline
    from llama_posttrain.driver.pipeline_config import PipelineError, load_pipeline_config

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


def snapshot(folder):
    return {f: (folder / f).read_bytes() for f in files_under(folder) if f != "run.lock"}


# --------------------------------------------------------------------- a recorded run is never reused by another config


def test_auto_never_replaces_a_recorded_run_whose_checkpoints_are_gone(tmp_path, one_rank, capsys):
    in_process("sft", sft_argv(tmp_path, "train.steps=2"))
    fresh_group()
    shutil.rmtree(tmp_path / "checkpoints")  # to free disk: the run's model/, metrics, record stay
    before = snapshot(tmp_path)
    record = yaml.safe_load((tmp_path / "config.yaml").read_text())
    for change, key, now in (("optim.lr=0.01", "optim.lr", 0.01), ("train.steps=3", "train.steps", 3)):
        saved = record[key.split(".")[0]][key.split(".")[1]]
        steps = [] if key == "train.steps" else ["train.steps=2"]
        with pytest.raises(ValueError, match=r"different config; it has no checkpoint to resume") as refused:
            in_process("sft", sft_argv(tmp_path, *steps, change))
        assert f"  {key}: {saved!r} (saved) -> {now!r} (now)" in str(refused.value)
        fresh_group()
        assert snapshot(tmp_path) == before
    in_process("sft", sft_argv(tmp_path, "train.steps=2", "logging.log_every=1"))  # the same config: said, then done
    out = capsys.readouterr().out
    assert "config.yaml records this config but no checkpoint is left to resume: training it again from step 0" in out
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2]


def test_auto_refuses_a_config_yaml_not_ours_and_run_files_without_one(tmp_path, one_rank):
    (tmp_path / "config.yaml").write_text("experiment: mine\nlr: 3\n")
    with pytest.raises(ValueError, match=r"config.yaml is not a config this project recorded"):
        in_process("sft", sft_argv(tmp_path, "train.steps=1"))
    assert (tmp_path / "config.yaml").read_text() == "experiment: mine\nlr: 3\n"
    fresh_group()
    (tmp_path / "config.yaml").unlink()
    (tmp_path / "metrics.jsonl").write_text('{"step": 7}\n')
    with pytest.raises(ValueError, match=r"holds metrics.jsonl but no config.yaml: not a run folder this code wrote"):
        in_process("sft", sft_argv(tmp_path, "train.steps=1"))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 7}\n'


def test_a_restart_killed_midway_leaves_the_folder_recorded(tmp_path):
    """config.yaml is deleted last: a restart killed while deleting can be rerun (restart needs the record)."""
    for name in ("config.yaml", "metrics.jsonl", "data.json", "wandb_id", "model/model.safetensors"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)
    delete, _ = run_folder.previous_run_files(tmp_path)
    assert len(delete) == 6 and delete[-1] == tmp_path / "config.yaml"


# ------------------------------------------------------------------------------ restart keeps every path a config names


def test_restart_keeps_the_dpo_reference_inside_the_run_folder(tmp_path, one_rank):
    run = tmp_path / "run"
    dpo = ["--config", str(QUICK / "dpo.yaml"), "logging.progress=false", "data.eval=null", "train.save_every=0"]
    in_process("dpo", [*dpo, f"train.run_dir={run}", "train.steps=1"])
    fresh_group()
    before = snapshot(run)
    argv = [*dpo, f"train.run_dir={run}", "train.steps=1", "train.resume=restart"]
    with pytest.raises(ValueError, match=r"would delete .*model/.*, which this run reads \(dpo.reference_checkpoint"):
        in_process("dpo", [*argv, f"dpo.reference_checkpoint={run / 'model'}"])
    assert snapshot(run) == before


def str_fields(cls, prefix=""):
    """Dotted names of every field of a config dataclass (nested sections) that may hold a str, Literals aside."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from str_fields(tp, key + ".")
        elif str in typing.get_args(tp) or tp is str:
            yield key


@pytest.mark.parametrize("entry", ["sft", "dpo", "rm"])
def test_every_str_field_of_every_config_is_an_input_restart_keeps(entry, tmp_path):
    """The class, not the reproduction: any field that can name a path (today's and those added later)."""
    import importlib

    module = importlib.import_module(f"llama_posttrain.train.{entry}")
    cls = next(v for v in vars(module).values() if isinstance(v, type) and v.__name__ == f"{entry.upper()}Config")
    keys = [k for k in str_fields(cls) if k != "train.run_dir"]
    assert "model.checkpoint" in keys and "data.eval" in keys
    for i, key in enumerate(keys):
        cfg = cls()
        cfg.train.run_dir = str(tmp_path / "run")
        target = tmp_path / f"input{i}"
        target.write_text("x")
        section, name = key.rsplit(".", 1)
        obj = cfg
        for part in section.split("."):
            obj = getattr(obj, part)
        setattr(obj, name, str(target))
        assert run_folder._inputs(cfg).get(key) == target.resolve(), key


# --------------------------------------------------------------------------------------- the lock taken from its holder


def test_a_holder_whose_lock_was_deleted_replaced_or_overwritten_stops(tmp_path):
    held = run_lock.hold(tmp_path)
    run_lock.check(tmp_path, "x")  # intact: nothing
    (tmp_path / "run.lock").unlink()
    with pytest.raises(run_lock.LockLost, match=r"run.lock was deleted while this run .* stops before writing x"):
        run_lock.check(tmp_path, "x")
    child = hold_in_a_child(tmp_path)  # a second run: a new file, locked
    try:
        with pytest.raises(run_lock.LockLost, match=rf"was replaced by another file .*now names pid {child.pid} "):
            run_lock.check(tmp_path, "x")
    finally:
        child.kill()
        child.wait()
    held.release()
    held = run_lock.hold(tmp_path)
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "h"}))  # same file, another name in it
    with pytest.raises(run_lock.LockLost, match=r"was overwritten"):
        run_lock.check(tmp_path, "x")
    held.release()


def test_a_run_whose_lock_is_taken_by_a_second_run_stops_before_saving(tmp_path, one_rank, monkeypatch, capsys):
    real_step, children = loop.Trainer.train_step, []

    def step_then_lose_the_lock(self, batch, step, timed=None):
        metrics = real_step(self, batch, step, timed)
        if step == 1:  # `rm run.lock`, then a second run starts in the folder
            (tmp_path / "run.lock").unlink()
            children.append(hold_in_a_child(tmp_path))
        return metrics

    monkeypatch.setattr(loop.Trainer, "train_step", step_then_lose_the_lock)
    try:
        with pytest.raises(SystemExit) as stopped:
            main_guard(lambda: in_process("sft", sft_argv(tmp_path, "train.steps=4", "train.save_every=2")))
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert f"was replaced by another file while this run (pid {os.getpid()}) held it (it now names pid" in err
    assert "so this one stops before writing step 1's metrics" in err and "Traceback" not in err
    assert train_state.list_checkpoints(tmp_path) == [] and read_metrics(tmp_path) == []


def test_the_in_use_message_says_how_to_check_the_holder_not_to_delete_the_lock(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live process named in a lock it does not hold (the file was copied, or flock not carried)
        record = {"pid": child.pid, "host": run_lock.HOST, "since": 0, "command": "sft"}
        (tmp_path / "run.lock").write_text(json.dumps(record))
        with pytest.raises(run_lock.FolderInUse) as refused:
            run_lock.hold(tmp_path)
    finally:
        child.kill()
        child.wait()
    message = str(refused.value)
    assert f"ps -o pid,lstart,args -p {child.pid}" in message and "Do not delete" in message
    assert "delete" not in message.replace("Do not delete", "")


# ------------------------------------------------------------------------------ nothing unpickled from a foreign folder


def plant_checkpoint(run_dir, marker):
    """A checkpoint whose .metadata runs a command when unpickled (it creates `marker`)."""

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    step = run_dir / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(pickle.dumps(Planted()))
    torch.save({"step": 1}, step / "extra_rank0.pt")


def test_no_metadata_is_unpickled_before_the_folder_is_verified_as_ours(tmp_path, one_rank):
    marker = tmp_path / "ran"
    run = tmp_path / "run"
    plant_checkpoint(run, marker)
    with pytest.raises(ValueError, match=r"holds checkpoints but no config.yaml: not a run folder this code wrote"):
        in_process("sft", sft_argv(run, "train.steps=2"))
    assert not marker.exists()
    fresh_group()
    other = tmp_path / "other"  # a record of ours, but of another config: refused before any checkpoint is read
    in_process("sft", sft_argv(other, "train.steps=1"))
    fresh_group()
    shutil.copy(other / "config.yaml", run / "config.yaml")
    with pytest.raises(ValueError, match=r"(?s)different config; resuming would mix two runs.*optim.lr"):
        in_process("sft", sft_argv(run, "train.steps=2", "optim.lr=0.01"))
    assert not marker.exists()


def test_a_planted_metadata_in_a_folder_of_ours_is_refused_not_run(tmp_path, one_rank, capsys):
    """Past the record check (a copied folder, a checkpoint swapped in): the metadata's unpickler builds only
    DCP's classes, so the planted command does not run; the checkpoint is named unusable."""
    run, marker = tmp_path / "run", tmp_path / "ran"
    in_process("sft", sft_argv(run, "train.steps=2", "train.save_every=1"))
    fresh_group()
    real = pickle.loads((run / "checkpoints" / "step_00000001" / ".metadata").read_bytes())  # ours: trusted here
    safe = SafeReader(str(run / "checkpoints" / "step_00000001")).read_metadata()
    assert (safe.state_dict_metadata, safe.storage_data) == (real.state_dict_metadata, real.storage_data)
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    shutil.rmtree(run / "checkpoints" / "step_00000001")
    plant_checkpoint(run, marker)
    with pytest.raises(ValueError, match=r"no usable checkpoint"):
        in_process("sft", sft_argv(run, "train.steps=2", "train.save_every=1"))
    assert "is not part of a DCP checkpoint's metadata; refusing to load it" in capsys.readouterr().out
    assert not marker.exists()


def test_the_metadata_reader_refuses_a_dotted_name_through_an_allowed_module(tmp_path):
    """Protocol 4 resolves `module` + `a.b` by attribute: DCP's own filesystem module reaches `os.system`."""
    marker = tmp_path / "ran"
    module, name, arg = b"torch.distributed.checkpoint.filesystem", b"os.system", f"touch {marker}".encode()
    payload = b"\x80\x04\x8c%c%s\x8c%c%s\x93\x8c%c%s\x85R." % (len(module), module, len(name), name, len(arg), arg)
    pickle.loads(payload)  # what pickle.load does with it: the command runs
    assert marker.exists()
    marker.unlink()
    (tmp_path / ".metadata").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=r"filesystem.os.system is not part of a DCP checkpoint"):
        SafeReader(str(tmp_path)).read_metadata()
    assert not marker.exists()


# ---------------------------------------------------------------------------------- unclear messages, dead ends


def test_a_checkpoint_of_another_world_size_is_named_without_a_fallback(tmp_path, one_rank, capsys):
    from llama_posttrain.train.sft import SFTConfig

    in_process("sft", sft_argv(tmp_path, "train.steps=2", "train.save_every=1", "train.keep_last=0"))
    fresh_group()
    capsys.readouterr()
    cfg = load_config(SFTConfig, str(QUICK / "sft.yaml"), sft_argv(tmp_path, "train.steps=3")[2:])
    with pytest.raises(ValueError, match=r"step_00000002 was saved by a run on 1 rank\(s\) .*this run has 2"):
        run_folder._claim(cfg, world_size=2)
    assert "falling back" not in capsys.readouterr().out


def test_a_full_disk_at_export_names_the_path_and_keeps_the_previous_model(tmp_path, one_rank, monkeypatch, capsys):
    from safetensors import SafetensorError

    argv = sft_argv(tmp_path, "train.steps=1")
    in_process("sft", argv)
    fresh_group()
    before = snapshot(tmp_path / "model")

    def full_disk(shard, filename, metadata=None):  # the message safetensors gives on a full tmpfs
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(native, "save_file", full_disk)
    with pytest.raises(SystemExit) as stopped:
        main_guard(lambda: in_process("sft", argv))  # a rerun of a finished run: exports again
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    model = tmp_path / "model"
    assert f"error: [Errno 28] the disk holding {model} is full (No space left on device) while writing the " in err
    assert "the files there before are kept" in err and "Traceback" not in err and "SafetensorError" not in err
    assert snapshot(model) == before  # no temp file left, nothing replaced


def test_a_write_error_inside_safetensors_is_an_oserror_naming_the_file(tmp_path):
    """A real failure of the library (the file size limit: EFBIG, as a full disk is ENOSPC), not a mock."""
    (tmp_path / "model.safetensors").write_bytes(b"previous")
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(OSError) as failed:
            native.write_files(tmp_path, {"w": torch.zeros(100_000)}, {}, 2**30, False, torch.float32, {})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert failed.value.errno == 27 and failed.value.filename == str(tmp_path / "model.safetensors")
    assert files_under(tmp_path) == ["model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == b"previous"
