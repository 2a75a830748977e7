"""The round driver: a tiny 1-round pipeline killed mid-stage resumes without redoing finished stages;
its config checks, the task plug-in, the report's plots."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import kill_9_tree

from llama_posttrain.driver.pipeline import Pipeline
from llama_posttrain.driver.pipeline_config import PipelineError, load_pipeline_config

ROOT = Path(__file__).parent.parent

MICRO = {
    "name": "micro", "rounds": 1, "nproc": 1, "preset": "debug", "task": "arithmetic", "task_args": {"max_digits": 1},
    "pretrain_examples": 200,
    "seed_pairs": 64, "rs_prompts": 24, "pref_prompts": 96, "eval_prompts": 10, "k": 4, "max_new_tokens": 6,
    "pretrain": {"train.steps": 60, "data.batch_size": 32, "train.save_every": 30, "optim.lr": 1.0e-2},
    "rm": {"train.steps": 3, "data.batch_size": 16}, "sft": {"train.steps": 3, "data.batch_size": 2},
    "dpo": {"train.steps": 3, "data.batch_size": 1, "dpo.reference": "precompute"},
    "variants": {"dpo": [{"train.seed": 0}, {"train.seed": 1}]},
    "max_dropped": 1.0,  # a toy whose drops these tests do not check: stop only on an empty stage
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.long
def test_killed_pipeline_resumes_without_redoing_stages(tmp_path):
    cfg = tmp_path / "micro.yaml"
    cfg.write_text(yaml.safe_dump({**MICRO, "root": str(tmp_path / "runs")}))
    cmd = [sys.executable, str(ROOT / "llama_posttrain" / "driver" / "pipeline.py"), "--config", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "runs" / "micro"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "round_1" / "sft" / "variant_0" / "metrics.jsonl").exists():
        assert proc.poll() is None, "the pipeline ended before the SFT stage"
        time.sleep(0.05)
    kill_9_tree(proc.pid)  # in the middle of round 1's SFT training: the pipeline, its torchrun, the workers
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
            r"configs.dpo: \S*/x is not a file",
        ),
        ({"preset": "huge"}, r"preset must be one of \(.*'tiny'.*\), got 'huge'"),
        (
            {"task": "chess"},
            r"task: unknown task 'chess': give one of arithmetic, files, word_sums or a 'package.module:factory' path",
        ),
        ({"task_args": {"max_digits": "two"}}, r"task_args: max_digits: expected int, got 'two'"),
        ({"task_args": {"max_digits": 0}}, r"task_args: max_digits: must be >= 1, got 0"),
        ({"task_args": {"noise": 1.5}}, r"task_args: noise: a fraction, must be in \[0, 1\], got 1.5"),
        ({"task_args": {"digits": 1}}, r"task_args: unknown key\(s\) digits \(known: max_digits, noise\)"),
        ({"base": "no/such/folder"}, r"base: no/such/folder is not a checkpoint folder"),
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
    from llama_posttrain.driver.pipeline import main

    with pytest.raises(SystemExit, match=r"^pipeline: error: override 'k=2.5': k: expected int"):
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


@pytest.mark.long  # a real failing job (pytest -m long)
def test_a_failing_stage_prints_its_log_path_and_last_lines(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "llama_posttrain" / "driver" / "pipeline.py"),
        "--config",
        _micro(tmp_path, pretrain={"model.tokenizer": str(tmp_path / "no_such_tokenizer.json")}),
    ]  # a valid config (the start's checks pass it) whose job fails
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = tmp_path / "runs" / "micro" / "round_0" / "pretrain" / "variant_0.log"
    assert out.returncode == 1
    assert "pipeline: error: [round 0] pretrain: llama_posttrain/train/sft.py failed (exit code 1)" in out.stderr
    assert f"the end of its log {log}\n" in out.stderr
    assert "no_such_tokenizer.json" in out.stderr.split("the end of its log")[1]
    assert "no_such_tokenizer.json" in log.read_text().split("\n", 1)[1]  # below the command line
    assert "CalledProcessError" not in out.stderr


def test_a_task_is_found_by_name_or_module_path_and_the_sampler_uses_the_same_registry():
    from llama_posttrain.data.tasks.arithmetic import Arithmetic
    from llama_posttrain.jobs.sampling import _annotator

    by_name = load_pipeline_config(None, ["task_args={max_digits: 1, noise: 0.1}"])
    by_path = load_pipeline_config(
        None, ["task=llama_posttrain.data.tasks.arithmetic:Arithmetic", "task_args={max_digits: 1}"]
    )
    assert Pipeline(by_name).recipe.task == Arithmetic(max_digits=1, noise=0.1)
    assert Pipeline(by_path).recipe.task == Arithmetic(max_digits=1)
    record = {"messages": [{"role": "user", "content": "3+4="}]}
    assert _annotator("verifier:arithmetic")(record, ["7", "8", " 7\n"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        _annotator("verifier:chess")
    with pytest.raises(PipelineError, match=r"^override 'task=data.tasks:nope': task: task 'data.tasks:nope': cannot"):
        load_pipeline_config(None, ["task=data.tasks:nope"])


def test_a_task_without_a_pretraining_corpus_needs_a_base_checkpoint(tmp_path, monkeypatch):
    import llama_posttrain.data.tasks.arithmetic as arithmetic

    class NoCorpus:  # prompts, verifier and seed data, but nothing to pre-train on
        prompts, verify, seed_data = arithmetic.Arithmetic.prompts, arithmetic.Arithmetic.verify, None

    monkeypatch.setattr(arithmetic, "NoCorpus", NoCorpus, raising=False)
    with pytest.raises(PipelineError, match=r"task: task '.*NoCorpus' has no pre-training corpus .*give `base:"):
        load_pipeline_config(None, ["task=llama_posttrain.data.tasks.arithmetic:NoCorpus"])


def _report(tmp_path, capsys, monkeypatch=None):
    """The report of a finished 2-round run (made-up results), its printed output."""
    from llama_posttrain.driver.report import write_report

    cfg = load_pipeline_config(None, [f"root={tmp_path}", "rounds=2"])
    run = tmp_path / cfg.name
    run.mkdir(parents=True)
    results = [{"round": 0, "stage": "data"}, {"round": 0, "stage": "pretrain", "task_accuracy": 0.25,
                    "task_accuracy_sampled": 0.2}]  # fmt: skip
    for k in (1, 2):
        results += [
            {"round": k, "stage": "rm", "rm_accuracy": 0.6 + k / 10},
            {"round": k, "stage": "rs", "rm_pick_accuracy": 0.5 + k / 10},
            {"round": k, "stage": "sft", "sft_loss": 1.0 / k, "task_accuracy": 0.3 * k, "task_accuracy_sampled": 0.2},
            {"round": k, "stage": "pref"},
            {"round": k, "stage": "dpo", "dpo_reward_accuracy": 0.7, "task_accuracy": 0.4 * k,
             "task_accuracy_sampled": 0.3},
        ]  # fmt: skip
    write_report(run, {}, results, cfg.plots, cfg.rounds, cfg.eval_prompts)
    return run, capsys.readouterr().out


def test_report_names_stages_and_rounds_and_draws_the_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from llama_posttrain.driver.report import accuracy_by_stage, rewards_by_round

    run, out = _report(tmp_path, capsys)
    assert out.startswith("| round | stage |") and "| 2 | dpo |  |  |  | 0.700 | 0.800 | 0.300 |" in out
    for name in ("accuracy.png", "rewards.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"{run / name}" in out
    pipe_results = json.loads((run / "summary.json").read_text())["stages"]
    labels, series, _ = accuracy_by_stage(pipe_results)
    assert labels == ["base", "R1 SFT", "R1 DPO", "R2 SFT", "R2 DPO"]
    assert series["greedy"] == [0.25, 0.3, 0.4, 0.6, 0.8]
    labels, series, _ = rewards_by_round(pipe_results, 2)  # results without their sizes (n): no count is named
    assert labels == ["round 1", "round 2"] and series["reward model"] == [0.7, 0.8]


def test_report_without_matplotlib_says_how_to_get_plots_and_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    run, out = _report(tmp_path, capsys)
    assert "plots: skipped (matplotlib is not installed); to get them: pip install -e '.[plots]'" in out
    assert (run / "summary.md").is_file() and not (run / "accuracy.png").exists()


def test_help_lists_every_key_with_its_default_and_comment(capsys):
    from llama_posttrain.driver.pipeline import main
    from llama_posttrain.driver.pipeline_config import PipelineConfig

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "  k = 8  # samples per prompt" in out and "  task = 'arithmetic'  # a task" in out
    for key in PipelineConfig.__dataclass_fields__:
        assert f"\n  {key} = " in out, key
