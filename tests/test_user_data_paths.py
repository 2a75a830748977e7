"""One rule for relative paths (issue 29 item 3): relative to the directory a command is started in, wherever the
path is written: the pipeline's config, its task_args, and the stage config files it is given; every job gets
them absolute and runs in that directory. The tokenized caches go to a folder the run owns (a training run's
<run_dir>/.tokenized, the pipeline's <run folder>/.tokenized), never beside the data. The human annotator's stop
has an exit status of its own. Each test starts outside the repository (tmp_path)."""

import shutil
import sys
from pathlib import Path

import pytest
import yaml
from test_pipeline import MICRO
from test_recipe import Recording, args_of
from test_train import QUICK

from llama_posttrain.driver import pipeline
from llama_posttrain.driver.launch import ATTEMPT, Job, Launcher
from llama_posttrain.driver.pipeline import Pipeline
from llama_posttrain.driver.pipeline_config import load_pipeline_config
from llama_posttrain.driver.stages import WaitingForLabels


def _pipeline(start: Path, monkeypatch, **cfg) -> Pipeline:
    """The MICRO pipeline started in `start` (its config file there too), its jobs recorded, not run."""
    (start / "p.yaml").write_text(yaml.safe_dump({**MICRO, "root": "runs", **cfg}))
    monkeypatch.chdir(start)
    pipe = Pipeline(load_pipeline_config("p.yaml"))
    pipe.check_run_folder()
    pipe.recipe.launcher = Recording()
    pipe.recipe.eval_job = lambda *args, **kw: {}
    pipe.recipe.stage(0, "data", pipe.recipe.make_data)
    return pipe


def test_a_stage_config_files_paths_are_relative_to_where_the_pipeline_starts(tmp_path, monkeypatch, capsys):
    """A user's dpo.yaml with relative paths: the job gets them absolute, against the pipeline's directory (before:
    not passed, so the job, run in the repository, read them against the repository)."""
    start = tmp_path / "start"
    (start / "configs").mkdir(parents=True)
    for kind in ("rm", "sft"):
        shutil.copy(QUICK / f"{kind}.yaml", start / "configs" / f"{kind}.yaml")
    dpo = yaml.safe_load((QUICK / "dpo.yaml").read_text())
    dpo["data"]["cache_dir"] = "my_cache"
    dpo["dpo"]["reference_checkpoint"] = "models/ref"
    (start / "configs" / "dpo.yaml").write_text(yaml.safe_dump(dpo))
    pipe = _pipeline(start, monkeypatch, configs={k: f"configs/{k}.yaml" for k in ("rm", "sft", "dpo")})
    r = pipe.recipe
    r.train_dpo(pipe.dir / "round_1" / "dpo", 1, Path("sft_model"), Path("rm_model"))
    r.train_rm(pipe.dir / "round_1" / "rm", 1, Path("base_model"))
    training = [j for j in r.launcher.jobs if "average" not in j.script]  # dpo variants 0 and 1, then the rm
    dpo_job, rm_job = training[0], training[-1]
    dpo_args, rm_args = args_of(dpo_job), args_of(rm_job)
    assert dpo_args["data.cache_dir"] == str(start / "my_cache")
    assert dpo_args["dpo.reference_checkpoint"] == str(start / "models" / "ref")
    assert dpo_args["model.checkpoint"] == str(start / "sft_model")
    assert dpo_args["data.eval"] == str(pipe.dir / "round_0" / "data" / "eval_pairs.jsonl")  # the task's
    assert rm_args["data.cache_dir"] == str(pipe.dir / ".tokenized")  # the file names none: the run folder's
    assert dpo_job.cwd == rm_job.cwd == str(start)
    assert capsys.readouterr().out.count("not used") == 0  # the task has eval files: nothing replaced by none


def test_the_default_configs_work_from_any_directory_and_their_data_is_never_read(tmp_path, monkeypatch, capsys):
    """The repository's quickstart configs from a folder outside it: every path key of theirs is set by the pipeline
    (their data.eval, the quickstart's arithmetic pairs, is not evaluated on when the task has no eval pairs)."""
    pipe = _pipeline(tmp_path, monkeypatch)
    r = pipe.recipe
    r.files = lambda: {"preferences": [str(tmp_path / "prefs.jsonl")], "sft": []}  # a task without eval files
    (tmp_path / "prefs.jsonl").write_text("")
    r.train_rm(pipe.dir / "round_1" / "rm", 1, Path("base_model"))
    args = args_of(r.launcher.jobs[0])
    assert r.launcher.jobs[0].args[1] == str(QUICK / "rm.yaml")
    assert args["data.eval"] is None and args["data.cache_dir"] == str(tmp_path / "runs" / "micro" / ".tokenized")
    assert args["train.run_dir"] == str(pipe.dir / "round_1" / "rm" / "variant_0")
    paths = [v for k, v in args.items() if k in ("data.train", "model.checkpoint", "train.run_dir", "data.cache_dir")]
    assert all(str(p).startswith(str(tmp_path)) for p in paths), paths
    assert "data.eval experiments/quickstart/data/pref_eval.jsonl not used" in capsys.readouterr().out


def test_a_job_runs_in_the_directory_the_driver_started_in_and_its_log_says_so(tmp_path, monkeypatch):
    script = tmp_path / "where.py"
    script.write_text("import os, sys\nopen(sys.argv[1], 'w').write(os.getcwd())\n")
    start = tmp_path / "start"
    start.mkdir()
    monkeypatch.chdir(start)
    Launcher("local").run(Job("where", str(script), [str(tmp_path / "cwd.txt")], tmp_path / "where.log", nproc=0))
    assert (tmp_path / "cwd.txt").read_text() == str(start)  # before: the repository
    first = (tmp_path / "where.log").read_text().splitlines()[0]
    assert first.startswith(ATTEMPT) and f": cd {start} && {sys.executable} {script}" in first


def test_a_training_runs_tokenized_cache_is_in_its_run_folder_not_beside_the_data(tmp_path, monkeypatch, capsys):
    """prepare_data (the training run's own loader call, same default: run_folder.cache_dir) with the quickstart
    config: the cache goes to <run_dir>/.tokenized, not experiments/quickstart/data/.tokenized."""
    from llama_posttrain.train import prepare_data, run_folder
    from llama_posttrain.train.sft import SFTConfig

    monkeypatch.chdir(tmp_path)
    argv = ["--kind", "sft", "--config", str(QUICK / "sft.yaml"), "train.run_dir=run", "data.eval=null"]
    argv += [f"data.train={QUICK / 'data' / 'sft_eval.jsonl'}", "data.num_workers=1"]
    prepare_data.main(argv)
    out = capsys.readouterr().out
    assert "into run/.tokenized/sft_eval.jsonl-" in out  # before: experiments/quickstart/data/.tokenized
    assert any((tmp_path / "run" / ".tokenized").glob("sft_eval.jsonl-*"))
    cfg = SFTConfig()
    cfg.train.run_dir = "elsewhere/r"
    assert run_folder.cache_dir(cfg) == "elsewhere/r/.tokenized"
    cfg.data.cache_dir = "mine"
    assert run_folder.cache_dir(cfg) == "mine"  # one given is kept
    assert f"{QUICK / 'data' / '.tokenized'}" not in out


def test_the_human_annotators_stop_has_its_own_exit_status(tmp_path, monkeypatch, capsys):
    class Stops:
        def __init__(self, cfg):
            pass

        def run(self):
            raise WaitingForLabels(f"2 sets to label in {tmp_path / 'to_label.jsonl'}")

    monkeypatch.setattr(pipeline, "Pipeline", Stops)
    with pytest.raises(SystemExit) as e:
        pipeline.main([])
    assert e.value.code == pipeline.EXIT_WAITING_FOR_LABELS == 3  # 1 is an error's, 128 + N a signal's
    assert "pipeline: waiting for labels: 2 sets to label in" in capsys.readouterr().err
    assert "3 waiting for labels" in pipeline.__doc__  # --help says it
