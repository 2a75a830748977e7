"""Metrics: <run_dir>/metrics.jsonl (every logged step), wandb (offline by default), a console line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Logger:
    def __init__(self, run_dir, cfg, config_dict: dict, enabled: bool, total_steps: int, resume_step: int = 0):
        self.enabled, self.total, self.progress = enabled, total_steps, cfg.progress
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        self.t0 = time.time()
        if not enabled:
            return
        self._truncate_after(resume_step)
        if cfg.wandb != "disabled":
            import wandb  # only when logging to it

            self.wandb = wandb.init(
                project=cfg.project, name=cfg.name or Path(run_dir).name, dir=str(run_dir), mode=cfg.wandb,
                config=config_dict, resume="allow", id=_run_id(run_dir),
            )  # fmt: skip

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint: they will be logged again."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: (round(v, 8) if isinstance(v, float) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if self.progress:
            print(self._line(step, metrics), end="", file=sys.stderr, flush=True)

    def _line(self, step: int, metrics: dict) -> str:
        """A progress bar redrawn in place on a terminal; a line every 5% of the run in a log file."""
        if any(k.startswith("eval/") for k in metrics):
            return "\n" + " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)) + "\n"
        bar = "#" * int(20 * step / max(self.total, 1))
        text = f"[{bar:<20}] {step}/{self.total} loss {metrics['loss']:.4f} {metrics.get('tokens_per_s', 0):,.0f} tok/s"
        if sys.stderr.isatty():
            return "\r" + text
        return text + "\n" if step % max(1, self.total // 20) == 0 or step == self.total else ""

    def finish(self) -> None:
        if self.enabled and self.progress:
            print(file=sys.stderr)
        if self.wandb is not None:
            self.wandb.finish()


def _run_id(run_dir) -> str:
    import hashlib

    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
