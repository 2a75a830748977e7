"""The pipeline's run folder and its checks at start: DONE markers hold paths relative to the run folder (a copied or
renamed folder reads its own results; a marker pointing elsewhere, a corrupt or empty one, is refused naming
it); an empty stage is never marked done; unknown sft_weights sources and cleaning keys are refused at start;
another folder's bad record is skipped by the estimate with a warning; a folder the pipeline cannot write in is
refused before anything starts; relative paths are relative to the directory the pipeline starts in."""

import dataclasses
import json
import re
import shutil
import typing
from pathlib import Path

import pytest
import yaml
from test_job_configs import job_config
from test_pipeline import MICRO, _micro
from test_recipe import Recording, files, recipe, write  # noqa: F401 (files: a fixture)

from llama_posttrain.driver.pipeline import Pipeline, main
from llama_posttrain.driver.pipeline_config import PipelineError, load_pipeline_config
from llama_posttrain.driver.recipe import Recipe
from llama_posttrain.driver.stages import StageError

ROOT = Path(__file__).parent.parent


def _synthetic(tmp_path, folder: Path) -> Recipe:
    """The arithmetic task's recipe in `folder`, its jobs recorded, not run."""
    cfg = load_pipeline_config(_micro(tmp_path))
    return Recipe(cfg, _task(cfg), None, folder, Recording(), {})


def _task(cfg):
    from llama_posttrain.driver.pipeline_config import task_from_config

    return task_from_config(cfg.task, cfg.task_args)


# ------------------------------------------------------------------ DONE markers: relative to the run folder


def test_a_copied_or_renamed_run_folder_reads_its_own_results(tmp_path):
    a = tmp_path / "runs" / "a"
    r = _synthetic(tmp_path, a)
    r.stage(0, "data", r.make_data)
    r.stage(0, "pretrain", lambda d, k: {"model": str(d / "model")})
    marker = json.loads((a / "round_0" / "pretrain" / "DONE").read_text())
    assert marker["model"] == str(Path("round_0") / "pretrain" / "model")  # relative to the run folder
    data = json.loads((a / "round_0" / "data" / "DONE").read_text())["files"]
    assert data["preferences"] == [str(Path("round_0") / "data" / "seed_pairs.jsonl")]

    for copy in (tmp_path / "runs" / "b", tmp_path / "elsewhere" / "renamed"):
        shutil.copytree(a, copy)
        c = _synthetic(tmp_path, copy)
        assert c.stage(0, "pretrain", None)["model"] == str(copy / "round_0" / "pretrain" / "model")
        assert c.files()["preferences"] == [str(copy / "round_0" / "data" / "seed_pairs.jsonl")]
        assert c.files()["eval_pairs"] == str(copy / "round_0" / "data" / "eval_pairs.jsonl")
        assert c.results[-1]["model"] == str(Path("round_0") / "pretrain" / "model")  # summary.json: as the marker


def test_an_old_marker_with_absolute_paths_resumes_in_its_folder_and_is_refused_in_a_copy(tmp_path):
    a = tmp_path / "runs" / "a"
    old = {"round": 0, "stage": "pretrain", "model": str(a / "round_0" / "pretrain" / "model"), "seconds": 1.0}
    (a / "round_0" / "pretrain").mkdir(parents=True)
    (a / "round_0" / "pretrain" / "DONE").write_text(json.dumps(old))  # as markers were written before
    copy = tmp_path / "runs" / "b"
    shutil.copytree(a, copy)

    with pytest.raises(StageError, match=rf"^{re.escape(str(copy / 'round_0' / 'pretrain' / 'DONE'))}: points outside"):
        _synthetic(tmp_path, copy).stage(0, "pretrain", None)  # would read a's model
    r = _synthetic(tmp_path, a)
    assert r.stage(0, "pretrain", None)["model"] == old["model"]  # its own folder: read, as before
    assert json.loads((a / "round_0" / "pretrain" / "DONE").read_text())["model"] == "round_0/pretrain/model"
    shutil.rmtree(copy)
    shutil.copytree(a, copy)  # copied after the rewrite: reads its own
    assert _synthetic(tmp_path, copy).stage(0, "pretrain", None)["model"] == str(copy / "round_0/pretrain/model")


def test_a_marker_may_point_outside_only_at_what_the_config_names(tmp_path, files):  # noqa: F811
    r, _ = recipe(tmp_path, files)
    d = tmp_path / "run" / "round_0" / "pretrain"
    d.mkdir(parents=True)
    marker = {"round": 0, "stage": "pretrain", "model": str(tmp_path / "base")}  # the config's base
    (d / "DONE").write_text(json.dumps(marker))
    assert r.stage(0, "pretrain", None)["model"] == str(tmp_path / "base")
    for elsewhere in (str(tmp_path / "other_run" / "model"), "../../other_run/model"):
        (d / "DONE").write_text(json.dumps({**marker, "model": elsewhere}))
        with pytest.raises(StageError, match=rf"DONE: points outside this run folder .* at {re.escape(elsewhere)}"):
            r.stage(0, "pretrain", None)


@pytest.mark.parametrize(
    "text, why",
    [
        ("", r"\(Expecting value"),
        ('{"round": 0, "stage": "rm", "mod', r"\(Unterminated string"),
        ("[1, 2]", r"\(no round, stage, model\)"),
        ('{"round": 1, "stage": "rm"}', r"\(no model\)"),
    ],
)
def test_a_corrupt_or_empty_done_marker_is_an_error_naming_it(tmp_path, text, why):
    r = _synthetic(tmp_path, tmp_path / "runs" / "a")
    marker = tmp_path / "runs" / "a" / "round_1" / "rm" / "DONE"
    marker.parent.mkdir(parents=True)
    marker.write_text(text)
    with pytest.raises(StageError, match=rf"^{re.escape(str(marker))}: not a DONE marker the pipeline wrote {why}"):
        r.stage(1, "rm", None)
    with pytest.raises(StageError, match=rf"delete {re.escape(str(marker))} .* to redo the stage"):
        r.stage(1, "rm", None)


# ------------------------------------------------------------------ an empty stage is not done


def _sampled(d: Path, prompts: int, **outputs) -> None:
    """What a finished sampling job leaves (the recording launcher runs none)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "prompts.jsonl").write_text("{}\n" * prompts)
    (d / "sample_report.json").write_text(json.dumps({"dropped": {"unfinished": 3 * prompts}}))
    for name, records in outputs.items():
        write(d / f"{name}.jsonl", records)


def test_a_preference_stage_with_no_pair_is_not_marked_done(tmp_path, files):  # noqa: F811
    r, _ = recipe(tmp_path, files)
    r.stage(0, "data", r.make_data)
    d = tmp_path / "run" / "round_1" / "pref"
    _sampled(d, 2, sampled_pairs=[])
    with pytest.raises(
        StageError, match=r"^\[round 1\] pref: .*sampled_pairs.jsonl: 0 preference pairs from 2 prompts"
    ):
        r.stage(1, "pref", r.new_pairs, tmp_path / "sft", tmp_path / "rm")
    with pytest.raises(
        StageError, match=r"DPO would have nothing to train on\. To go on: .*`from_stage=round_1/pref`.*pref_prompts"
    ):
        r.stage(1, "pref", r.new_pairs, tmp_path / "sft", tmp_path / "rm")  # the rerun says the same, no DPO failure
    assert not (d / "DONE").exists()
    write(d / "sampled_pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert r.stage(1, "pref", r.new_pairs, tmp_path / "sft", tmp_path / "rm")["records"] == 1
    assert (d / "DONE").is_file()


def test_rejection_sampling_with_no_record_is_not_marked_done(tmp_path, files):  # noqa: F811
    r, _ = recipe(tmp_path, files)
    r.stage(0, "data", r.make_data)
    d = tmp_path / "run" / "round_1" / "rs"
    _sampled(d, 3, sft=[])
    with pytest.raises(
        StageError, match=r"sft.jsonl: 0 SFT records from 3 prompts x 8 samples \(dropped: .*rs_prompts"
    ):
        r.stage(1, "rs", r.rejection_sampling, tmp_path / "policy", tmp_path / "rm")
    assert not (d / "DONE").exists()


def test_labels_without_a_strict_preference_ask_for_labels_not_a_new_run(tmp_path, files):  # noqa: F811
    r, _ = recipe(tmp_path, files, "annotator=human")
    r.stage(0, "data", r.make_data)
    d = tmp_path / "run" / "round_1" / "pref"
    prompt = [{"role": "user", "content": "1+1="}]
    _sampled(d, 1, sets=[{"id": "a", "prompt": prompt, "responses": ["2", "3"], "finished": [True, True]}])
    with pytest.raises(Exception, match="sets to label"):
        r.stage(1, "pref", r.new_pairs, tmp_path / "sft", tmp_path / "rm")
    write(d / "labels.jsonl", [{"id": "a", "scores": [1.0, 1.0]}])  # a tie: no pair
    with pytest.raises(StageError, match=r"0 preference pairs .*: label some sets of .*labels.jsonl with a strict"):
        r.stage(1, "pref", r.new_pairs, tmp_path / "sft", tmp_path / "rm")
    assert not (d / "DONE").exists()


# ------------------------------------------------------------------ config keys checked at start


def test_an_unknown_sft_weights_source_is_refused_naming_the_known_ones():
    with pytest.raises(
        PipelineError,
        match=r"^override 'sft_weights=\{rejection_sample: 3\}': sft_weights: unknown source\(s\) rejection_sample "
        r"\(known: rejection_sampled, human\)",
    ):
        load_pipeline_config(None, ["sft_weights={rejection_sample: 3}"])
    with pytest.raises(PipelineError, match=r"sft_weights.human: a weight must be finite and >= 0, got -1"):
        load_pipeline_config(None, ["sft_weights={human: -1}"])
    with pytest.raises(PipelineError, match=r"sft_weights.human: must be a finite number, got nan"):
        load_pipeline_config(None, ["sft_weights={human: .nan}"])
    load_pipeline_config(None, ["sft_weights={rejection_sampled: 3, human: 0.5}"])


def test_the_known_sft_weights_sources_are_the_ones_the_recipe_reads():
    import inspect

    from llama_posttrain.driver.pipeline_config import SFT_SOURCES

    reads = set(re.findall(r"""w\.get\("(\w+)\"""", inspect.getsource(Recipe.train_sft)))
    assert reads == set(SFT_SOURCES)


@pytest.mark.parametrize(
    "cleaning, error",
    [
        ("{max_repeats: 0.3}", r"unknown key\(s\) max_repeats \(known: dedup, max_chars, max_repeat, "),
        ("{max_repeat: 2}", r"max_repeat: a fraction in \[0, 1\], got 2"),
        ("{max_emoji: -1}", r"max_emoji: must be >= 0"),
        ("{ban_phrase: ['']}", r"ban_phrase: an empty phrase would ban every sample"),
        ("{dedup: 'yes'}", r"dedup: expected bool"),
    ],
)
def test_a_cleaning_typo_is_refused_at_start_before_any_stage(tmp_path, cleaning, error):
    with pytest.raises(
        SystemExit, match=rf"^pipeline: error: override .cleaning={re.escape(cleaning)}.: cleaning: {error}"
    ):
        main([f"root={tmp_path / 'runs'}", f"cleaning={cleaning}"])
    assert not (tmp_path / "runs").exists()


def test_every_cleaning_key_is_a_sample_py_setting():
    """The pipeline's `cleaning` keys reach sample.py as its own settings (SampleConfig fields, its flags)."""
    from llama_posttrain.driver.pipeline_config import Cleaning
    from llama_posttrain.jobs.configs import SampleConfig, parser

    fields = {f.name for f in dataclasses.fields(SampleConfig)}
    flags = set(parser(SampleConfig)._option_string_actions)
    for f in dataclasses.fields(Cleaning):
        assert f.name in fields and "--" + f.name.replace("_", "-") in flags, f"cleaning key {f.name}: not sample.py's"


# ------------------------------------------------------------------ records: another folder's, this folder's


@pytest.mark.parametrize(
    "name, text",
    [
        ("stage_configs.yaml", "just a string\n"),
        ("stage_configs.yaml", "rm: 3\n"),
        ("stage_configs.yaml", "rm: [\n"),
        ("pipeline.yaml", "- a\n- b\n"),
    ],
)
def test_another_folders_bad_record_is_skipped_by_the_estimate_with_a_warning(tmp_path, capsys, name, text):
    other = tmp_path / "runs" / "other"
    Pipeline(load_pipeline_config(_micro(tmp_path, name="other"))).check_run_folder()
    (other / "summary.json").write_text("{}")
    (other / name).write_text(text)
    pipe = Pipeline(load_pipeline_config(_micro(tmp_path)))
    assert pipe.estimate().startswith("no estimate yet")
    out = capsys.readouterr().out
    assert f"pipeline: warning: {other / name}" in out and f"{other} left out of the estimate" in out


def test_this_folders_bad_record_is_an_error_naming_it(tmp_path):
    pipe = Pipeline(load_pipeline_config(_micro(tmp_path)))
    pipe.check_run_folder()
    (pipe.dir / "stage_configs.yaml").write_text("just a string\n")
    with pytest.raises(
        PipelineError, match=rf"^{re.escape(str(pipe.dir / 'stage_configs.yaml'))}: not recorded .*restore"
    ):
        Pipeline(load_pipeline_config(_micro(tmp_path))).check_run_folder()


def test_a_run_folder_the_pipeline_cannot_write_in_is_an_error_before_any_stage(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=r"^pipeline: error: .*a_file.*: cannot write in the run folder"):
        main(["--config", _micro(tmp_path, root=str(tmp_path / "a_file"))])  # root is a file
    read_only = tmp_path / "read_only"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # as a read-only folder answers (root ignores permission bits)
        if self.is_relative_to(read_only):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(SystemExit, match=r"^pipeline: error: .*read_only/micro: cannot write in the run folder \(Perm"):
        main(["--config", _micro(tmp_path, root=str(read_only))])


# ------------------------------------------------------------------ relative paths: where the pipeline starts


def test_relative_paths_are_relative_to_where_the_pipeline_starts_and_jobs_get_them_absolute(tmp_path, monkeypatch):
    from llama_posttrain.driver.stages import absolute_paths

    start = tmp_path / "start"
    (start / "safety").mkdir(parents=True)
    (start / "configs").mkdir()
    for kind in ("rm", "sft", "dpo"):
        shutil.copy(ROOT / "experiments" / "quickstart" / f"{kind}.yaml", start / "configs" / f"{kind}.yaml")
    cfg = {**MICRO, "root": "runs", "safety_rm": "safety", "configs": {k: f"configs/{k}.yaml" for k in MICRO["rm"]}}
    cfg["configs"] = {kind: f"configs/{kind}.yaml" for kind in ("rm", "sft", "dpo")}
    cfg["rm"] = {**MICRO["rm"], "data.cache_dir": "cache"}
    (start / "p.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(start)
    pipe = Pipeline(load_pipeline_config("p.yaml"))
    pipe.check_run_folder()
    assert pipe.dir == start / "runs" / "micro" and (pipe.dir / "pipeline.yaml").is_file()
    r = pipe.recipe
    r.launcher = Recording()
    r.eval_job = lambda *args, **kw: {}
    r.stage(0, "data", r.make_data)
    r.train_rm(pipe.dir / "round_1" / "rm", 1, Path("base_model"))
    (train,) = r.launcher.jobs  # the average of its one model: a copy, no job
    args = {a.split("=", 1)[0]: json.loads(a.split("=", 1)[1]) for a in train.args if "=" in a}
    assert args["train.run_dir"] == str(start / "runs" / "micro" / "round_1" / "rm" / "variant_0")
    assert args["data.cache_dir"] == str(start / "cache")  # not the repository's, where the job runs
    assert args["model.checkpoint"] == str(start / "base_model")
    assert train.args[1] == str(start / "configs" / "rm.yaml")
    copied = (pipe.dir / "round_1" / "rm" / "average.log").read_text().splitlines()[0].split(" && ")[1].split()[3:]
    for value in [*copied, args["data.train"]]:
        assert str(value).startswith(str(start)), value

    class Sampled(Exception):
        pass

    def record_and_stop(job):
        r.launcher.jobs.append(job)
        raise Sampled

    r.launcher.run = record_and_stop
    with pytest.raises(Sampled):
        r.sample(pipe.dir / "round_1" / "rs", 1, "rs", 2, Path("policy"), Path("rm"), ("sft",), annotate=None)
    assert job_config(r.launcher.jobs[-1]).safety_rm == str(start / "safety")
    data_train = [{"path": "a.jsonl", "weight": 1}, "b.jsonl", "/abs/c.jsonl"]
    assert absolute_paths({"data.train": data_train, "optim.lr": 1.0, "model.tokenizer": None}) == {
        "data.train": [{"path": str(start / "a.jsonl"), "weight": 1}, str(start / "b.jsonl"), "/abs/c.jsonl"],
        "optim.lr": 1.0,
        "model.tokenizer": None,
    }


def test_every_path_key_of_the_training_configs_is_made_absolute():
    """PATH_KEYS against the training configs' own fields: every string key names a path or is in NOT_PATHS,
    so a key added later is classified here, not forgotten."""
    from llama_posttrain.driver.stages import PATH_KEYS
    from llama_posttrain.train.dpo import DPOConfig
    from llama_posttrain.train.rm import RMConfig
    from llama_posttrain.train.sft import SFTConfig

    not_paths = {"model.preset", "data.keep_strengths", "logging.project", "logging.name", "logging.group"}
    not_paths |= {"logging.job_type", "logging.wandb", "dpo.loss", "dpo.reference", "model.chat_template"}
    keys = set()
    for cls in (SFTConfig, RMConfig, DPOConfig):
        for section in dataclasses.fields(cls):
            section_type = typing.get_type_hints(cls)[section.name]
            hints = typing.get_type_hints(section_type)
            for f in dataclasses.fields(section_type):
                tp = hints[f.name]
                if "str" in str(tp) and typing.get_origin(tp) is not typing.Literal:
                    keys.add(f"{section.name}.{f.name}")
    assert keys - not_paths == set(PATH_KEYS), sorted(keys - not_paths ^ set(PATH_KEYS))


def test_a_reward_model_near_chance_is_said():
    """SmolLM2's first RM reached 0.53 on held-out pairs and rejection sampling went on with near-random picks,
    in silence: below NEAR_CHANCE the stage says so, with what to change."""
    from llama_posttrain.driver.recipe import NEAR_CHANCE, near_chance

    said = near_chance(0.53)
    assert said is not None and "0.530" in said and "near chance" in said and "train.steps" in said
    assert near_chance(NEAR_CHANCE) is None and near_chance(0.97) is None and near_chance(None) is None
