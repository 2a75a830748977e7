"""Signals to the pipeline, and around its pieces: the pipeline forwards SIGTERM / SIGINT to the
stage it runs and exits 128 + signal; SFT logs its real and its target tokens under their own names;
the quickstart stage configs write outside the pipeline's folder. (Rejection sampling counting and
printing every sample and prompt it drops: tests/test_drops.py.)"""

import json
from pathlib import Path

import pytest
from test_train import QUICK, in_process, read_metrics

from llama_posttrain.llama.chat import ChatFormat
from llama_posttrain.llama.tokenizer import load_tokenizer

ROOT = Path(__file__).parent.parent
CHAT = ChatFormat(load_tokenizer())


# ------------------------------------------------------------------ SFT: real tokens and target tokens


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_sft_logs_real_tokens_and_target_tokens_counted_from_the_dialogs(tmp_path, one_rank, mask_prompt):
    """One step = the whole (12-dialog) file, so the step's counts are the file's: every token of each
    encoded dialog, and its assistant tokens (with mask_prompt false, every token but the first)."""
    lines = (QUICK / "data" / "sft_train.jsonl").read_text().splitlines()[:12]
    (tmp_path / "sft.jsonl").write_text("\n".join(lines) + "\n")
    encoded = [CHAT.encode_dialog(json.loads(line)["messages"]) for line in lines]
    tokens = sum(len(e.tokens) for e in encoded)
    targets = sum(map(sum, (e.is_target for e in encoded))) if mask_prompt else tokens - len(encoded)
    assert targets < tokens
    in_process("sft", [
        "--config", str(QUICK / "sft.yaml"), f"train.run_dir={tmp_path / 'run'}", "logging.progress=false",
        f"data.train={tmp_path / 'sft.jsonl'}", "data.eval=null", "data.batch_size=12",
        "data.tokens_per_microbatch=128", "train.steps=2", "train.save_every=0", f"sft.mask_prompt={mask_prompt}",
    ])  # fmt: skip
    logged = read_metrics(tmp_path / "run")
    assert [m["step"] for m in logged] == [1, 2]
    for m in logged:
        assert m["tokens"] == tokens  # every real token of the step (the loss's count once overwrote it)
        assert m["target_tokens"] == targets
        # the rates share the step time: their ratio is the counts'
        assert m["tokens_per_s"] / m["target_tokens_per_s"] == pytest.approx(tokens / targets, rel=1e-6)
        assert m["tokens_per_s_per_gpu"] == pytest.approx(m["tokens_per_s"], rel=1e-6)  # 1 rank
        assert m["target_tokens_per_s_per_gpu"] == pytest.approx(m["target_tokens_per_s"], rel=1e-6)


def test_a_loss_sum_named_like_the_loops_own_is_refused():
    import torch

    from llama_posttrain.train.loop import _add

    class MB:
        doc_ids = torch.tensor([[0, 0, -1]])

    acc = {}
    _add(acc, torch.tensor(1.0), {"target_tokens": torch.tensor(2)}, MB())
    assert acc["tokens"].item() == 2 and acc["target_tokens"].item() == 2
    with pytest.raises(ValueError, match=r"sums \['tokens'\] would overwrite the loop's own"):
        _add(acc, torch.tensor(1.0), {"tokens": torch.tensor(2)}, MB())


# ------------------------------------------------------------------ the README's commands, separate folders


def _stage_run(kind: str) -> None:
    """The README's stage command (torchrun ... llama_posttrain/train/sft.py --config experiments/quickstart/sft.yaml),
    in-process for 1 step in the current folder: its run folder is the config's own."""
    from llama_posttrain.train.lifecycle import StopSignal

    in_process(kind, [
        "--config", str(QUICK / f"{kind}.yaml"), "logging.progress=false", "data.eval=null", "train.steps=1",
        "train.save_every=0",
    ])  # fmt: skip
    assert StopSignal.received is None


def test_the_readme_stage_command_and_the_pipeline_use_separate_folders(tmp_path, one_rank, monkeypatch):
    import torch.distributed as dist

    from llama_posttrain.driver.pipeline import Pipeline
    from llama_posttrain.driver.pipeline_config import load_pipeline_config

    pipeline_yaml = str(QUICK / "pipeline.yaml")
    for order in ("stage first", "pipeline first"):
        work = tmp_path / order.replace(" ", "_")
        (work / "experiments").mkdir(parents=True)
        (work / "experiments" / "quickstart").symlink_to(QUICK)  # the configs' relative data paths
        monkeypatch.chdir(work)
        if order == "pipeline first":
            Pipeline(load_pipeline_config(pipeline_yaml)).check_run_folder()  # records its config
        _stage_run("sft")
        dist.destroy_process_group()
        pipeline = work / "runs" / "quickstart"
        stage = work / yaml_of("sft")["train"]["run_dir"]
        assert (stage / "model" / "config.json").is_file()
        Pipeline(load_pipeline_config(pipeline_yaml)).check_run_folder()  # neither order makes the pipeline refuse
        assert not stage.resolve().is_relative_to(pipeline.resolve()), "the stage run wrote inside the pipeline's"
        assert sorted(p.name for p in pipeline.iterdir()) == ["pipeline.yaml", "run.lock", "stage_configs.yaml"]


def yaml_of(kind: str) -> dict:
    import yaml

    return yaml.safe_load((QUICK / f"{kind}.yaml").read_text())


def test_every_pipeline_config_keeps_its_stage_configs_run_folders_outside_its_own():
    from llama_posttrain.driver.pipeline_config import PipelineConfig

    pipelines = sorted((ROOT / "experiments").glob("*/pipeline.yaml"))
    assert len(pipelines) >= 3
    for path in pipelines:  # read as YAML: a config's base checkpoint need not exist here
        raw, default = yaml_of_file(path), PipelineConfig()
        own = Path(raw.get("root", default.root)) / raw["name"]
        configs = raw.get("configs", default.configs)
        stage_dirs = [Path(yaml_of_file(ROOT / f)["train"]["run_dir"]) for f in configs.values()]
        assert len(set(stage_dirs)) == len(stage_dirs), f"{path}: two stage configs share a run folder"
        for d in stage_dirs:
            assert not d.is_relative_to(own) and not own.is_relative_to(d), f"{path}: {d} and {own} overlap"


def yaml_of_file(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_a_stage_configs_own_run_folder_may_change_under_a_recorded_pipeline(tmp_path, capsys):
    """The pipeline sets every stage run's train.run_dir (and logging.progress): a folder recorded with the
    stage configs' old run_dir (runs/quickstart/sft) continues with the new one; other keys are refused."""
    import yaml
    from test_pipeline import _micro

    from llama_posttrain.driver.pipeline import Pipeline
    from llama_posttrain.driver.pipeline_config import PipelineError, load_pipeline_config

    for kind in ("rm", "sft", "dpo"):  # the stage configs as they were when the folder was made
        old = yaml_of(kind)
        old["train"]["run_dir"] = f"runs/quickstart/{kind}"
        (tmp_path / f"{kind}.yaml").write_text(yaml.safe_dump(old))
    Pipeline(load_pipeline_config(_micro(tmp_path))).check_run_folder()
    run = tmp_path / "runs" / "micro"
    record = {p: p.read_bytes() for p in run.iterdir()}
    (run / "round_0" / "data").mkdir(parents=True)  # results made with that config
    (run / "round_0" / "data" / "DONE").write_text("{}")
    for kind in ("rm", "sft", "dpo"):  # today's files
        (tmp_path / f"{kind}.yaml").write_text((QUICK / f"{kind}.yaml").read_text())
    sft = yaml_of("sft")
    sft["logging"]["progress"] = True
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    Pipeline(load_pipeline_config(_micro(tmp_path))).check_run_folder()
    out = capsys.readouterr().out
    assert "changed (no stage's result depends on them); the record is kept" in out
    for key in ("rm.train.run_dir", "sft.train.run_dir", "dpo.train.run_dir", "sft.logging.progress"):
        assert f"stage_configs.{key}" in out
    assert {p: p.read_bytes() for p in record} == record, "the record was rewritten"

    del sft["train"]  # run_dir and the keys that matter: those are refused
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    kept = r"\{'eval_every': 50, 'save_every': 50, 'steps': 150\}"  # run_dir aside
    with pytest.raises(PipelineError, match=rf"differing:\n  stage_configs.sft.train: {kept} there, '<absent>' now\n"):
        Pipeline(load_pipeline_config(_micro(tmp_path))).check_run_folder()


# ------------------------------------------------------------------ the pipeline stopped by a signal

FAKE_TORCHRUN = """
import os, signal, subprocess, sys, time
# a stand-in torchrun: a worker in a session of its own (as torchrun starts them), signals forwarded to it
handle = lambda signum, frame: worker.send_signal(signum) if sys.argv[3] == "forward" else None
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, handle)
worker = subprocess.Popen([sys.executable, "-c", sys.argv[2], sys.argv[1] + ".ready", sys.argv[4]], start_new_session=True)
while not os.path.exists(sys.argv[1] + ".ready"):  # its handlers are in place
    time.sleep(0.01)
open(sys.argv[1] + ".tmp", "w").write(f"{os.getpid()} {worker.pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
sys.exit(1 if worker.wait() else 0)
"""
FAKE_WORKER = """
import signal, sys, time
from llama_posttrain.train.lifecycle import write_result
got = []
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda signum, frame: got.append(signum))
open(sys.argv[1], "w").close()
while not got:  # training
    time.sleep(0.01)
time.sleep(0.3)  # saving
write_result(sys.argv[2], 7, got[0])  # the run folder's result file: what the launcher reads
print(f"{signal.Signals(got[0]).name}: saved step 7; signals received: {len(got)}", flush=True)
sys.exit(128 + got[0])
"""
STUBBORN_WORKER = """
import signal, sys, time
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, signal.SIG_IGN)
open(sys.argv[1], "w").close()
while True:
    time.sleep(0.01)
"""


@pytest.fixture
def signal_guard():
    """The test process's own SIGTERM / SIGINT / SIGHUP handlers while a test signals it: should the pipeline
    not handle them (a regression), they are recorded here instead of ending pytest."""
    import signal

    got = []
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in signums}
    yield got
    for s, handler in previous.items():
        signal.signal(s, handler)


def _alive(pid: int) -> bool:
    """Running, not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _pipeline_with_a_fake_torchrun(tmp_path, monkeypatch, worker: str, forward: bool = True):
    import sys

    from test_pipeline import _micro

    from llama_posttrain.driver.launch import Job, Launcher
    from llama_posttrain.driver.pipeline import Pipeline
    from llama_posttrain.driver.pipeline_config import load_pipeline_config

    (tmp_path / "torchrun.py").write_text(FAKE_TORCHRUN)
    pids = tmp_path / "pids"
    cmd = [sys.executable, str(tmp_path / "torchrun.py"), str(pids), worker, "forward" if forward else "ignore"]
    monkeypatch.setattr(Launcher, "command", lambda self, job, rdzv_id=None: [*cmd, str(job.run_dir)])
    pipe = Pipeline(load_pipeline_config(_micro(tmp_path)))

    def train_stage(d, k):
        job = Job("[round 1] sft", "llama_posttrain/train/sft.py", [], d / "variant_0.log", 1, run_dir=d / "variant_0")
        pipe.launcher.run(job)
        return {}

    return pipe, train_stage, pids


def _signal_once_up(pids: Path, *signums) -> None:
    """From another thread: once the fake torchrun and its worker are up, send the pipeline (this process)
    each signal, 0.3 s apart."""
    import os
    import threading
    import time

    def send():
        deadline = time.time() + 60
        while not pids.exists() and time.time() < deadline:
            time.sleep(0.01)
        for signum in signums:
            os.kill(os.getpid(), signum)
            time.sleep(0.3)

    threading.Thread(target=send, daemon=True).start()


@pytest.mark.parametrize("sent, forwarded", [("SIGTERM", "SIGTERM"), ("SIGINT", "SIGINT"), ("SIGHUP", "SIGTERM")])
def test_a_signal_while_a_stage_trains_is_forwarded_and_the_pipeline_stops_after_the_save(
    tmp_path, monkeypatch, signal_guard, sent, forwarded
):
    """SIGTERM (a scheduler), Ctrl-C, a closed terminal (SIGHUP, forwarded as the SIGTERM training saves on)."""
    import signal

    from llama_posttrain.driver.launch import PipelineInterrupted

    pipe, train_stage, pids = _pipeline_with_a_fake_torchrun(tmp_path, monkeypatch, FAKE_WORKER)
    before = signal.getsignal(signal.SIGTERM)
    _signal_once_up(pids, signal.Signals[sent])
    with pytest.raises(PipelineInterrupted) as stopped, pipe.signals:
        pipe.recipe.stage(1, "sft", train_stage)
    torchrun, worker = map(int, pids.read_text().split())
    assert stopped.value.signum == signal.Signals[sent]  # main exits 128 + it
    run_dir = pipe.dir / "round_1" / "sft" / "variant_0"
    assert str(stopped.value) == (
        f"{sent}: stopped in [round 1] sft (llama_posttrain/train/sft.py saved step 7 in {run_dir}); rerun the same command to "
        "resume (finished stages are skipped, an interrupted training run resumes from its checkpoints)"
    )
    log = (pipe.dir / "round_1" / "sft" / "variant_0.log").read_text()
    assert f"{forwarded}: saved step 7; signals received: 1" in log  # forwarded once, the save waited for
    assert not _alive(torchrun) and not _alive(worker)
    assert not (pipe.dir / "round_1" / "sft" / "DONE").exists() and not signal_guard
    assert signal.getsignal(signal.SIGTERM) is before  # the pipeline's handlers are gone with it


def test_a_second_signal_kills_the_stages_torchrun_and_its_workers(tmp_path, monkeypatch, signal_guard):
    import signal

    from llama_posttrain.driver.launch import PipelineInterrupted

    pipe, train_stage, pids = _pipeline_with_a_fake_torchrun(tmp_path, monkeypatch, STUBBORN_WORKER, forward=False)
    _signal_once_up(pids, signal.SIGINT, signal.SIGINT)  # Ctrl-C, then Ctrl-C again: do not wait for the save
    with pytest.raises(
        PipelineInterrupted,
        match=r"^SIGINT: stopped in \[round 1\] sft \(llama_posttrain/train/sft.py killed by a second",
    ):
        with pipe.signals:
            pipe.recipe.stage(1, "sft", train_stage)
    torchrun, worker = map(int, pids.read_text().split())
    for _ in range(100):  # the worker, orphaned by its killed torchrun, is reaped by init
        if not _alive(worker):
            break
        import time

        time.sleep(0.02)
    assert not _alive(torchrun) and not _alive(worker)


def test_a_signal_during_the_pipelines_own_work_exits_128_plus_it_without_a_done_marker(
    tmp_path, monkeypatch, capsys, signal_guard
):
    import os
    import signal
    import time

    from test_pipeline import _micro

    from llama_posttrain.driver.pipeline import main
    from llama_posttrain.driver.recipe import Recipe

    def make_data(self, d, k):
        (d / "seed_pairs.jsonl").write_text("half a file")
        os.kill(os.getpid(), signal.SIGTERM)  # in the middle of the stage's work
        time.sleep(30)
        return {}

    monkeypatch.setattr(Recipe, "make_data", make_data)
    t0 = time.time()
    with pytest.raises(SystemExit) as exit_:
        main(["--config", _micro(tmp_path)])
    assert not signal_guard, "the pipeline did not handle the signal"
    assert exit_.value.code == 128 + signal.SIGTERM and time.time() - t0 < 20
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("pipeline: SIGTERM: stopped in [round 0] data; rerun the same command to resume")
    run = tmp_path / "runs" / "micro"
    assert not (run / "round_0" / "data" / "DONE").exists() and (run / "pipeline.yaml").is_file()


@pytest.mark.slow
@pytest.mark.long
def test_sigterm_to_the_pipeline_mid_training_saves_leaves_no_process_and_a_rerun_resumes(tmp_path):
    """The real thing: the pipeline's pre-training stage under torchrun, SIGTERM to the pipeline alone (as a
    scheduler sends it): exit 143, torchrun and its worker gone, the stage's last finished step saved, and
    the same command resumes from it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from test_pipeline import MICRO
    from test_train import process_tree

    steps = 40
    pretrain = {"train.steps": steps, "data.batch_size": 32, "train.save_every": 0, "optim.lr": 1.0e-2}
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump({**MICRO, "root": str(tmp_path / "runs"), "rounds": 0, "pretrain": pretrain}))
    cmd = [sys.executable, str(ROOT / "llama_posttrain" / "driver" / "pipeline.py"), "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stage = tmp_path / "runs" / "micro" / "round_0" / "pretrain"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while max([m["step"] for m in read_metrics(stage / "variant_0") if "loss" in m], default=0) < 3:  # training
        assert proc.poll() is None and time.time() < deadline, "the pipeline ended before pre-training"
        time.sleep(0.05)
    tree = process_tree(proc.pid)
    assert len(tree) >= 3, tree  # the pipeline, torchrun, its worker
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith(
        "pipeline: SIGTERM: stopped in [round 0] pretrain (llama_posttrain/train/sft.py saved step "
    ), err[-3000:]
    saved = int(line.split("saved step ")[1].split()[0])
    assert 3 <= saved < steps and (stage / "variant_0" / "checkpoints" / f"step_{saved:08d}").is_dir()
    time.sleep(0.5)
    left = [pid for pid in tree if Path(f"/proc/{pid}").exists()]
    assert not left, f"left running: {left}"
    assert not (stage / "DONE").exists()

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = (stage / "variant_0.log").read_text()
    assert f"step_{saved:08d} (step {saved})" in log.rpartition("=== pipeline: ")[2]  # resumed, not restarted
    assert [m["step"] for m in read_metrics(stage / "variant_0") if "loss" in m] == list(range(1, steps + 1))
    assert (stage / "DONE").is_file() and "[round 0] data: done before, skipped" in rerun.stdout
