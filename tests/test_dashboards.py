"""The wandb dashboards, offline and without wandb: a recording stand-in for the `wandb` module
(sys.modules) keeps every init, define_metric, log and table. Stage runs log under train/ and eval/ with
TRL's names while metrics.jsonl keeps the project's keys; the recipe puts every stage run in the pipeline
run's group with the stage as job type; the pipeline's own run logs the results over rounds, the summary
table and the rejection-sampling tables."""

import json
import sys
import types

import pytest
from test_recipe import files  # noqa: F401 (the fixture)

from llama_posttrain.train.config import LoggingSection
from llama_posttrain.train.logger import Logger, read_metrics


class Table:
    def __init__(self, columns, data):
        self.columns, self.data = list(columns), [list(row) for row in data]


class Histogram:
    def __init__(self, values):
        self.values = list(values)


class Run:
    def __init__(self, **init):
        self.init, self.defined, self.logged, self.finished = init, [], [], False

    def define_metric(self, name, **kw):
        self.defined.append((name, kw))

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


@pytest.fixture
def wandb(monkeypatch):
    """A stand-in `wandb` module; `.runs` holds every run it started."""
    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kw):
        module.runs.append(Run(**kw))
        return module.runs[-1]

    module.init, module.Table, module.Histogram = init, Table, Histogram
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def logger(tmp_path, kind, resume_step=None, **logging):
    cfg = LoggingSection(wandb="offline", progress=False, **logging)
    return Logger(tmp_path, cfg, {"train": {}, kind: {}}, True, 3, resume_step)


DPO_STEP = {
    "loss": 0.69, "rewards/chosen": 0.1, "rewards/rejected": -0.1, "rewards/margins": 0.2, "rewards/accuracies": 0.5,
    "logps/chosen": -10.0, "logps/rejected": -12.0, "logits/chosen": -0.3, "logits/rejected": -0.4,
    "token_accuracy": 0.4, "nll": 1.5, "grad_norm": 1.0, "lr": 1e-4, "tokens": 100,
    "tokens_per_s": 1000.0, "tokens_per_s_per_gpu": 500.0, "peak_memory_gib": 0.0, "skipped_steps": 0,
}  # fmt: skip


def test_stage_runs_log_train_and_eval_namespaces_with_trls_names(tmp_path, wandb):
    log = logger(tmp_path, "dpo", group="quickstart", job_type="dpo", name="round_1/dpo/variant_0")
    log.log(1, DPO_STEP)
    log.log(2, DPO_STEP, epoch=0.5)
    log.log(2, {"eval/loss": 0.6, "eval/nll": 1.4, "eval/rewards/accuracies": 0.7, "eval/examples": 8})
    log.finish()
    (run,) = wandb.runs
    assert {k: run.init[k] for k in ("group", "job_type", "name", "mode")} == {
        "group": "quickstart", "job_type": "dpo", "name": "round_1/dpo/variant_0", "mode": "offline"
    }  # fmt: skip
    assert run.defined == [
        ("train/global_step", {}),
        ("train/*", {"step_metric": "train/global_step"}),
        ("eval/*", {"step_metric": "train/global_step"}),
    ]
    assert run.finished
    (s1, first), (_, second), (s3, ev) = run.logged
    assert set(first) == {
        "train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
        "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected", "train/logits/chosen",
        "train/logits/rejected", "train/mean_token_accuracy", "train/nll",
        "train/grad_norm", "train/learning_rate", "train/tokens", "train/tokens_per_s", "train/tokens_per_s_per_gpu",
        "train/peak_memory_gib", "train/skipped_steps", "train/global_step", "train/num_tokens",
    }  # fmt: skip
    assert set(second) == set(first) | {"train/epoch"}
    assert first["train/learning_rate"] == 1e-4 and first["train/nll"] == 1.5  # nll_loss: only TRL's (token) NLL
    assert (s1, first["train/global_step"], first["train/num_tokens"]) == (1, 1, 100)
    assert second["train/num_tokens"] == 200  # cumulative, where `tokens` is the step's
    assert "train/epoch" not in first and second["train/epoch"] == 0.5  # where the loop gives it
    assert s3 == 2 and ev == {
        "eval/loss": 0.6, "eval/nll": 1.4, "eval/rewards/accuracies": 0.7, "eval/examples": 8,
        "train/global_step": 2, "train/num_tokens": 200,
    }  # fmt: skip
    # metrics.jsonl keeps the project's own keys
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 2]
    assert records[0] == {"step": 1, **DPO_STEP} and "eval/nll" in records[2]


def test_rm_and_sft_names(tmp_path, wandb):
    rm = logger(tmp_path / "rm", "rm")
    rm.log(1, {"loss": 0.5, "accuracy": 0.75, "accuracy/better": 1.0, "margin_mean": 0.3, "reward_mean": 0.1,
               "reward_std": 0.2, "reward_min": -0.5, "reward_max": 0.9, "lr": 1e-5, "tokens": 10})  # fmt: skip
    rm.log(1, {"eval/accuracy": 0.7, "eval/margin_mean": 0.2, "eval/reward_mean": 0.0})
    sft = logger(tmp_path / "sft", "sft")
    sft.log(4, {"loss": 1.0, "nll": 1.0, "ppl": 2.7, "token_accuracy": 0.25, "lr": 1e-3, "tokens": 50,
                "target_tokens": 20})  # fmt: skip
    (_, train), (_, ev) = wandb.runs[0].logged
    assert {k for k in train if k not in ("train/global_step", "train/num_tokens")} == {
        "train/loss", "train/accuracy", "train/accuracy/better", "train/margin", "train/mean_reward",
        "train/reward_std", "train/min_reward", "train/max_reward", "train/learning_rate", "train/tokens",
    }  # fmt: skip
    assert (train["train/min_reward"], train["train/max_reward"]) == (-0.5, 0.9)
    assert set(ev) == {"eval/accuracy", "eval/margin", "eval/mean_reward", "train/global_step", "train/num_tokens"}
    ((step, logged),) = wandb.runs[1].logged
    assert logged["train/nll"] == 1.0 and logged["train/target_tokens"] == 20  # SFT's NLL keeps its name
    assert logged["train/mean_token_accuracy"] == 0.25 and "train/token_accuracy" not in logged
    assert step == 4 and logged["train/num_tokens"] == 200  # steps 1-3 not logged (log_every 4): counted as 4's


def test_eval_distributions_go_to_wandb_as_histograms_not_to_metrics_jsonl(tmp_path, wandb):
    """The RM's eval: per-pair rewards (loop Objective.collect, lists) become histograms on the dashboard;
    metrics.jsonl and the console line keep the scalars."""
    log = logger(tmp_path, "rm")
    ev = {"eval/loss": 0.5, "eval/reward_max": 1.5, "eval/reward_min": -0.5, "eval/rewards_chosen": [0.5, 1.5],
          "eval/rewards_rejected": [-0.5, 0.0], "eval/empty": []}  # fmt: skip
    log.log(2, ev)
    assert "rewards" not in log._line(2, ev)
    ((_, logged),) = wandb.runs[0].logged
    histograms = {k: v.values for k, v in logged.items() if isinstance(v, Histogram)}
    assert histograms == {"eval/rewards_chosen": [0.5, 1.5], "eval/rewards_rejected": [-0.5, 0.0]}  # none if empty
    assert (logged["eval/max_reward"], logged["eval/min_reward"]) == (1.5, -0.5)
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 2, "eval/loss": 0.5, "eval/reward_max": 1.5, "eval/reward_min": -0.5}
    ]


def test_eval_histograms_in_real_offline_run_files(tmp_path):
    pytest.importorskip("wandb")
    from test_train import read_wandb_history

    log = logger(tmp_path, "rm")
    log.log(1, {"eval/loss": 0.5, "eval/rewards_chosen": [0.5, 1.5, 1.0], "eval/rewards_rejected": [-0.5, 0.0, 0.25]})
    log.finish()
    (file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    (row,) = read_wandb_history(file)
    assert row["eval/loss"] == 0.5
    for key, values in (("eval/rewards_chosen", [0.5, 1.5, 1.0]), ("eval/rewards_rejected", [-0.5, 0.0, 0.25])):
        assert row[f"{key}/_type"] == "histogram" and sum(row[f"{key}/values"]) == len(values)
        assert (min(row[f"{key}/bins"]), max(row[f"{key}/bins"])) == (min(values), max(values))


def test_a_resumed_run_counts_tokens_on_from_its_kept_records(tmp_path, wandb):
    first = logger(tmp_path, "sft")
    for step in (1, 2, 3):
        first.log(step, {"loss": 1.0, "lr": 1e-3, "tokens": 10 * step})
    again = logger(tmp_path, "sft", resume_step=2)  # step 3 is dropped: it is logged again
    again.log(3, {"loss": 1.0, "lr": 1e-3, "tokens": 30})
    assert wandb.runs[1].logged[0][1]["train/num_tokens"] == 10 + 20 + 30


def test_wandb_is_not_imported_when_disabled(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import would fail
    log = Logger(tmp_path, LoggingSection(wandb="disabled", progress=False), {"sft": {}}, True, 3, None)
    log.log(1, {"loss": 1.0, "lr": 1e-3, "tokens": 3})
    log.finish()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0, "lr": 1e-3, "tokens": 3}]


def test_the_recipe_puts_each_stage_run_in_the_pipeline_group(tmp_path, files, wandb):  # noqa: F811
    from test_recipe import args_of, recipe
    from test_train import QUICK

    from llama_posttrain.train.config import parse_args
    from llama_posttrain.train.rm import RMConfig

    r, launcher = recipe(tmp_path, files, "variants={rm: [{optim.lr: 1.0e-5}, {optim.lr: 2.0e-5}]}")
    r.stage_config_file = {"rm": str(QUICK / "rm.yaml")}
    d = tmp_path / "run" / "round_2" / "rm"
    r.train("rm", d, {"model.checkpoint": str(tmp_path / "base")}, {}, r.cfg.variants["rm"])
    training = [job for job in launcher.jobs if job.script == "llama_posttrain/train/rm.py"]
    assert [(args_of(j)["logging.group"], args_of(j)["logging.job_type"], args_of(j)["logging.name"])
            for j in training] == [("run", "rm", "round_2/rm/variant_0"), ("run", "rm", "round_2/rm/variant_1")]  # fmt: skip
    cfg = parse_args(RMConfig, [*training[1].args, "logging.wandb=offline"])  # what the stage run reads
    Logger(tmp_path / "stage", cfg.logging, {"rm": {}}, True, 3, None)
    (run,) = wandb.runs
    assert (run.init["group"], run.init["job_type"], run.init["name"]) == ("run", "rm", "round_2/rm/variant_1")


def test_the_dashboard_follows_the_stage_configs_logging():
    from llama_posttrain.driver.report import wandb_settings

    off, offline = {"logging": {"wandb": "disabled"}}, {"logging": {"wandb": "offline", "project": "p"}}
    assert wandb_settings({"rm": off, "sft": off, "dpo": off}, {}) is None  # the quickstart's
    assert wandb_settings({"rm": off, "sft": off, "dpo": offline}, {}) == {"mode": "offline", "project": "p"}
    online = {"rm": {"logging.wandb": "online", "logging.project": "q"}}
    assert wandb_settings({"rm": off, "sft": off, "dpo": off}, online) == {"mode": "online", "project": "q"}
    assert wandb_settings({}, {}) == {"mode": "offline", "project": LoggingSection().project}  # the defaults


def write_lines(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_pipeline_run_logs_rounds_the_summary_and_the_sampling_tables(tmp_path, wandb):
    from llama_posttrain.driver.report import SAMPLE_COLUMNS, write_report

    folder = tmp_path / "quickstart"
    user = [{"role": "user", "content": "1+1="}]
    write_lines(folder / "round_1" / "rs" / "sets.jsonl", [
        {"prompt": user, "responses": ["2", "3", "2"], "finished": [True, True, False], "rm_scores": [0.5, 0.9, 0.7]},
        {"prompt": [{"role": "user", "content": "2+2="}], "responses": ["4", "5"], "finished": [True, True],
         "rm_scores": [0.1, 0.0]},
    ])  # fmt: skip
    write_lines(folder / "round_1" / "rs" / "sft.jsonl", [{"messages": [*user, {"role": "assistant", "content": "3"}]}])
    results = [
        {"round": 0, "stage": "data", "files": {}},
        {"round": 0, "stage": "pretrain", "task_accuracy": 0.5, "task_accuracy_sampled": 0.4},
        {"round": 1, "stage": "rm", "rm_accuracy": 0.8},
        {"round": 1, "stage": "rs", "rm_pick_accuracy": 0.6, "mean_best_score": 1.2, "records": 1},
        {"round": 1, "stage": "sft", "sft_loss": 0.9, "task_accuracy": 0.7, "task_accuracy_sampled": 0.6},
        {"round": 1, "stage": "dpo", "dpo_reward_accuracy": 0.75, "task_accuracy": 0.8, "task_accuracy_sampled": 0.7},
    ]
    settings = {"mode": "offline", "project": "p"}
    verify = lambda q, t: str(eval(q.rstrip("="))) == t  # noqa: E731
    write_report(folder, {"name": "quickstart"}, results, False, 1, 200, settings, verify)
    (run,) = wandb.runs
    assert {k: run.init[k] for k in ("project", "group", "job_type", "name", "mode")} == {
        "project": "p", "group": "quickstart", "job_type": "pipeline", "name": "quickstart/pipeline", "mode": "offline"
    }  # fmt: skip
    assert ("*", {"step_metric": "round"}) in run.defined and run.finished
    (s0, base), (s1, one) = run.logged
    assert (s0, base) == (0, {"round": 0, "pretrain/task_accuracy": 0.5, "pretrain/task_accuracy_sampled": 0.4})
    histograms = {k: v.values for k, v in one.items() if isinstance(v, Histogram)}
    assert histograms == {  # finished samples only
        "rs/rm_scores/picked": [0.9], "rs/rm_scores/not_picked": [0.5, 0.1, 0.0],
        "rs/rm_scores/right": [0.5, 0.1], "rs/rm_scores/wrong": [0.9, 0.0],
    }  # fmt: skip
    assert s1 == 1 and {k: v for k, v in one.items() if not isinstance(v, (Table, Histogram))} == {
        "round": 1, "rm/accuracy": 0.8, "rs/rm_pick_accuracy": 0.6, "rs/mean_best_score": 1.2, "rs/records": 1,
        "sft/loss": 0.9, "sft/task_accuracy": 0.7, "sft/task_accuracy_sampled": 0.6, "dpo/reward_accuracy": 0.75,
        "dpo/task_accuracy": 0.8, "dpo/task_accuracy_sampled": 0.7,
    }  # fmt: skip
    samples = one["round_1/rs/samples"]
    assert samples.columns == SAMPLE_COLUMNS
    assert samples.data == [
        [1, "1+1=", 0, "2", True, 0.5, False, True],
        [1, "1+1=", 1, "3", True, 0.9, True, False],  # the RM's pick, wrong
        [1, "1+1=", 2, "2", False, 0.7, False, True],
        [1, "2+2=", 0, "4", True, 0.1, False, True],  # no SFT record kept: no pick
        [1, "2+2=", 1, "5", True, 0.0, False, False],
    ]
    summary = one["summary"]
    assert summary.columns[:3] == ["round", "stage", "rm_accuracy"]
    assert [row[:2] for row in summary.data] == [[0, "pretrain"], [1, "rm"], [1, "rs"], [1, "sft"], [1, "dpo"]]
    assert summary.data[1][2] == 0.8


def test_the_pipeline_run_in_real_offline_run_files(tmp_path):
    """The same with wandb itself, offline: the run record's group / job type / name, the rounds' history
    and the sampling table's file, read back from the run folder."""
    pytest.importorskip("wandb")
    from test_train import read_wandb_history, read_wandb_records

    from llama_posttrain.driver.report import SAMPLE_COLUMNS, write_report

    folder = tmp_path / "quickstart"
    user = [{"role": "user", "content": "1+1="}]
    write_lines(folder / "round_1" / "rs" / "sets.jsonl",
                [{"prompt": user, "responses": ["2", "3"], "finished": [True, True], "rm_scores": [0.5, 0.9]}])  # fmt: skip
    write_lines(folder / "round_1" / "rs" / "sft.jsonl", [{"messages": [*user, {"role": "assistant", "content": "3"}]}])
    results = [
        {"round": 0, "stage": "pretrain", "task_accuracy": 0.5, "task_accuracy_sampled": 0.4},
        {"round": 1, "stage": "rm", "rm_accuracy": 0.8},
        {"round": 1, "stage": "rs", "rm_pick_accuracy": 0.6},
    ]
    settings = {"mode": "offline", "project": "p"}
    write_report(folder, {"name": "quickstart"}, results, False, 1, 200, settings, lambda q, t: t == "2")
    (file,) = folder.glob("wandb/offline-run-*/run-*.wandb")
    history = read_wandb_history(file)
    (run,) = [r.run for r in read_wandb_records(file) if r.WhichOneof("record_type") == "run"][:1]
    assert (run.run_group, run.job_type, run.display_name) == ("quickstart", "pipeline", "quickstart/pipeline")
    assert [(h["round"], h.get("rm/accuracy"), h.get("pretrain/task_accuracy")) for h in history] == [
        (0, None, 0.5),
        (1, 0.8, None),
    ]
    (table,) = folder.glob("wandb/offline-run-*/files/" + history[1]["round_1/rs/samples/path"])
    content = json.loads(table.read_text())
    assert content["columns"] == SAMPLE_COLUMNS
    assert content["data"] == [[1, "1+1=", 0, "2", True, 0.5, False, True], [1, "1+1=", 1, "3", True, 0.9, True, False]]


def test_the_pipeline_run_logs_the_greedy_generations_of_each_evaluated_model(tmp_path, wandb):
    """Each evaluation's `generations` (llama_posttrain/jobs/evaluate.py) in a table per round, and every round's in one
    table with the last round: the same prompts for the base, each SFT and each DPO model."""
    from llama_posttrain.driver.report import GENERATION_COLUMNS, write_report

    folder = tmp_path / "quickstart"

    def generations(stage_dir, name, answers):
        kept = [
            {"prompt": f"{i}+1=", "generation": a, "correct": float(a == str(i + 1))} for i, a in enumerate(answers)
        ]
        (folder / stage_dir).mkdir(parents=True, exist_ok=True)
        (folder / stage_dir / f"eval_{name}.json").write_text(json.dumps({"task_accuracy": 0.5, "generations": kept}))

    generations("round_0/pretrain", "base", ["7", "7"])
    generations("round_1/sft", "sft", ["1", "3"])
    generations("round_1/dpo", "dpo", ["1", "2"])
    (folder / "round_1" / "dpo" / "eval_dpo_variant_0.json").write_text(json.dumps({"generations": [{}]}))  # not read
    results = [
        {"round": 0, "stage": "pretrain", "task_accuracy": 0.0},
        {"round": 1, "stage": "rm", "rm_accuracy": 0.8},
        {"round": 1, "stage": "sft", "sft_loss": 0.9, "task_accuracy": 0.5},
        {"round": 1, "stage": "dpo", "dpo_reward_accuracy": 0.75, "task_accuracy": 1.0},
    ]
    write_report(folder, {"name": "quickstart"}, results, False, 1, 2, {"mode": "offline", "project": "p"})
    (_, base), (_, one) = wandb.runs[0].logged
    rows = [
        [0, "pretrain", "0+1=", "7", 0.0], [0, "pretrain", "1+1=", "7", 0.0],
        [1, "sft", "0+1=", "1", 1.0], [1, "sft", "1+1=", "3", 0.0],
        [1, "dpo", "0+1=", "1", 1.0], [1, "dpo", "1+1=", "2", 1.0],
    ]  # fmt: skip
    assert base["round_0/generations"].columns == GENERATION_COLUMNS and base["round_0/generations"].data == rows[:2]
    assert one["round_1/generations"].data == rows[2:]
    assert one["generations"].columns == GENERATION_COLUMNS and one["generations"].data == rows
    assert "generations" not in base
