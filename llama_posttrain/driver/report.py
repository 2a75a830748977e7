"""The pipeline's report: summary.json (the config and every stage's results), summary.md (a table),
the plots (accuracy.png, rewards.png; matplotlib, `pip install -e '.[plots]'`) and, where the stage runs
log to wandb, the pipeline's own wandb run (`log_dashboard`: the results over rounds, the summary table,
the rejection-sampling tables, the greedy generations of each evaluated model), in the stage runs' group."""

from __future__ import annotations

import json
import math
from pathlib import Path

from llama_posttrain.data.io import write_text


def write_report(
    folder: Path,
    config: dict,
    results: list[dict],
    plots: bool,
    rounds: int,
    eval_prompts: int,
    dashboard: dict | None = None,
    verify=None,
) -> None:
    """dashboard: wandb_settings(...) of the stage runs (None: no wandb run); verify: the task's verifier.
    eval_prompts: the config's, for results that do not carry their sample sizes (`n`, older runs)."""
    results = sample_sizes(folder, results)
    base_given = config.get("base") is not None
    summary = {"config": config, "stages": results}
    write_text(folder / "summary.json", json.dumps(summary, indent=1))
    table = summary_table(results, base_given)
    write_text(folder / "summary.md", table + "\n")
    print(table)
    if plots:
        plot(folder, results, rounds, eval_prompts)
    if dashboard is not None:
        log_dashboard(folder, config["name"], config, results, dashboard, verify, base_given)


def plot(folder: Path, results: list[dict], rounds: int, eval_prompts: int) -> None:
    """accuracy.png (a task with a verifier) and rewards.png (rounds): only the series that have values, with
    95% intervals as error bars where n is small (CI_BELOW); a chart with nothing to draw is not written."""
    from llama_posttrain.driver.plots import HOW_TO_GET, have_matplotlib, line_chart

    if not have_matplotlib():
        print(f"plots: skipped (matplotlib is not installed); to get them: {HOW_TO_GET}, and rerun the pipeline")
        return
    drawn, empty = [], []
    charts = [("accuracy.png", "Task accuracy by stage", "stage", accuracy_by_stage(results, eval_prompts))]
    if rounds:
        charts.append(("rewards.png", "Reward accuracy by round", "round", rewards_by_round(results, rounds)))
    for name, title, xlabel, (labels, series, errors) in charts:
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        if not labels or not series:
            empty.append(name)
            continue
        ylabel = "fraction right" if name == "rewards.png" else accuracy_ylabel(results, eval_prompts)
        line_chart(folder / name, title, labels, series, xlabel, ylabel, {k: errors[k] for k in series})
        drawn.append(str(folder / name))
    parts = [", ".join(drawn)] if drawn else []
    parts += [f"not drawn, no values: {', '.join(empty)}"] if empty else []
    print("plots:", "; ".join(parts))


# The summary table's columns: the metrics, then the counts (integers) of the sampling stages. A metric's n
# (its sample size: prompts, samples, pairs, records, tokens) is in its header when every row has the same,
# else in a line below; its 95% interval is in its cell where n < CI_BELOW.
TABLE_COLUMNS = [
    "rm_accuracy",
    "rm_pick_accuracy",
    "mean_best_score",
    "sft_loss",
    "dpo_reward_accuracy",
    "task_accuracy",
    "task_accuracy_sampled",
    "nll",
    "rm_score",
    "rm_score_last_rm",
    "records",
    "pairs",
    "dropped",
]
COUNTS = ("records", "pairs", "dropped")  # rs: SFT records kept; pref: pairs made; both: samples and prompts dropped
ACCURACIES = ("rm_accuracy", "rm_pick_accuracy", "dpo_reward_accuracy", "task_accuracy", "task_accuracy_sampled")
HEADERS = {"rm_score": "rm_score (the round's RM)", "rm_score_last_rm": "rm_score_last_rm (the last RM)"}
CI_BELOW = 500  # n under which a metric's 95% confidence interval is shown
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval of a proportion p of n trials (95% by default)."""
    center, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (center - half) / (1 + z * z / n), (center + half) / (1 + z * z / n)


def interval(r: dict, key: str) -> tuple[float, float] | None:
    """A row's 95% interval of `key` where n < CI_BELOW: Wilson's for an accuracy, mean +- z std / sqrt(n)
    for a mean whose terms' std is known; else None."""
    value, n = r.get(key), (r.get("n") or {}).get(key)
    if not isinstance(value, float) or not n or n >= CI_BELOW:
        return None
    if key in ACCURACIES:
        return wilson(value, n)
    std = (r.get("std") or {}).get(key)
    if std is None:
        return None
    return value - Z95 * std / math.sqrt(n), value + Z95 * std / math.sqrt(n)


def cell_value(r: dict, key: str):
    """A row's value of a table column: a metric (float), or a sampling stage's count (int)."""
    if key == "records":
        return r.get("records") if r["stage"] == "rs" else None
    if key == "pairs":
        return r.get("pairs", r.get("records")) if r["stage"] == "pref" else None
    if key == "dropped":
        dropped = r.get("dropped")
        return sum(dropped.values()) if isinstance(dropped, dict) and r["stage"] in ("rs", "pref") else None
    value = r.get(key)
    return value if isinstance(value, float) else None


def table_rows(results: list[dict]) -> list[dict]:
    """The rows of the summary table: every stage but the data stage."""
    return [r for r in results if r["stage"] != "data"]


def table_columns(stages: list[dict]) -> list[str]:
    """The columns some row has a value of."""
    return [c for c in TABLE_COLUMNS if any(cell_value(r, c) is not None for r in stages)]


def row_stage(r: dict, base_given: bool) -> str:
    """A row's stage: "base" for a model the config gave (`base:`), "pretrain" for one the recipe pre-trained."""
    return "base" if r["stage"] == "pretrain" and base_given else r["stage"]


def summary_table(results: list[dict], base_given: bool = False) -> str:
    """A markdown table: one row per stage (the data stage aside), one column per metric that some stage
    has (a task without a verifier has no task accuracy; the RM's score and NLL stand in) and the sampling
    stages' counts (records, pairs, dropped), then how large each metric's sample is (n) and what the
    brackets are."""
    stages = table_rows(results)
    columns = table_columns(stages)
    sizes = {
        c: {(r["round"], r["stage"]): (r.get("n") or {}).get(c) for r in stages if cell_value(r, c) is not None}
        for c in columns
        if c not in COUNTS
    }
    headers, notes = [], []
    for c in columns:
        header, known = HEADERS.get(c, c), {n for n in sizes.get(c, {}).values() if n is not None}
        if c in COUNTS or not known:  # a count, or results without their sample sizes (an older run's)
            headers.append(header)
        elif len(known) == 1 and None not in sizes[c].values():
            headers.append(f"{header} (n={known.pop()})")
        else:
            headers.append(header)
            each = ", ".join(f"{k} {stage} {'?' if n is None else n}" for (k, stage), n in sizes[c].items())
            notes.append(f"n of {c} by round and stage: {each}")
    lines = ["| round | stage | " + " | ".join(headers) + " |", "|---|---|" + "---:|" * len(columns)]
    shown_ci = False
    for r in stages:
        cells = []
        for c in columns:
            value = cell_value(r, c)
            if value is None:
                cells.append("")
            elif isinstance(value, int):
                cells.append(str(value))
            else:
                ci = interval(r, c)
                shown_ci |= ci is not None
                cells.append(f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
        lines.append(f"| {r['round']} | {row_stage(r, base_given)} | " + " | ".join(cells) + " |")
    if notes or shown_ci:
        lines.append("")
    lines += notes
    if shown_ci:
        lines.append(
            f"[a, b]: 95% confidence interval where n < {CI_BELOW} (Wilson's for accuracies, mean +- 1.96 std / "
            "sqrt(n) for means; a prompt's several samples count as independent, so those are too narrow)"
        )
    return "\n".join(lines)


def sample_sizes(folder: Path, results: list[dict]) -> list[dict]:
    """Each result with `n` (and `std`) for the metrics whose sizes the stage's files tell: an evaluation
    writes its own; rs and pref: the picks behind rm_pick_accuracy and mean_best_score (and the scores' std,
    from round_k/<stage>/sft.jsonl; rs without it: its records); sft: the eval examples behind sft_loss (its run's last `eval/examples`)."""
    from llama_posttrain.driver.stage_jobs import last_eval

    out = []
    for r in results:
        r, n, std = dict(r), dict(r.get("n") or {}), dict(r.get("std") or {})
        stage_dir = Path(folder) / f"round_{r['round']}" / r["stage"]
        sft = stage_dir / "sft.jsonl"
        if r["stage"] in ("rs", "pref") and ("rm_pick_accuracy" in r or "mean_best_score" in r):
            scores = None
            if sft.is_file():  # the picks behind both metrics (pref: the verifier's, one per prompt)
                scores = [json.loads(line).get("score") for line in sft.read_text().splitlines() if line.strip()]
            picks = len(scores) if scores is not None else r.get("records") if r["stage"] == "rs" else None
            for key in ("rm_pick_accuracy", "mean_best_score"):
                if key in r and picks is not None:
                    n.setdefault(key, picks)
            scores = [s for s in scores or [] if isinstance(s, (int, float))]
            if "mean_best_score" in r and "mean_best_score" not in std and len(scores) > 1:
                mean = sum(scores) / len(scores)
                std["mean_best_score"] = math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1))
        if r["stage"] == "sft" and "sft_loss" in r and "sft_loss" not in n:
            examples = last_eval(stage_dir / "variant_0", "examples") if (stage_dir / "variant_0").is_dir() else None
            if examples is not None:
                n["sft_loss"] = int(examples)
        if n:
            r["n"] = n
        if std:
            r["std"] = std
        out.append(r)
    return out


def stage_label(result: dict) -> str:
    """ "base" for the pre-trained model, else round and stage: "R1 SFT", "R1 DPO"."""
    return "base" if result["stage"] == "pretrain" else f"R{result['round']} {result['stage'].upper()}"


def sizes_text(values: list, what: str) -> str:
    """ "n=8 held-out pairs", or with sizes that differ by round "n=8, 10 held-out pairs"; "" if none is known."""
    known = list(dict.fromkeys(v for v in values if v is not None))
    return f"n={', '.join(map(str, known))} {what}" if known else ""


def accuracy_ylabel(results: list[dict], eval_prompts: int) -> str:
    models = [r for r in results if "task_accuracy" in r]
    prompts = [(r.get("n") or {}).get("task_accuracy", eval_prompts) for r in models]
    return f"fraction right ({sizes_text(prompts, 'held-out prompts')})"


def accuracy_by_stage(results: list[dict], eval_prompts: int = 0) -> tuple[list[str], dict, dict]:
    """x labels, series and their 95% intervals (None: none shown) of the task accuracy chart: every stage
    that made a model."""
    models = [r for r in results if "task_accuracy" in r]
    keys = {"greedy": "task_accuracy", "sampled (temperature 1)": "task_accuracy_sampled"}
    series = {name: [r.get(key) for r in models] for name, key in keys.items()}
    errors = {name: [interval(r, key) for r in models] for name, key in keys.items()}
    return [stage_label(r) for r in models], series, errors


def rewards_by_round(results: list[dict], rounds: int) -> tuple[list[str], dict, dict]:
    """x labels, series and 95% intervals of the reward chart: per round, how often each reward signal ranks
    right, named with the sample sizes the results carry."""

    def row(stage: str, k: int) -> dict:
        return next((r for r in results if r["round"] == k and r["stage"] == stage), {})

    signals = [
        ("reward model", "rm", "rm_accuracy", "held-out pairs"),
        ("DPO implicit reward", "dpo", "dpo_reward_accuracy", "held-out pairs"),
        ("the RM's pick is right (rejection sampling)", "rs", "rm_pick_accuracy", "picks"),
    ]
    series, errors = {}, {}
    for name, stage, key, what in signals:
        rows = [row(stage, k) for k in range(1, rounds + 1)]
        sizes = sizes_text([(r.get("n") or {}).get(key) for r in rows if r.get(key) is not None], what)
        label = f"{name} ({sizes})" if sizes else name
        series[label] = [r.get(key) for r in rows]
        errors[label] = [interval(r, key) if r else None for r in rows]
    return [f"round {k}" for k in range(1, rounds + 1)], series, errors


# ----------------------------------------------------------------------------- the dashboard (wandb)

# The pipeline run's charts, one point per round (round 0: the base): `<stage>/<metric>` of every stage result
# (a key naming its own stage is shortened: sft_loss -> sft/loss, rm_accuracy -> rm/accuracy).
DASHBOARD_KEYS = (
    "rm_accuracy",
    "rm_pick_accuracy",
    "sample_accuracy",
    "best_of_k_oracle",
    "mean_best_score",
    "sft_loss",
    "dpo_reward_accuracy",
    "task_accuracy",
    "task_accuracy_sampled",
    "nll",
    "rm_score",
    "rm_score_last_rm",
    "records",
)
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
    first held-out prompts (llama_posttrain/jobs/evaluate.py `generations`, in round_<k>/<stage>/eval_<name>.json): the
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


def log_dashboard(
    folder: Path, group: str, config: dict, results: list[dict], settings: dict, verify=None, base_given=False
) -> None:
    """The pipeline's own wandb run (job type "pipeline", in the stage runs' group): per round (the x-axis)
    every stage's results (RM accuracy, RM pick accuracy, SFT loss, DPO reward accuracy, task accuracy
    greedy and sampled, ...), the summary table, and per rejection-sampling stage a table of a few prompts
    with their K samples, RM scores, the pick and (a verifier) which were right, and histograms of the RM's
    scores of its finished samples: the picks and the rest, the right and the wrong ones (score_groups); per
    round a table of the greedy generations of the round's models on the first held-out prompts, and with
    the last round all of them in one table (generation_rows)."""
    import wandb  # only when logging to it

    run = wandb.init(
        project=settings["project"],
        group=group,
        job_type="pipeline",
        name=f"{group}/pipeline",
        dir=str(folder),
        mode=settings["mode"],
        config=config,
    )
    try:
        run.define_metric("round")
        run.define_metric("*", step_metric="round")
        samples = {
            r["round"]: sample_rows(folder / f"round_{r['round']}" / "rs", r["round"], verify)
            for r in results
            if r["stage"] == "rs"
        }
        generations = generation_rows(folder, results)
        stages = table_rows(results)
        columns = table_columns(stages)
        data = [[r["round"], row_stage(r, base_given), *[cell_value(r, c) for c in columns]] for r in stages]
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
