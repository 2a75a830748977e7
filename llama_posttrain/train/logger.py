"""Metrics: <run_dir>/metrics.jsonl (every logged step), wandb (offline by default), a console line.

`read_metrics(path)` is the one reader of metrics.jsonl; a line cut short by a crash mid-write is
dropped with a warning, so a killed run still resumes. metrics.jsonl keeps the project's own keys
(`loss`, `lr`, `eval/loss`, ...); wandb gets the dashboard names (`dashboard_names`): train metrics
under `train/`, eval metrics under `eval/`, TRL's name where TRL 1.16 logs the same quantity (`learning_rate`,
the RM's `margin`, `mean_reward`, `min_reward`, `max_reward`, SFT's and DPO's `mean_token_accuracy`; DPO's
`nll_loss` only with `dpo.nll_norm: token`, the mean over the chosen tokens as TRL's CPOTrainer logs it),
plus `train/global_step` (every chart's x-axis, `define_metric`) and `train/num_tokens` (the other
x-axis: TRL's, the tokens trained on so far with every DPO or RM response counted with its own copy of
the prompt, as TRL's rows hold them: each step's `tokens` x `trl_tokens_per_token`, where the loss logs
it; SFT's `tokens` as they are). The run's group, job type and name come from
`logging.group`, `logging.job_type`, `logging.name` (the pipeline sets them for every stage run:
group = the pipeline run, job type = the stage). A list value (an eval's `Objective.collect`, e.g. the
RM's `eval/rewards_chosen`) is a distribution: wandb gets a `wandb.Histogram` of it; metrics.jsonl and
the console keep the scalars only.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from llama_posttrain.data.io import write_jsonl
from llama_posttrain.train import run_lock
from llama_posttrain.train.progress import clock


class Logger:
    def __init__(self, run_dir, cfg, config_dict: dict, enabled: bool, total_steps: int, resume_step: int | None):
        """resume_step: the checkpoint's step (lines after it are dropped: they will be logged again),
        or None for a fresh start (the file starts empty, wandb gets a new run id)."""
        self.enabled, self.total, self.progress = enabled, total_steps, cfg.progress
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.t0, self.start_step = time.time(), resume_step or 0  # the progress bar's ETA: this start's steps
        if not enabled:
            return
        keep = [m for m in read_metrics(self.path) if m["step"] <= resume_step] if resume_step is not None else []
        write_jsonl(self.path, keep)
        if cfg.wandb != "disabled":
            import wandb  # only when logging to it

            self.wandb = wandb.init(
                project=cfg.project,
                name=cfg.name or Path(run_dir).name,
                dir=str(run_dir),
                mode=cfg.wandb,
                config=config_dict,
                resume="allow",
                id=_run_id(run_dir, fresh=resume_step is None),
                group=cfg.group,
                job_type=cfg.job_type,
            )
            define_metrics(self.wandb)
        self.kind = next((k for k in ("dpo", "rm", "sft") if k in config_dict), None)  # the entry's own section
        if self.kind == "dpo" and config_dict["dpo"].get("nll_norm") == "token":
            self.kind = "dpo_token_nll"  # TRL's nll_loss: the mean over the chosen tokens
        self.num_tokens, self.last_step = 0, 0
        for record in keep:  # a resumed run counts on from its kept records
            self._count(record["step"], record)

    def log(self, step: int, metrics: dict, epoch: float | None = None) -> None:
        """epoch: the loader's position in epochs (train/epoch on the dashboard; not in metrics.jsonl)."""
        if not self.enabled:
            return
        values = {k: v for k, v in metrics.items() if isinstance(v, list)}  # distributions: wandb only
        metrics = {k: v for k, v in metrics.items() if k not in values}
        record = {"step": step, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in metrics.items()}}
        run_lock.check(self.path.parent, f"step {step}'s metrics")  # a deleted lock let another run in: stop
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            import wandb  # only when logging to it (imported by __init__ already)

            self._count(step, metrics)
            histograms = {k: wandb.Histogram(v) for k, v in dashboard_names(values, self.kind).items() if v}
            self.wandb.log(self.dashboard(step, metrics, epoch) | histograms, step=step)
        if self.progress:
            print(self._line(step, metrics), end="", file=sys.stderr, flush=True)

    def _count(self, step: int, metrics: dict) -> None:
        """train/num_tokens (TRL's): each train record's `tokens` x its `trl_tokens_per_token` (1 where the loss
        logs none: SFT) for every step since the last one logged (exact with log_every 1; with more, the
        steps between count as the logged one)."""
        if "tokens" in metrics:
            trl_tokens = round(metrics["tokens"] * metrics.get("trl_tokens_per_token", 1))
            self.num_tokens += trl_tokens * (step - self.last_step)
            self.last_step = step

    def dashboard(self, step: int, metrics: dict, epoch: float | None = None) -> dict:
        """A record as wandb gets it: the dashboard names, the step, the tokens seen so far (and the epoch)."""
        out = {**dashboard_names(metrics, self.kind), "train/global_step": step, "train/num_tokens": self.num_tokens}
        return out | ({"train/epoch": epoch} if epoch is not None else {})

    def _line(self, step: int, metrics: dict) -> str:
        """A progress bar redrawn in place on a terminal; a line every 5% of the run in a log file."""
        if any(k.startswith("eval/") for k in metrics):
            return "\n" + " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)) + "\n"
        bar = "#" * int(20 * step / max(self.total, 1))
        text = f"[{bar:<20}] {step}/{self.total} loss {metrics['loss']:.4f} {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        done, elapsed = step - self.start_step, time.time() - self.t0
        if 0 < done and step < self.total:
            text += f" ETA {clock(elapsed / done * (self.total - step))}"
        if sys.stderr.isatty():
            return "\r\033[K" + text  # the line cleared: a shorter ETA leaves no characters behind
        return text + "\n" if step % max(1, self.total // 20) == 0 or step == self.total else ""

    def finish(self) -> None:
        if self.enabled and self.progress:
            print(file=sys.stderr)
        if self.wandb is not None:
            self.wandb.finish()


# our key -> TRL's name for the same metric, per entry point (the `dpo`, `rm`, `sft` config section; dpo_token_nll:
# dpo with nll_norm token); the prefix (train/ or eval/) is added after. Keys not listed keep their name: TRL's
# where it is the same (DPO's rewards/*, logps/*, logits/*, entropy; RM's accuracy), ours otherwise (nll,
# reward_std, ipo/score_*: TRL 1.16 logs none of these; tests/test_trl_names.py checks each against TRL's).
TRL_NAMES = {
    None: {"lr": "learning_rate"},
    "dpo": {"token_accuracy": "mean_token_accuracy"},
    "dpo_token_nll": {"nll": "nll_loss", "token_accuracy": "mean_token_accuracy"},
    "rm": {
        "margin_mean": "margin",
        "reward_mean": "mean_reward",
        "reward_min": "min_reward",
        "reward_max": "max_reward",
    },
    "sft": {"token_accuracy": "mean_token_accuracy"},
}


def dashboard_names(metrics: dict, kind: str | None) -> dict:
    """metrics.jsonl keys -> wandb keys: `eval/x` stays under eval/, any other key goes under train/; TRL's
    name where TRL has the metric (TRL_NAMES)."""
    names = {**TRL_NAMES[None], **TRL_NAMES.get(kind, {})}
    out = {}
    for key, value in metrics.items():
        space, _, name = key.partition("/") if key.startswith("eval/") else ("train", "", key)
        out[f"{space}/{names.get(name, name)}"] = value
    return out


def define_metrics(run) -> None:
    """Every chart's x-axis is the optimizer step (train/global_step); train/num_tokens is logged beside it
    in every record (train and eval), so any chart can be drawn against the tokens seen too."""
    run.define_metric("train/global_step")
    run.define_metric("train/*", step_metric="train/global_step")
    run.define_metric("eval/*", step_metric="train/global_step")


def read_metrics(path) -> list[dict]:
    """The records of a metrics.jsonl (missing file: none); an unparsable line is dropped, with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
            print(f"WARNING: {path}:{lineno}: dropped an unparsable line (cut short by a crash?)", file=sys.stderr)
        if isinstance(record, dict) and "step" in record:
            out.append(record)
    return out


def _run_id(run_dir, fresh: bool) -> str:
    """One wandb run per run folder and start: a resume continues it, a fresh start gets a new one."""
    id_file = Path(run_dir) / "wandb_id"
    if fresh or not id_file.exists():
        seed = f"{Path(run_dir).resolve()}:{time.time_ns()}"
        id_file.write_text(hashlib.sha1(seed.encode()).hexdigest()[:12])
    return id_file.read_text().strip()
