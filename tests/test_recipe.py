"""The recipe on the user's files (llama_posttrain/data/tasks/files.py), without running a model: the jobs it plans are
recorded by a stand-in launcher. Prompts are drawn from the pool in order and never twice; the RM trains on
all preference data so far, SFT on all rejection-sampled data plus the human files (weighted), DPO on the
round's pairs; the human annotator stops for labels and continues from them."""

import json

import pytest
from test_train import QUICK

from llama_posttrain.driver.launch import Launcher
from llama_posttrain.driver.pipeline_config import PipelineError, load_pipeline_config
from llama_posttrain.driver.recipe import Recipe
from llama_posttrain.driver.stages import StageError, WaitingForLabels


class Recording(Launcher):
    """Runs nothing: keeps each job (its script and arguments)."""

    def __init__(self):
        super().__init__("local")
        self.jobs = []

    def run(self, job):
        self.jobs.append(job)
        if job.run_dir is not None:  # a training run's export: the recipe averages it (one model: copies it)
            (job.run_dir / "model").mkdir(parents=True, exist_ok=True)
            (job.run_dir / "model" / "config.json").write_text("{}")


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    pool = [{"prompt": f"{i}+1="} for i in range(10)]
    pair = {"prompt": "1+1=", "chosen": "2", "rejected": "3", "strength": "significantly_better"}
    pairs = [{**pair, "prompt": f"{i}+1=", "chosen": str(i + 1)} for i in range(32)]
    return {
        "prompts": write(d / "pool.jsonl", pool),
        "preferences": [write(d / "prefs.jsonl", [pair, *pairs])],
        "sft": [write(d / "human_sft.jsonl", [{"messages": [{"role": "user", "content": f"{i}+1="},
                                                             {"role": "assistant", "content": str(i + 1)}]}
                                              for i in range(8)])],
        "eval_pairs": write(d / "eval_pairs.jsonl", [pair]),
        "eval_prompts": write(d / "eval_prompts.jsonl", pool[:2]),
        "eval_sft": str(d / "human_sft.jsonl"),
    }  # fmt: skip


def recipe(tmp_path, files, *overrides):
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    (base / "config.json").write_text("{}")
    cfg = load_pipeline_config(
        None,
        [f"root={tmp_path}", "name=run", "task=files", f"task_args={json.dumps(files)}", "rs_prompts=3",
         "pref_prompts=2", "rounds=2", f"base={base}", *overrides],
    )  # fmt: skip
    launcher = Recording()
    r = Recipe(cfg, _task(cfg), _chat(), tmp_path / "run", launcher, {})
    r.stage_config_file = {kind: QUICK / f"{kind}.yaml" for kind in ("rm", "sft", "dpo")}  # its paths: the pipeline's
    return r, launcher


def _task(cfg):
    from llama_posttrain.driver.pipeline_config import task_from_config

    return task_from_config(cfg.task, cfg.task_args)


def _chat():
    from llama_posttrain.llama.chat import ChatFormat
    from llama_posttrain.llama.tokenizer import load_tokenizer

    return ChatFormat(load_tokenizer())


def args_of(job) -> dict:
    """A training job's key=value overrides as a dict."""
    return {a.split("=", 1)[0]: json.loads(a.split("=", 1)[1]) for a in job.args if "=" in a}


def test_the_files_task_needs_a_base_and_a_pool(tmp_path, files):
    with pytest.raises(PipelineError, match=r"task 'files' has no pre-training corpus .*give `base:"):
        load_pipeline_config(None, ["task=files", f"task_args={json.dumps(files)}"])
    with pytest.raises(PipelineError, match=r"task_args: .*prompts: .*nope.jsonl does not exist"):
        load_pipeline_config(None, ["task=files", f"task_args={json.dumps({**files, 'prompts': 'nope.jsonl'})}"])
    with pytest.raises(PipelineError, match=r"annotator: task 'files' has no verifier: use rm or human"):
        load_pipeline_config(None, ["task=files", f"task_args={json.dumps(files)}", "annotator=verifier"])


def test_prompts_are_drawn_in_order_and_never_twice(tmp_path, files):
    r, _ = recipe(tmp_path, files)
    drawn = [r.fresh_prompts(k, split, n) for k in (1, 2) for split, n in (("rs", 3), ("pref", 2))]
    ids = [p["id"] for batch in drawn for p in batch]
    assert len(ids) == len(set(ids)) == 10  # the whole pool, each prompt once
    assert ids == [p["id"] for p in r.task.prompt_pool(0)]  # in the pool's (seeded) order
    r.cfg.rounds = 3
    with pytest.raises(StageError, match=r"the prompt pool has 10 prompts; round 3's rs needs prompts 11\.\.13"):
        r.fresh_prompts(3, "rs", 3)


def test_round_data_follows_llama3(tmp_path, files):
    r, launcher = recipe(tmp_path, files, "sft_weights={rejection_sampled: 1.0, human: 0.25}")
    r.stage(0, "data", r.make_data)
    run, base = tmp_path / "run", tmp_path / "base"
    for k in (1, 2):
        for stage in ("pref", "rs", "rm", "sft", "dpo"):
            (run / f"round_{k}" / stage).mkdir(parents=True, exist_ok=True)
        write(run / f"round_{k}" / "pref" / "pairs.jsonl", [{"prompt": "p", "chosen": f"a{k}", "rejected": "b"}])
        write(run / f"round_{k}" / "rs" / "sft.jsonl", [{"messages": [], "round": k}])
    r.eval_job = lambda *args, **kw: {}  # no evaluation jobs here
    r.train_rm(run / "round_2" / "rm", 2, base)
    r.train_sft(run / "round_2" / "sft", 2, base, rm=None)
    r.train_dpo(run / "round_2" / "dpo", 2, base, rm=None)
    rm, sft, dpo = launcher.jobs  # each training job; the average of its one model is a copy of it, no job
    assert all((run / "round_2" / stage / "model" / "config.json").is_file() for stage in ("rm", "sft", "dpo"))
    rm_data = [json.loads(line) for line in open(args_of(rm)["data.train"])]
    assert [p["chosen"] for p in rm_data] == ["2", *(str(i + 1) for i in range(32)), "a1"]  # seed + round 1's
    train = args_of(sft)["data.train"]
    assert train[0]["weight"] == 1.0 and train[1] == {"path": files["sft"][0], "weight": 0.25}
    assert [json.loads(line)["round"] for line in open(train[0]["path"])] == [1, 2]  # all rejection-sampled data
    assert args_of(dpo)["data.train"] == str(run / "round_2" / "pref" / "pairs.jsonl")  # this round's pairs only
    assert args_of(dpo)["data.eval"] == files["eval_pairs"]


def test_the_human_annotator_stops_for_labels_then_continues(tmp_path, files):
    r, launcher = recipe(tmp_path, files, "annotator=human")
    r.stage(0, "data", r.make_data)
    d = tmp_path / "run" / "round_1" / "pref"
    d.mkdir(parents=True)
    prompt = [{"role": "user", "content": "1+1="}]
    sets = [
        {
            "id": "a",
            "prompt": prompt,
            "responses": ["2", "", "3", "4", "9"],
            "finished": [True, True, True, True, False],
        },
        {"id": "b", "prompt": prompt, "responses": ["5", "5"], "finished": [True, True]},
        {"id": "c", "prompt": prompt, "responses": ["5", "6"], "finished": [True, False]},  # 1 usable sample
    ]
    write(d / "sets.jsonl", sets)
    (d / "prompts.jsonl").write_text("{}\n{}\n")
    (d / "sample_report.json").write_text(json.dumps({"dropped": {}}))  # the sampling job ran
    with pytest.raises(
        WaitingForLabels, match=rf"2 sets to label in {d / 'to_label.jsonl'} \(1 prompts with fewer than 2 usable"
    ):
        r.stage(1, "pref", r.new_pairs, tmp_path / "sft", tmp_path / "rm")
    assert not (d / "DONE").exists() and launcher.jobs == []  # the samples are not drawn again
    to_label = [json.loads(line) for line in (d / "to_label.jsonl").read_text().splitlines()]
    assert [(s["id"], s["responses"]) for s in to_label] == [("a", ["2", "3", "4"]), ("b", ["5", "5"])]  # usable only
    write(d / "labels.jsonl", [{"id": "a", "ranking": [1, 0, 2]}, {"id": "b", "scores": [1.0, 1.0]}])
    result = r.stage(1, "pref", r.new_pairs, tmp_path / "sft", tmp_path / "rm")
    pairs = [json.loads(line) for line in (d / "pairs.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("3", "4")]  # ranked best 1, worst 2
    assert result["records"] == 1 and result["dropped"] == {"no_pair": 1, "no_pair_fewer_than_2": 1}


@pytest.mark.slow
@pytest.mark.long
def test_a_files_pipeline_with_people_as_annotators_stops_for_labels_and_finishes(tmp_path, files):
    """The real jobs, 1 round on the user's files from a (random) base: the driver stops for labels,
    the labels are written, the same command finishes the round and the report."""
    import subprocess
    import sys

    import yaml
    from test_pipeline import MICRO, ROOT

    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    base_run = tmp_path / "base_run"  # a base that has learned to answer and end its turn
    sft = [
        sys.executable,
        str(ROOT / "llama_posttrain" / "train" / "sft.py"),
        "--config",
        str(ROOT / "experiments/quickstart/sft.yaml"),
    ]
    sft += ["model.preset=debug", "data.eval=null", "train.steps=60", "data.batch_size=32", "optim.lr=1e-2"]
    sft += [f"train.run_dir={base_run}", "logging.progress=false", "train.save_every=0"]
    assert subprocess.run(sft, cwd=ROOT, env=env, capture_output=True, timeout=600).returncode == 0
    base = base_run / "model"
    keep = ("nproc", "rm", "sft", "dpo", "k", "max_new_tokens")
    cfg = {key: MICRO[key] for key in keep} | {"name": "files", "root": str(tmp_path / "runs"), "rounds": 1}
    cfg |= {"task": "files", "task_args": files, "base": str(base), "annotator": "human"}
    cfg |= {"rs_prompts": 4, "pref_prompts": 4, "cleaning": {"dedup": True}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable,
        str(ROOT / "llama_posttrain" / "driver" / "pipeline.py"),
        "--config",
        str(tmp_path / "p.yaml"),
    ]
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    pref = tmp_path / "runs" / "files" / "round_1" / "pref"
    assert first.returncode != 0 and "pipeline: waiting for labels: " in first.stderr and str(pref) in first.stderr
    sets = [json.loads(line) for line in (pref / "to_label.jsonl").read_text().splitlines()]
    write(pref / "labels.jsonl", [{"id": s["id"], "scores": list(range(len(s["responses"])))} for s in sets])
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "[round 1] rs: done before, skipped" in second.stdout
    summary = json.loads((tmp_path / "runs" / "files" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["data", "pretrain", "rm", "rs", "sft", "pref", "dpo"]
    dpo = summary["stages"][-1]
    assert "rm_score" in dpo and "nll" in dpo and "task_accuracy" not in dpo  # no verifier: the RM's score
