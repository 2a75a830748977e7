"""Issue 17, round 2, around the pipeline and its pieces: the pipeline forwards SIGTERM / SIGINT to the
stage it runs and exits 128 + signal; SFT logs its real and its target tokens under their own names;
rejection sampling counts and prints every sample and prompt it drops; the quickstart stage configs
write outside the pipeline's folder."""

import json
from pathlib import Path

import pytest
from test_train import QUICK, in_process, read_metrics

from llama.chat import ChatFormat
from llama.tokenizer import load_tokenizer

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

    from train.loop import _add

    class MB:
        doc_ids = torch.tensor([[0, 0, -1]])

    acc = {}
    _add(acc, torch.tensor(1.0), {"target_tokens": torch.tensor(2)}, MB())
    assert acc["tokens"].item() == 2 and acc["target_tokens"].item() == 2
    with pytest.raises(ValueError, match=r"sums \['tokens'\] would overwrite the loop's own"):
        _add(acc, torch.tensor(1.0), {"tokens": torch.tensor(2)}, MB())


# ------------------------------------------------------------------ the README's commands, separate folders


def _stage_run(kind: str) -> None:
    """The README's stage command (torchrun ... train/sft.py --config experiments/quickstart/sft.yaml),
    in-process for 1 step in the current folder: its run folder is the config's own."""
    from train.loop import _Stop

    in_process(kind, [
        "--config", str(QUICK / f"{kind}.yaml"), "logging.progress=false", "data.eval=null", "train.steps=1",
        "train.save_every=0",
    ])  # fmt: skip
    assert _Stop.signal is None


def test_the_readme_stage_command_and_the_pipeline_use_separate_folders(tmp_path, one_rank, monkeypatch):
    import torch.distributed as dist

    from train.pipeline import Pipeline, load_pipeline_config

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
        assert sorted(p.name for p in pipeline.iterdir()) == ["pipeline.yaml", "stage_configs.yaml"]


def yaml_of(kind: str) -> dict:
    import yaml

    return yaml.safe_load((QUICK / f"{kind}.yaml").read_text())


def test_every_pipeline_config_keeps_its_stage_configs_run_folders_outside_its_own():
    from train.pipeline import load_pipeline_config

    pipelines = sorted((ROOT / "experiments").glob("*/pipeline.yaml"))
    assert pipelines
    for path in pipelines:
        cfg = load_pipeline_config(str(path))
        own = Path(cfg.root) / cfg.name
        stage_dirs = [Path(yaml_of_file(ROOT / f)["train"]["run_dir"]) for f in cfg.configs.values()]
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

    from train.pipeline import Pipeline, PipelineError, load_pipeline_config

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
