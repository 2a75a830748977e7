"""Issue 29, item 1: the pipeline on a user's own data does not carry on with nothing. Every input file's records
and every training run's config are checked before the first job (all problems at once, each naming its file,
line and field, or its stage and key); a sampling stage that drops more than `max_dropped` of its samples or
prompts stops, naming the largest drop and the keys to change; `from_stage=round_<k>/<stage>` redoes a stage and
every later one with changed sampling keys, recorded in redo.yaml (pipeline.yaml is never rewritten)."""

import json
import re
from pathlib import Path

import pytest
import yaml
from test_job_configs import job_config
from test_pipeline import _micro
from test_recipe import Recording, files, recipe, write  # noqa: F401 (files: a fixture)

from llama_posttrain.driver.pipeline import Pipeline
from llama_posttrain.driver.pipeline_config import PipelineError, load_pipeline_config
from llama_posttrain.driver.stages import StageError


def _user_message(i: int) -> dict:
    return {"role": "user", "content": f"{i}+1="}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A debug-preset checkpoint folder (random weights): the files task starts from a `base`."""
    from conftest import random_model

    from llama_posttrain.llama import get_preset, save_model

    path = tmp_path_factory.mktemp("base") / "model"
    save_model(random_model(get_preset("debug")), path)
    return path


def _pipeline(tmp_path, files, base, *overrides) -> Pipeline:  # noqa: F811
    cfg = load_pipeline_config(
        None,
        [f"root={tmp_path / 'runs'}", "name=user", "task=files", f"task_args={json.dumps(files)}", f"base={base}",
         "rs_prompts=3", "pref_prompts=2", "rounds=2", *overrides],
    )  # fmt: skip
    return Pipeline(cfg)


# ------------------------------------------------------------------ every input checked before the first job


def test_every_bad_record_and_stage_setting_is_reported_at_start_before_any_job(
    tmp_path,
    files,  # noqa: F811
    base,
    monkeypatch,
):
    d = Path(files["prompts"]).parent
    dialogs = [{"messages": [_user_message(i), {"role": "assistant", "content": str(i + 1)}]} for i in range(3)]
    dialogs[1]["messages"][1]["content"] = None  # line 2: the issue's record
    files["sft"] = [write(d / "human_sft_bad.jsonl", dialogs)]
    prefs = Path(files["preferences"][0]).read_text().splitlines()
    prefs[3] = json.dumps({"prompt": "3+1=", "chosen": "4"})  # line 4: no rejected
    prefs[5] = "{not json"  # line 6
    (d / "prefs_bad.jsonl").write_text("\n".join(prefs) + "\n")
    files["preferences"] = [str(d / "prefs_bad.jsonl")]
    write(d / "pool_bad.jsonl", [{"prompt": "1+1="}, {"prompt": [{"role": "assistant", "content": "hi"}]}])
    files["prompts"] = str(d / "pool_bad.jsonl")  # line 2: ends with the assistant; 2 prompts for 2 rounds x 5
    monkeypatch.setattr(Recording, "run", lambda self, job: pytest.fail(f"a job started: {job.script}"))
    p = _pipeline(tmp_path, files, base, "dpo={dpo.beta: -1.0}", "variants={rm: [{}, {train.stepz: 3}]}")
    p.launcher = p.recipe.launcher = Recording()
    with pytest.raises(PipelineError) as e:
        p.run()
    lines = str(e.value).splitlines()
    assert lines[0] == f"{len(lines) - 1} problem(s) found before any job started:"
    expected = [
        r"stage rm \(its config file \S+/rm.yaml, the pipeline's `rm:` overrides, variants.rm\[1\]\): override "
        r"'train.stepz=3': unknown key train.stepz",
        r"stage dpo \(its config file \S+/dpo.yaml, the pipeline's `dpo:` overrides\): override 'dpo.beta=-1.0': "
        r"dpo.beta=-1.0 is outside \(0, inf\)",
        rf"{d}/pool_bad.jsonl:2: prompt\[0\].role: the prompt must not end with an assistant message",
        rf"{d}/prefs_bad.jsonl:4: rejected: missing",
        rf"{d}/prefs_bad.jsonl:6: json: malformed JSON",
        rf"{d}/human_sft_bad.jsonl:2: messages\[1\].content: must be a string, got NoneType",
    ]
    for pattern in expected:
        assert any(re.match(r"  " + pattern, line) for line in lines[1:]), (pattern, lines)
    assert not any("pool has" in line for line in lines), "a pool with a bad record is not also counted short"
    assert not (tmp_path / "runs").exists(), "the run folder is made only once the inputs are checked"

    write(d / "pool_ok.jsonl", [{"prompt": f"{i}+1="} for i in range(7)])  # 2 rounds x (3 + 2) = 10 wanted
    files["prompts"] = str(d / "pool_ok.jsonl")
    p = _pipeline(tmp_path, files, base, "rm={data.skip_invalid: true}")  # the RM skips (and counts) bad records
    with pytest.raises(PipelineError) as e:
        p.preflight()
    assert str(e.value).splitlines()[1:] == [
        f"  {d}/pool_ok.jsonl: the prompt pool has 7 prompts; 2 rounds x (rs_prompts 3 + pref_prompts 2) draw 10 "
        "(a prompt is never used twice): give more prompts, or fewer rounds or prompts per round",
        f"  {d}/human_sft_bad.jsonl:2: messages[1].content: must be a string, got NoneType",
    ]


def test_good_inputs_pass_the_preflight_and_count_what_was_checked(tmp_path, files, base, capsys):  # noqa: F811
    p = _pipeline(tmp_path, files, base, "rounds=1", "variants={dpo: [{train.seed: 0}, {train.seed: 1}]}")
    p.preflight()
    records = sum(len(Path(f).read_text().splitlines()) for f in (files["prompts"], *files["preferences"],
                  *files["sft"], files["eval_pairs"], files["eval_sft"], files["eval_prompts"]))  # fmt: skip
    assert f"pipeline: preflight: 6 data files ({records} records) and 4 training run configs checked" in (
        capsys.readouterr().out
    )  # rm, sft, 2 dpo variants; no pre-training (a base)


def test_the_start_reads_prompts_as_the_sampling_job_does(tmp_path):
    """The pool's records are checked at start by files.prompt_record, the sampling job's by sample.py
    read_prompts: the same error for each bad record, the same prompt for a good one."""
    from llama_posttrain.data.schema import ValidationError
    from llama_posttrain.data.tasks.files import prompt_record
    from llama_posttrain.jobs.sampling import read_prompts

    bad = [[1, 2], {"text": "hi"}, {"prompt": ""}, {"prompt": "hi", "messages": []}, {"prompt": [{"role": "bot"}]},
           {"prompt": [{"role": "user", "content": None}]}, {"prompt": [{"role": "assistant", "content": "a"}]}]  # fmt: skip
    for i, record in enumerate(bad):
        path = write(tmp_path / f"p{i}.jsonl", [record])
        with pytest.raises(ValidationError) as job:
            read_prompts(path)
        with pytest.raises(ValidationError) as start:
            prompt_record(record, f"{path}:1")
        assert str(start.value) == str(job.value)
    good = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    assert prompt_record(good, "x:1") == read_prompts(write(tmp_path / "good.jsonl", [good]))[0]["messages"]


@pytest.mark.parametrize("config", ["experiments/quickstart/pipeline.yaml", "experiments/iterative/pipeline.yaml"])
def test_the_repositorys_pipeline_configs_pass_the_preflight(tmp_path, config):
    ROOT = Path(__file__).parent.parent
    Pipeline(load_pipeline_config(str(ROOT / config), [f"root={tmp_path}"])).preflight()


# ------------------------------------------------------------------ a stage that drops most of its work stops


class Sampler(Recording):
    """Runs only the sampling jobs, as stand-ins: every prompt gets `finished` samples that end their turn (the
    rest reach no stop token), and an SFT record or a pair when it has one; the training jobs are recorded."""

    def __init__(self, finished: list[int], k: int):
        super().__init__()
        self.finished, self.k = finished, k

    def run(self, job):
        super().run(job)  # recorded; a training run's model folder made
        if not job.script.endswith("sample.py"):
            return
        arg = job_config(job)
        prompts = Path(arg.prompts).read_text().splitlines()
        keep = [json.loads(line) for line, n in zip(prompts, self.finished) if n]
        dropped = {"unfinished": sum(self.k - n for n in self.finished[: len(prompts)])}
        dropped |= {"no_sft_record": len(prompts) - len(keep)} if len(prompts) > len(keep) else {}
        write(Path(arg.out_sft), [{"id": r["id"], "messages": [_user_message(0), {"role": "assistant",
              "content": "1"}], "score": 1.0} for r in keep])  # fmt: skip
        write(Path(arg.out_pairs), [])
        write(Path(arg.out_sets), [])
        Path(arg.out_report).write_text(json.dumps({"dropped": dropped}))


def test_a_stage_that_drops_most_of_its_samples_stops_naming_the_drop_and_the_keys(tmp_path, files):  # noqa: F811
    r, _ = recipe(tmp_path, files, "k=4")
    r.launcher = Sampler([1, 1, 3], k=4)  # 3 prompts x 4 samples: 3 + 3 + 1 = 7 reach no stop token
    r.stage(0, "data", r.make_data)
    with pytest.raises(StageError) as e:
        r.stage(1, "rs", r.rejection_sampling, tmp_path / "policy", tmp_path / "rm")
    share = 7 / 12  # > max_dropped 0.5
    assert re.search(
        rf"3 SFT records from 3 prompts x 4 samples .*: 7 of 12 samples \({share:.0%}\) were dropped, more than "
        r"max_dropped 0\.5; the most: 7 samples that reached no stop token within max_new_tokens 8: a larger "
        r"max_new_tokens .*Not marked done\. To go on: .*`from_stage=round_1/rs`.* a larger `max_dropped` \(now 0\.5",
        str(e.value),
    ), str(e.value)
    assert not (tmp_path / "run" / "round_1" / "rs" / "DONE").exists()
    jobs = len(r.launcher.jobs)
    r.cfg.max_dropped = 0.6  # a loss accepted knowingly: the same samples, no new job
    assert r.stage(1, "rs", r.rejection_sampling, tmp_path / "policy", tmp_path / "rm")["records"] == 3
    assert len(r.launcher.jobs) == jobs and (tmp_path / "run" / "round_1" / "rs" / "DONE").is_file()


def test_prompts_without_a_pair_stop_the_preference_stage_naming_the_reason(tmp_path, files):  # noqa: F811
    from test_pipeline_run_folder import _sampled

    r, _ = recipe(tmp_path, files, "pref_prompts=5")
    r.stage(0, "data", r.make_data)
    d = tmp_path / "run" / "round_1" / "pref"
    _sampled(d, 5, sampled_pairs=[{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2)  # 2 of 5: 3 lost
    report = json.loads((d / "sample_report.json").read_text())
    (d / "sample_report.json").write_text(json.dumps({"dropped": {**report["dropped"], "no_pair_tied_scores": 3}}))
    with pytest.raises(StageError, match=r"2 preference pairs from 5 prompts x 8 samples .*: 3 of 5 prompts \(60%\) "
                       r"gave no pair, more than max_dropped 0\.5; the most: 3 prompts whose samples left all scored "
                       r"the same: no pair: a larger k or temperature"):  # fmt: skip
        r.stage(1, "pref", r.new_pairs, tmp_path / "sft", tmp_path / "rm")
    assert not (d / "DONE").exists()


def test_no_finished_sample_stops_at_rejection_sampling_and_sft_never_trains_on_the_human_files_alone(
    tmp_path,
    files,  # noqa: F811
):
    """The issue's run: a base that never stops. Rejection sampling stops with the key to raise; no SFT job
    (which would have trained on the human SFT files alone) is started."""
    r, _ = recipe(tmp_path, files, "k=4", "rs_prompts=3")
    r.launcher = Sampler([0, 0, 0], k=4)
    r.eval_job = lambda *args, **kw: {}  # no evaluation jobs here
    with pytest.raises(StageError, match=r"^\[round 1\] rs: .*0 SFT records from 3 prompts x 4 samples .*12 of 12 "
                       r"samples \(100%\) were dropped.*a larger max_new_tokens.*Not marked done: SFT would have no "
                       r"rejection-sampled record\. To go on: .*`from_stage=round_1/rs`"):  # fmt: skip
        r.run()
    scripts = [job.script.rsplit("/", 1)[-1] for job in r.launcher.jobs]
    assert scripts == ["rm.py", "sample.py"], scripts  # the RM (one model: its average a copy), the samples; no sft


def test_every_drop_names_keys_that_exist():
    from llama_posttrain.data.drops import DROPS, KNOBS
    from llama_posttrain.driver.pipeline_config import Cleaning, PipelineConfig

    assert set(KNOBS) == set(DROPS)
    keys = set(PipelineConfig.__dataclass_fields__)
    for knob in KNOBS.values():
        for name in re.findall(r"cleaning\.(\w+)", knob):
            assert name in Cleaning.__dataclass_fields__, knob
        for name in re.findall(r"\b(max_new_tokens|temperature|k|max_dropped|\w+_prompts)\b", knob):
            assert name in keys, knob


# ------------------------------------------------------------------ from_stage: redo with changed sampling keys


def test_from_stage_redoes_that_stage_and_the_later_ones_with_changed_sampling_keys(tmp_path, capsys):
    run = tmp_path / "runs" / "micro"
    Pipeline(load_pipeline_config(_micro(tmp_path))).check_run_folder()  # MICRO: max_new_tokens 6, rounds 1
    record = (run / "pipeline.yaml").read_bytes()
    for stage in ("round_0/data", "round_0/pretrain", "round_1/rm", "round_1/rs"):
        (run / stage).mkdir(parents=True)
        (run / stage / "DONE").write_text("{}")
    (run / "round_1" / "sft").mkdir()  # stopped, not done
    (run / "summary.json").write_text("{}")

    with pytest.raises(PipelineError, match=r"(?s)differing:\n  max_new_tokens: 6 there, 12 now\nmax_new_tokens: "
                       r"sampling keys, .*add `from_stage=round_<k>/<stage>`.*new `name`"):  # fmt: skip
        Pipeline(load_pipeline_config(_micro(tmp_path), ["max_new_tokens=12"])).check_run_folder()
    for bad, why in (("round_2/rs", "is not a stage of this config's 1 round"), ("round_1/eval", "is not a stage")):
        with pytest.raises(PipelineError, match=rf"^override 'from_stage={bad}': from_stage: '{bad}' {why}"):
            load_pipeline_config(_micro(tmp_path), [f"from_stage={bad}"])

    redo = ["from_stage=round_1/rs", "max_new_tokens=12", "cleaning={dedup: true}"]
    Pipeline(load_pipeline_config(_micro(tmp_path), redo)).check_run_folder()
    assert sorted(str(p.relative_to(run)) for p in run.glob("round_*/*")) == [
        "round_0/data", "round_0/pretrain", "round_1/rm",
    ]  # fmt: skip
    assert sorted(str(p.relative_to(run / "redo_1")) for p in (run / "redo_1").rglob("*")) == [
        "round_1", "round_1/rs", "round_1/rs/DONE", "round_1/sft", "summary.json",
    ]  # fmt: skip
    (entry,) = yaml.safe_load((run / "redo.yaml").read_text())
    assert entry["from_stage"] == "round_1/rs" and entry["moved_to"] == "redo_1"
    assert entry["changed"] == {"max_new_tokens": {"was": 6, "now": 12}, "cleaning.dedup": {"was": "<absent>",
                                "now": True}}  # fmt: skip
    assert (run / "pipeline.yaml").read_bytes() == record, "the record of the first start was rewritten"
    out = capsys.readouterr().out
    assert "from_stage=round_1/rs: max_new_tokens 6 -> 12, cleaning.dedup '<absent>' -> True; moved round_1/rs, " in out
    assert "the stages before round_1/rs keep their evaluations, made with max_new_tokens 6" in out

    (run / "round_1" / "rs").mkdir()  # the redo's stage, done since: the same command goes on, moving nothing
    (run / "round_1" / "rs" / "DONE").write_text("{}")
    Pipeline(load_pipeline_config(_micro(tmp_path), redo)).check_run_folder()
    assert (run / "round_1" / "rs" / "DONE").is_file() and not (run / "redo_2").exists()
    assert "from_stage=round_1/rs: redo 1 of " in capsys.readouterr().out
    Pipeline(load_pipeline_config(_micro(tmp_path), redo[1:])).check_run_folder()  # the redo's keys: the record's
    with pytest.raises(PipelineError, match=r"max_new_tokens: 12 there, 6 now"):  # the first start's: not anymore
        Pipeline(load_pipeline_config(_micro(tmp_path), ["cleaning={dedup: true}"])).check_run_folder()
