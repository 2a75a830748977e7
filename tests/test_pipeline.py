"""The round driver: a tiny 1-round pipeline killed mid-stage resumes without redoing finished stages."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

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
