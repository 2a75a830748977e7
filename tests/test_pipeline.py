"""The round driver: a tiny 1-round pipeline killed mid-stage resumes without redoing finished stages."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from train.pipeline import Pipeline, PipelineError, load_pipeline_config

ROOT = Path(__file__).parent.parent

MICRO = {
    "name": "micro", "rounds": 1, "nproc": 1, "preset": "debug", "max_digits": 1, "pretrain_examples": 200,
    "seed_pairs": 64, "rs_prompts": 24, "pref_prompts": 96, "eval_prompts": 10, "k": 4, "max_new_tokens": 6,
    "pretrain": {"train.steps": 60, "data.batch_size": 32, "train.save_every": 30, "optim.lr": 1.0e-2},
    "rm": {"train.steps": 3, "data.batch_size": 16}, "sft": {"train.steps": 3, "data.batch_size": 2},
    "dpo": {"train.steps": 3, "data.batch_size": 1, "dpo.reference": "precompute"},
    "variants": {"dpo": [{"train.seed": 0}, {"train.seed": 1}]},
}  # fmt: skip


def test_killed_pipeline_resumes_without_redoing_stages(tmp_path):
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump({**MICRO, "root": str(tmp_path / "runs")}))
    cmd = [sys.executable, str(ROOT / "train" / "pipeline.py"), "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = tmp_path / "runs" / "micro"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "round_1" / "sft" / "variant_0" / "metrics.jsonl").exists():
        assert proc.poll() is None, "the pipeline ended before the SFT stage"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # in the middle of round 1's SFT training
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in run.glob("round_*/*/DONE")}
    assert {p.parent.name for p in done} == {"data", "pretrain", "rm", "rs"}
    assert not (run / "round_1" / "sft" / "DONE").exists()

    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    for p, mtime in done.items():
        assert p.stat().st_mtime_ns == mtime, f"{p.parent.name} was redone"
        assert f"{p.parent.name}: done before, skipped" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    stages = [(s["round"], s["stage"]) for s in summary["stages"]]
    assert stages == [(0, "data"), (0, "pretrain"), (1, "rm"), (1, "rs"), (1, "sft"), (1, "pref"), (1, "dpo")]
    dpo = summary["stages"][-1]
    assert 0.0 <= dpo["task_accuracy"] <= 1.0 and len(dpo["variants"]) == 2
    assert (run / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "summary.md").read_text().startswith("| round | stage |")


@pytest.mark.parametrize(
    "raw, error",
    [
        ({"rounds": "two"}, r"rounds: expected int, got 'two'"),
        ({"k": 2.5}, r"k: expected int, got 2.5"),
        ({"k": 1}, r"k: must be >= 2, got 1"),
        ({"plots": "yes"}, r"plots: expected bool"),
        ({"rm": ["train.steps=3"]}, r"rm: expected a mapping"),
        ({"variants": {"dpo": {"train.seed": 0}}}, r"variants.dpo: expected a list"),
        ({"variants": {"dpo": [1]}}, r"variants.dpo\[0\]: expected a mapping, got 1"),
        ({"variants": {"ppo": [{}]}}, r"variants: stages are pretrain, rm, sft, dpo"),
        (
            {"configs": {"rm": "nope.yaml", "sft": "experiments/quickstart/sft.yaml", "dpo": "x"}},
            r"configs.dpo: .*main/x is not a file",
        ),
        ({"preset": "huge"}, r"preset: unknown model preset 'huge'"),
    ],
)
def test_config_with_wrong_types_is_refused_naming_file_and_key(tmp_path, raw, error):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(PipelineError, match=rf"^{path}: {error}"):
        load_pipeline_config(str(path))


def test_config_errors_name_the_override_and_stop_before_any_stage(tmp_path, capsys):
    with pytest.raises(PipelineError, match=r"^override 'rm=\{a': not valid YAML"):
        load_pipeline_config(None, ["rm={a"])
    with pytest.raises(PipelineError, match=r"^override 'rounds=two': rounds: expected int"):
        load_pipeline_config(None, ["rounds=two"])
    from train.pipeline import main

    with pytest.raises(SystemExit, match=r"^pipeline: override 'k=2.5': k: expected int"):
        main([f"root={tmp_path / 'runs'}", "k=2.5"])
    assert not (tmp_path / "runs").exists()


def _micro(tmp_path, **kw) -> str:
    stage_configs = {}
    for kind in ("rm", "sft", "dpo"):  # copies, so that the test can change one
        stage_configs[kind] = str(tmp_path / f"{kind}.yaml")
        if not (tmp_path / f"{kind}.yaml").exists():
            (tmp_path / f"{kind}.yaml").write_text((ROOT / "experiments" / "quickstart" / f"{kind}.yaml").read_text())
    path = tmp_path / f"micro_{len(list(tmp_path.glob('micro_*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({**MICRO, "root": str(tmp_path / "runs"), "configs": stage_configs, **kw}))
    return str(path)


def test_a_changed_config_is_refused_and_the_record_never_rewritten(tmp_path, capsys):
    run = tmp_path / "runs" / "micro"
    Pipeline(load_pipeline_config(_micro(tmp_path))).check_run_folder()
    record = {p: p.read_bytes() for p in (run / "pipeline.yaml", run / "stage_configs.yaml")}
    assert yaml.safe_load(record[run / "pipeline.yaml"])["k"] == 4
    (run / "round_0" / "data").mkdir(parents=True)  # results made with that config
    (run / "round_0" / "data" / "DONE").write_text("{}")

    changed = load_pipeline_config(_micro(tmp_path, k=3, rm={**MICRO["rm"], "train.steps": 5}))
    with pytest.raises(
        PipelineError, match=r"(?s)differing:\n  k: 4 there, 3 now\n  rm.train.steps: 3 there, 5 now\n.*new `name`"
    ):
        Pipeline(changed).run()  # refused before any stage
    sft = yaml.safe_load((tmp_path / "sft.yaml").read_text())
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({**sft, "optim": {**sft["optim"], "lr": 1.0e-3}}))
    with pytest.raises(PipelineError, match=r"stage_configs.sft.optim.lr: 0.003 there, 0.001 now"):
        Pipeline(load_pipeline_config(_micro(tmp_path))).check_run_folder()
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))

    Pipeline(load_pipeline_config(_micro(tmp_path, plots=False, rounds=3))).check_run_folder()  # allowed
    assert "rounds, plots changed" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in record} == record, "the record of the folder's config was rewritten"

    (run / "pipeline.yaml").unlink()  # results whose config is unknown: refused too
    with pytest.raises(PipelineError, match=r"holds results \(round_0\) but no pipeline.yaml.*new `name`"):
        Pipeline(load_pipeline_config(_micro(tmp_path))).check_run_folder()


def test_a_failing_stage_prints_its_log_path_and_last_lines(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "train" / "pipeline.py"),
        "--config",
        _micro(tmp_path, pretrain={"train.bogus": 1}),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = tmp_path / "runs" / "micro" / "round_0" / "pretrain" / "variant_0.log"
    assert out.returncode == 1
    assert "pipeline: [round 0] pretrain: train/sft.py failed (exit code 1)" in out.stderr
    assert f"the end of its log {log}\n" in out.stderr
    assert "unknown key train.bogus" in out.stderr and "unknown key train.bogus" in log.read_text()
    assert "CalledProcessError" not in out.stderr
