"""The pipeline's report: summary.json (the config and every stage's results), summary.md (a table),
the plots (accuracy.png, rewards.png; matplotlib, `pip install -e '.[plots]'`) and, where the stage runs
log to wandb, the pipeline's own wandb run (`log_dashboard`: the results over rounds, the summary table,
the rejection-sampling tables, the greedy generations of each evaluated model), in the stage runs' group."""

from __future__ import annotations

import json
from pathlib import Path

from llama_posttrain.data.io import write_text
from llama_posttrain.train.recipe import EVAL_SIZE


def write_report(
    folder: Path, config: dict, results: list[dict], plots: bool, rounds: int, eval_prompts: int,
    dashboard: dict | None = None, verify=None,
) -> None:  # fmt: skip
    """dashboard: wandb_settings(...) of the stage runs (None: no wandb run); verify: the task's verifier."""
    summary = {"config": config, "stages": results}
    write_text(folder / "summary.json", json.dumps(summary, indent=1))
    table = summary_table(results)
    write_text(folder / "summary.md", table + "\n")
    print(table)
    if plots:
        plot(folder, results, rounds, eval_prompts)
    if dashboard is not None:
        log_dashboard(folder, config["name"], config, results, dashboard, verify)


def plot(folder: Path, results: list[dict], rounds: int, eval_prompts: int) -> None:
    from llama_posttrain.train.plots import HOW_TO_GET, have_matplotlib, line_chart

    if not have_matplotlib():
        print(f"plots: skipped (matplotlib is not installed); to get them: {HOW_TO_GET}, and rerun the pipeline")
        return
    drawn = []
    labels, series = accuracy_by_stage(results)
    if labels:  # a task with a verifier
        ylabel = f"fraction right ({eval_prompts} held-out prompts)"
        line_chart(folder / "accuracy.png", "Task accuracy by stage", labels, series, "stage", ylabel)
        drawn.append(folder / "accuracy.png")
    if rounds:
        labels, series = rewards_by_round(results, rounds)
        line_chart(folder / "rewards.png", "Reward accuracy by round", labels, series, "round", "fraction right")
        drawn.append(folder / "rewards.png")
    print("plots:", ", ".join(map(str, drawn)))


TABLE_COLUMNS = [
    "rm_accuracy", "rm_pick_accuracy", "mean_best_score", "sft_loss", "dpo_reward_accuracy", "task_accuracy",
    "task_accuracy_sampled", "nll", "rm_score",
]  # fmt: skip


def summary_table(results: list[dict]) -> str:
    """A markdown table: one row per stage (the data stage aside), one column per metric that some stage
    has (a task without a verifier has no task accuracy; the RM's score and NLL stand in)."""
    stages = [r for r in results if r["stage"] != "data"]
    columns = [c for c in TABLE_COLUMNS if any(isinstance(r.get(c), float) for r in stages)]
    lines = ["| round | stage | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for r in stages:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "" for c in columns]
        lines.append(f"| {r['round']} | {r['stage']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_label(result: dict) -> str:
    """ "base" for the pre-trained model, else round and stage: "R1 SFT", "R1 DPO"."""
    return "base" if result["stage"] == "pretrain" else f"R{result['round']} {result['stage'].upper()}"


def accuracy_by_stage(results: list[dict]) -> tuple[list[str], dict[str, list]]:
    """x labels and series of the task accuracy chart: every stage that made a model."""
    models = [r for r in results if "task_accuracy" in r]
    series = {
        "greedy": [r["task_accuracy"] for r in models],
        "sampled (temperature 1)": [r["task_accuracy_sampled"] for r in models],
    }
    return [stage_label(r) for r in models], series


def rewards_by_round(results: list[dict], rounds: int) -> tuple[list[str], dict[str, list]]:
    """x labels and series of the reward chart: per round, how often each reward signal ranks right."""

    def per_round(stage: str, key: str) -> list:
        return [
            next((r.get(key) for r in results if r["round"] == k and r["stage"] == stage), None)
            for k in range(1, rounds + 1)
        ]

    series = {
        f"reward model ({EVAL_SIZE} held-out pairs)": per_round("rm", "rm_accuracy"),
        f"DPO implicit reward ({EVAL_SIZE} held-out pairs)": per_round("dpo", "dpo_reward_accuracy"),
        "the RM's pick is right (rejection sampling)": per_round("rs", "rm_pick_accuracy"),
    }
    return [f"round {k}" for k in range(1, rounds + 1)], series


# ----------------------------------------------------------------------------- the dashboard (wandb)

# The pipeline run's charts, one point per round (round 0: the base): `<stage>/<metric>` of every stage result
# (a key naming its own stage is shortened: sft_loss -> sft/loss, rm_accuracy -> rm/accuracy).
DASHBOARD_KEYS = (
    "rm_accuracy", "rm_pick_accuracy", "sample_accuracy", "best_of_k_oracle", "mean_best_score", "sft_loss",
    "dpo_reward_accuracy", "task_accuracy", "task_accuracy_sampled", "nll", "rm_score", "records",
)  # fmt: skip
SAMPLE_COLUMNS = ["round", "prompt", "sample", "response", "finished", "rm_score", "picked", "right"]
GENERATION_COLUMNS = ["round", "stage", "prompt", "generation", "correct"]


def wandb_settings(stage_configs: dict, stage_overrides: dict) -> dict | None:
    """Where the pipeline's own run goes, from what the stage runs do: None when every stage's
    `logging.wandb` (the pipeline's stage overrides, else the stage config file, else the default) is
    disabled; else the mode (online if any stage is) and the first logging stage's project."""
    from llama_posttrain.train.config import LoggingSection

    default = LoggingSection()
    found = []
    for stage, kind in (("pretrain", "sft"), ("rm", "rm"), ("sft", "sft"), ("dpo", "dpo")):
        section = (stage_configs.get(kind) or {}).get("logging") or {}
        over = stage_overrides.get(stage) or {}
        mode = over.get("logging.wandb", section.get("wandb", default.wandb))
        if mode != "disabled":
            found.append((mode, over.get("logging.project", section.get("project", default.project))))
    if not found:
        return None
    return {"mode": "online" if any(m == "online" for m, _ in found) else "offline", "project": found[0][1]}


def by_round(results: list[dict]) -> dict[int, dict]:
    """{round: {"<stage>/<metric>": value}}: the numbers of the README's summary table, round by round."""
    out: dict[int, dict] = {}
    for r in results:
        if r["stage"] == "data":
            continue
        for key in DASHBOARD_KEYS:
            value = r.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                name = key.removeprefix(r["stage"] + "_")
                out.setdefault(r["round"], {})[f"{r['stage']}/{name}"] = value
    return out


def sample_rows(stage_dir: Path, rnd: int, verify=None, prompts: int = 4) -> list[list]:
    """The first `prompts` prompts of a sampling stage with their K samples: the response, whether it
    finished, its RM score, whether it is the pick (the SFT record kept), and (a verifier) whether it is right."""
    sets_file, sft_file = Path(stage_dir) / "sets.jsonl", Path(stage_dir) / "sft.jsonl"
    if not sets_file.is_file():
        return []
    lines = [line for line in sets_file.read_text().splitlines() if line.strip()][:prompts]
    picks = {}
    if sft_file.is_file():
        for line in sft_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                picks[json.dumps(record["messages"][:-1])] = record["messages"][-1]["content"]
    rows = []
    for line in lines:
        s = json.loads(line)
        question = s["prompt"][-1]["content"]
        pick = picks.get(json.dumps(s["prompt"]))
        picked = s["responses"].index(pick) if pick in s["responses"] else None
        for j, (text, finished, score) in enumerate(zip(s["responses"], s["finished"], s["rm_scores"])):
            right = bool(verify(question, text)) if verify is not None else None
            rows.append([rnd, question, j, text, bool(finished), float(score), j == picked, right])
    return rows


def generation_rows(folder: Path, results: list[dict]) -> dict[int, list[list]]:
    """{round: rows} of the greedy generations that each evaluated model (the base, SFT, DPO) kept of the
    first held-out prompts (llama_posttrain/train/evaluate.py `generations`, in round_<k>/<stage>/eval_<name>.json): the
    same prompts every time, so the rows show the policy change over stages and rounds. `correct`: the
    verifier's score (None without a verifier)."""
    out: dict[int, list[list]] = {}
    for r in results:
        name = {"pretrain": "base", "sft": "sft", "dpo": "dpo"}.get(r["stage"])
        path = Path(folder) / f"round_{r['round']}" / r["stage"] / f"eval_{name}.json"
        if name is None or not path.is_file():
            continue
        for g in json.loads(path.read_text()).get("generations", []):
            out.setdefault(r["round"], []).append([r["round"], r["stage"], g["prompt"], g["generation"], g["correct"]])
    return out


def score_groups(stage_dir: Path, verify=None) -> dict[str, list[float]]:
    """The RM's scores of a sampling stage's finished samples (every prompt), split into the picks and the
    rest, and (a verifier) the right and the wrong ones: the histograms of how the RM tells them apart."""
    sets_file, sft_file = Path(stage_dir) / "sets.jsonl", Path(stage_dir) / "sft.jsonl"
    if not sets_file.is_file():
        return {}
    picks = set()
    if sft_file.is_file():
        for line in sft_file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                picks.add((json.dumps(record["messages"][:-1]), record["messages"][-1]["content"]))
    out: dict[str, list[float]] = {"picked": [], "not_picked": []}
    if verify is not None:
        out |= {"right": [], "wrong": []}
    for line in sets_file.read_text().splitlines():
        if not line.strip():
            continue
        s = json.loads(line)
        prompt = json.dumps(s["prompt"])
        for text, finished, score in zip(s["responses"], s["finished"], s["rm_scores"]):
            if not finished:
                continue
            out["picked" if (prompt, text) in picks else "not_picked"].append(float(score))
            if verify is not None:
                out["right" if verify(s["prompt"][-1]["content"], text) else "wrong"].append(float(score))
    return {k: v for k, v in out.items() if v}


def log_dashboard(folder: Path, group: str, config: dict, results: list[dict], settings: dict, verify=None) -> None:
    """The pipeline's own wandb run (job type "pipeline", in the stage runs' group): per round (the x-axis)
    every stage's results (RM accuracy, RM pick accuracy, SFT loss, DPO reward accuracy, task accuracy
    greedy and sampled, ...), the summary table, and per rejection-sampling stage a table of a few prompts
    with their K samples, RM scores, the pick and (a verifier) which were right, and histograms of the RM's
    scores of its finished samples: the picks and the rest, the right and the wrong ones (score_groups); per
    round a table of the greedy generations of the round's models on the first held-out prompts, and with
    the last round all of them in one table (generation_rows)."""
    import wandb  # only when logging to it

    run = wandb.init(
        project=settings["project"], group=group, job_type="pipeline", name=f"{group}/pipeline",
        dir=str(folder), mode=settings["mode"], config=config,
    )  # fmt: skip
    try:
        run.define_metric("round")
        run.define_metric("*", step_metric="round")
        samples = {
            r["round"]: sample_rows(folder / f"round_{r['round']}" / "rs", r["round"], verify)
            for r in results
            if r["stage"] == "rs"
        }
        generations = generation_rows(folder, results)
        stages = [r for r in results if r["stage"] != "data"]
        columns = [c for c in TABLE_COLUMNS if any(isinstance(r.get(c), float) for r in stages)]
        data = [[r["round"], r["stage"], *[r.get(c) if isinstance(r.get(c), float) else None for c in columns]]
                for r in stages]  # fmt: skip
        rounds = sorted(by_round(results).items()) or [(0, {})]
        for i, (rnd, values) in enumerate(rounds):
            row = {"round": rnd, **values}
            if samples.get(rnd):
                row[f"round_{rnd}/rs/samples"] = wandb.Table(columns=SAMPLE_COLUMNS, data=samples[rnd])
            for group, scores in score_groups(folder / f"round_{rnd}" / "rs", verify).items():
                row[f"rs/rm_scores/{group}"] = wandb.Histogram(scores)
            if generations.get(rnd):
                row[f"round_{rnd}/generations"] = wandb.Table(columns=GENERATION_COLUMNS, data=generations[rnd])
            if i == len(rounds) - 1:  # the README's table, with the last round's row
                row["summary"] = wandb.Table(columns=["round", "stage", *columns], data=data)
                every = [g for k in sorted(generations) for g in generations[k]]
                if every:  # every round's generations side by side
                    row["generations"] = wandb.Table(columns=GENERATION_COLUMNS, data=every)
            run.log(row, step=rnd)
    finally:
        run.finish()
