"""The pipeline's report: summary.json (the config and every stage's results), summary.md (a table),
and the plots (accuracy.png, rewards.png; matplotlib, `pip install -e '.[plots]'`)."""

from __future__ import annotations

import json
from pathlib import Path

from data.io import write_text
from train.recipe import EVAL_SIZE


def write_report(folder: Path, config: dict, results: list[dict], plots: bool, rounds: int, eval_prompts: int) -> None:
    summary = {"config": config, "stages": results}
    write_text(folder / "summary.json", json.dumps(summary, indent=1))
    table = summary_table(results)
    write_text(folder / "summary.md", table + "\n")
    print(table)
    if plots:
        plot(folder, results, rounds, eval_prompts)


def plot(folder: Path, results: list[dict], rounds: int, eval_prompts: int) -> None:
    from train.plots import HOW_TO_GET, have_matplotlib, line_chart

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
