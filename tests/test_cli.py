"""Every entry point's `--help` works, and the training entry points answer it without importing torch
(issue 20 item 9: `--help` and config errors in about a second on a busy machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (command after `python`, a line its --help must show)
ENTRY_POINTS = [
    (["llama_posttrain/train/sft.py"], "sft.mask_prompt = True"),
    (["llama_posttrain/train/dpo.py"], "dpo.beta = 0.1"),
    (["llama_posttrain/train/rm.py"], "rm.one_row = True"),
    (["llama_posttrain/jobs/sample.py"], "samples per prompt (default: 16)"),
    (["llama_posttrain/jobs/evaluate.py"], "(default: 8)"),
    (["llama_posttrain/jobs/average.py"], "of the average (default: native)"),
    (["llama_posttrain/driver/pipeline.py"], "keys (key = default)"),
    (["-m", "llama_posttrain.driver.plan"], "usage:"),
]


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("command, shown", ENTRY_POINTS, ids=[" ".join(c) for c, _ in ENTRY_POINTS])
def test_help_of_every_entry_point(command, shown):
    r = _python(*command, "--help")
    assert r.returncode == 0, r.stderr
    assert shown in " ".join(r.stdout.split()), r.stdout[-2000:]


@pytest.mark.slow
def test_the_configs_and_training_entry_points_import_without_torch():
    code = (
        "import sys; import llama_posttrain.train.config, llama_posttrain.train.lifecycle, llama_posttrain.train.sft, llama_posttrain.train.dpo, llama_posttrain.train.rm, llama_posttrain.jobs.sample, "
        "llama_posttrain.jobs.evaluate, llama_posttrain.jobs.average, llama_posttrain.jobs.configs, llama_posttrain.driver.pipeline, llama_posttrain.driver.recipe, llama_posttrain.driver.report, llama_posttrain.driver.launch, llama_posttrain.llama; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    r = _python("-c", code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.slow
def test_help_and_a_config_error_answer_without_torch():
    """`--help` and a bad key end before torch is imported (the import is most of the wait)."""
    code = (
        "import sys\n"
        "from llama_posttrain.train import sft\n"
        "from llama_posttrain.train.lifecycle import main_guard\n"
        "for argv in (['--help'], ['train.nope=1']):\n"
        "    try:\n"
        "        main_guard(lambda: sft.main(argv))\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code, file=sys.stderr)\n"
        "print('torch' in sys.modules)\n"
    )
    r = _python("-c", code)
    assert "exit 0" in r.stderr and "exit 2" in r.stderr and "unknown key train.nope" in r.stderr, r.stderr
    assert r.stdout.strip().endswith("False")


def _run_without_torch(script: str, *argv: str) -> subprocess.CompletedProcess:
    """`python script argv...` in-process (runpy), then whether torch was imported: on stdout."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, *{list(argv)!r}]\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, file=sys.stderr)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    env = {**os.environ}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


CLIS = [
    "llama_posttrain/train/sft.py", "llama_posttrain/train/dpo.py", "llama_posttrain/train/rm.py", "llama_posttrain/jobs/sample.py", "llama_posttrain/jobs/evaluate.py", "llama_posttrain/driver/pipeline.py",
    "llama_posttrain/jobs/average.py", "llama_posttrain/train/prepare_data.py",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("script", CLIS)
def test_help_answers_without_importing_torch(script):
    """issue 20 item 9: the torch import is most of `--help`'s wait on a busy machine."""
    r = _run_without_torch(script, "--help")
    assert "exit 0" in r.stderr and "usage:" in r.stdout, r.stderr[-2000:]
    assert r.stdout.strip().endswith("torch imported: False"), r.stdout[-500:]


ENTRY_MODULES = ["train/sft.py", "train/dpo.py", "train/rm.py", "jobs/sample.py", "jobs/evaluate.py", "jobs/average.py"]
OPTIONAL_EXTRAS = ("vllm",)  # imported where used: a run without them never imports them


def test_each_entry_point_defers_one_import_and_the_rest_imports_at_the_top():
    """issue 31 item 5: `--help` is fast because an entry point's module holds its config's command line and `main`
    with one deferred import (its run's module, torch at its top), not because imports are scattered below
    module level. The jobs' other modules import at their top, but for optional extras."""
    import ast

    def deferred(path: Path) -> list[str]:
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))}
        top |= {id(n) for block in tree.body if isinstance(block, (ast.If, ast.Try)) for n in ast.walk(block)}
        out = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if not any(n.split(".")[0] in OPTIONAL_EXTRAS for n in names):
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {', '.join(names)}")
        return out

    package = ROOT / "llama_posttrain"
    for entry in ENTRY_MODULES:
        found = deferred(package / entry)
        assert len(found) == 1 and found[0].endswith(("_objective", ".sampling", ".evaluation", ".averaging")), found
    entries = {package / e for e in ENTRY_MODULES}
    rest = [line for p in sorted((package / "jobs").glob("*.py")) if p not in entries for line in deferred(p)]
    assert not rest, rest


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, argv, error",
    [
        (
            "llama_posttrain/jobs/sample.py",
            ["--policy", "p", "--prompts", "x.jsonl", "--k", "0"],
            "argument --k: must be >= 1",
        ),
        (
            "llama_posttrain/jobs/sample.py",
            ["--policy", "p", "--prompts", "x", "--batch-size", "0"],
            "argument --batch-size",
        ),
        ("llama_posttrain/jobs/evaluate.py", ["--model", "m", "--out", "o.json"], "nothing to evaluate"),
        ("llama_posttrain/driver/pipeline.py", ["nope=1"], "unknown key"),
        (
            "llama_posttrain/driver/pipeline.py",
            ["vllm_gpu_memory_utilization=2"],
            "vllm_gpu_memory_utilization: must be in (0, 1]",
        ),
    ],
)
def test_bad_arguments_answer_without_importing_torch(script, argv, error):
    r = _run_without_torch(script, *argv)
    assert error in r.stderr and "exit 0" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.strip().endswith("torch imported: False"), r.stdout[-500:]


@pytest.mark.slow
def test_sample_help_shows_the_defaults():
    r = _run_without_torch("llama_posttrain/jobs/sample.py", "--help")
    shown = " ".join(r.stdout[r.stdout.index("\noptions:") :].split())  # the options, not the usage line
    for option, default in [("--k K", 16), ("--max-new-tokens MAX_NEW_TOKENS", 256), ("--batch-size BATCH_SIZE", 64)]:
        after = shown[shown.index(option) :]
        assert f"(default: {default})" in after[: after.index(" --", 2)], (option, after[:200])
    assert "(default: 0.9)" in shown  # --vllm-gpu-memory-utilization


def test_the_pipeline_estimate_comes_from_the_last_finished_run_of_the_same_config(tmp_path):
    """issue 20 item 10: the estimate at start is the time the stages left took in a finished run of this
    config on this machine (its DONE markers' `seconds`), and no figure at all without one."""
    import dataclasses
    import json
    import shutil
    from types import SimpleNamespace

    import yaml

    from llama_posttrain.driver.pipeline import Pipeline
    from llama_posttrain.driver.pipeline_config import load_pipeline_config

    cfg = load_pipeline_config(None, [f"root={tmp_path}", "name=new"])
    stages = {"sft": {"train": {"steps": 3}}}
    new = SimpleNamespace(cfg=cfg, dir=tmp_path / "new", stage_configs=lambda: stages)
    assert Pipeline.estimate(new).startswith("no estimate yet")
    old = tmp_path / "old"
    for stage, seconds in [("round_0/data", 1.0), ("round_0/pretrain", 100.0), ("round_1/sft", 200.0)]:
        (old / stage).mkdir(parents=True)
        (old / stage / "DONE").write_text(json.dumps({"seconds": seconds}))
    (old / "pipeline.yaml").write_text(yaml.safe_dump({**dataclasses.asdict(cfg), "name": "old"}))
    (old / "stage_configs.yaml").write_text(yaml.safe_dump(stages))
    assert Pipeline.estimate(new).startswith("no estimate yet")  # not finished: no summary.json
    (old / "summary.json").write_text("{}")
    assert Pipeline.estimate(new).startswith("estimate: ~5 min on this machine for the 3 stages left")
    (new.dir / "round_0" / "pretrain").mkdir(parents=True)
    (new.dir / "round_0" / "pretrain" / "DONE").write_text("{}")  # done here: skipped, not counted
    assert Pipeline.estimate(new).startswith("estimate: ~3 min on this machine for the 2 stages left")
    new.stage_configs = lambda: {"sft": {"train": {"steps": 4}}}  # another config: its times say nothing
    assert Pipeline.estimate(new).startswith("no estimate yet")
    new.stage_configs = lambda: stages
    shutil.copytree(old, new.dir, dirs_exist_ok=True)  # this folder's own run finished: only the report is left
    assert Pipeline.estimate(new) == "every stage is done: the report only"


def test_the_training_progress_line_shows_an_eta_from_this_starts_steps(tmp_path, monkeypatch):
    """issue 20 item 11: our bar (tqdm is no dependency of the package) with an ETA: the steps left at the
    rate of the steps done since this start (a resumed run does not count its earlier steps)."""
    from types import SimpleNamespace

    from llama_posttrain.train import logger

    cfg = SimpleNamespace(progress=True, wandb="disabled", project="p", name=None, group=None, job_type=None)
    log = logger.Logger(tmp_path, cfg, {}, enabled=False, total_steps=100, resume_step=40)
    monkeypatch.setattr(logger.time, "time", lambda: log.t0 + 30.0)  # 30 s for steps 41..50
    assert "50/100 loss 1.0000" in log._line(50, {"loss": 1.0}) and "ETA 2:30" in log._line(50, {"loss": 1.0})
    assert "ETA" not in log._line(100, {"loss": 1.0})


def test_the_tokenizer_and_chat_template_choices_print_only_when_verbose(tmp_path, capsys):
    """issue 20 item 8: llama_posttrain/train/run_setup.py `setup` passes verbose=(local rank 0), so a node prints them once."""
    import shutil

    from llama_posttrain.llama.chat import resolve_chat_template
    from llama_posttrain.llama.tokenizer import DEFAULT_TOKENIZER, resolve_tokenizer

    shutil.copy(DEFAULT_TOKENIZER, tmp_path / "tokenizer.model")  # a tiktoken file, found in the folder
    for verbose in (False, True):
        resolve_tokenizer(None, tmp_path, 512, verbose=verbose)
        assert resolve_chat_template(None, tmp_path, verbose=verbose) == "llama3"
        out = capsys.readouterr().out
        assert ("tokenizer: " in out and "chat template: llama3" in out) if verbose else out == ""
