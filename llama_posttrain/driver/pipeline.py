"""The round driver: iterative rounds of Llama 3 post-training, on a synthetic task or on your own data.

    python llama_posttrain/driver/pipeline.py --config experiments/quickstart/pipeline.yaml [key=value ...]

The recipe (llama_posttrain/driver/recipe.py) writes under runs/<name>/round_<k>/<stage>/; every stage that touches a
model is a job through a launcher (llama_posttrain/driver/launch.py: `local` torchrun, `ray` on a Ray cluster, `slurm`),
so the driver holds no model and the same command runs the CPU quickstart and a cluster's rounds. The
data is a plug-in named in the config (`task`, `task_args`): a synthetic task with a verifier
(llama_posttrain/data/tasks/arithmetic.py), or `files`, the user's prompt pool, preference, SFT and eval files
(llama_posttrain/data/tasks/files.py). New pairs are labeled by the `annotator`: the task's verifier, the latest RM
(+ `safety_rm`), or people (the driver writes the sets to label and stops until they are labeled).
Each stage writes a DONE marker with its results last: rerunning skips finished stages, and an
interrupted training run resumes from its own checkpoints. SIGTERM or Ctrl-C goes to the running job
(a training run saves its last finished step); the pipeline then exits with 128 + the signal, naming
the stage, and the same command resumes. The report is summary.json, summary.md and the plots
(llama_posttrain/driver/report.py).

Exit status: 0 done; 1 an error (one line `pipeline: error: ...`); 3 waiting for labels (annotator human: the
sets to label are written, label them and rerun the same command); 128 + N stopped by signal N (130 Ctrl-C,
143 SIGTERM), the same command resumes.

Paths: a relative path is relative to the directory the pipeline is started in, wherever it is written: the
pipeline's config and its key=value overrides (root, base, safety_rm, configs), its task_args (the files task's
files), the stage overrides' PATH_KEYS, and the PATH_KEYS of the stage config files (`configs`) themselves, as
for a stage's own command started there. Jobs get every path absolute and run in that directory too, on every
node (launch.py). The default `configs`, the repository's experiments/quickstart files, are found from any
directory; the pipeline sets their paths (data, run folder). The tokenized caches of every stage go to the run
folder's .tokenized. DONE markers hold paths relative to the run folder, so a copied or renamed folder reads
its own results.

A run folder holds the results of one config, and one driver at a time (run.lock): the first start
records the config (pipeline.yaml, and the stage config files' contents in stage_configs.yaml) and a
later start with a different config is refused, listing the differing keys, except for keys that change
no stage's result (HARMLESS, and STAGE_SETS, the stage configs' keys the pipeline sets for every run).
The record is never rewritten. To start over, choose a new `name` or delete the folder.

Before the first job, every input is checked (llama_posttrain/driver/preflight.py): each record of the files task's
files, parsed by the jobs' own schema code, and each training run's config (stage config file, the pipeline's
stage overrides, each variant's), read by the training scripts' config code; all problems in one error.
A sampling stage that drops more than `max_dropped` of its samples or prompts stops, naming the drop and the keys
to change. `from_stage=round_<k>/<stage>` redoes that stage and every later one: their folders (done or not) and
the report move to redo_<n>/, and the sampling keys (REDO_KEYS in stages.py: max_new_tokens, temperature, k,
cleaning, ...) may differ from the record; redo.yaml records each redo (time, stage, the keys changed, their
values), and a later start is compared with pipeline.yaml and the last redo's values. A start with the last
redo's from_stage and sampling keys goes on with that redo (the same command resumes it). A sampling key
changed without from_stage is refused, as any other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import yaml

from llama_posttrain.data.io import write_text
from llama_posttrain.driver.launch import Launcher, PipelineInterrupted
from llama_posttrain.driver.pipeline_config import (
    HARMLESS,
    ROOT,
    SET_BY_PIPELINE,
    PipelineConfig,
    PipelineError,
    _read_yaml,
    load_pipeline_config,
    run_folder,
    task_from_config,
)
from llama_posttrain.driver.recipe import Recipe
from llama_posttrain.driver.report import wandb_settings, write_report
from llama_posttrain.driver.stages import REDO_KEYS, STAGE_KINDS, StageError, WaitingForLabels, stage_place
from llama_posttrain.llama.chat import ChatFormat, resolve_chat_template
from llama_posttrain.llama.tokenizer import load_tokenizer, resolve_tokenizer
from llama_posttrain.train import run_lock
from llama_posttrain.train.config import changeable, config_changes, describe, differences

EXIT_WAITING_FOR_LABELS = 3  # the human annotator's stop (1: an error, 128 + N: signal N; the module's docstring)
REPORT_FILES = ("summary.json", "summary.md", "accuracy.png", "rewards.png")  # llama_posttrain/driver/report.py
REDO_RECORD = "redo.yaml"  # the run folder's redos (from_stage): time, stage, the keys changed, where the old went


def _read_record(folder: Path) -> dict:
    """A run folder's recorded config: pipeline.yaml, with the keys PipelineConfig gained since at their
    defaults (a new key's default keeps the behaviour from before it, so a run folder continues as it began),
    and stage_configs.yaml as "stage_configs". A file that is not what the pipeline writes: PipelineError."""
    record, stages = folder / "pipeline.yaml", folder / "stage_configs.yaml"
    saved = _read_yaml(record)
    if not isinstance(saved, dict):
        raise PipelineError(f"{record}: not a recorded pipeline config (a mapping of keys), got {type(saved).__name__}")
    stage_configs = _read_yaml(stages) if stages.is_file() else {}
    if not isinstance(stage_configs, dict) or not all(isinstance(v, dict) for v in stage_configs.values()):
        raise PipelineError(f"{stages}: not recorded stage configs (a mapping of stage -> its config)")
    defaults = {k: v for k, v in dataclasses.asdict(PipelineConfig()).items() if k not in saved}
    redos = _read_redos(folder)  # the last redo's sampling keys are the folder's since
    return {**defaults, **saved, **(redos[-1]["values"] if redos else {}), "stage_configs": stage_configs}


def _read_redos(folder: Path) -> list[dict]:
    """A run folder's redos (redo.yaml, oldest first; none: []); a file that is not what the pipeline writes:
    PipelineError."""
    record = folder / REDO_RECORD
    if not record.is_file():
        return []
    redos = _read_yaml(record)
    if not isinstance(redos, list) or not all(isinstance(r, dict) and isinstance(r.get("values"), dict) for r in redos):
        raise PipelineError(f"{record}: not a record of redos (a list of {{time, from_stage, changed, values, ...}})")
    return redos


START_OVER = "a run folder holds the results of one config: to start over, choose a new `name` or delete the folder"


class Pipeline:
    """The driver of one config: checks and records the run folder, runs the recipe's stages (each model-
    touching one a job through the launcher), writes the report. It holds no model."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.dir = run_folder(cfg)
        task = task_from_config(cfg.task, cfg.task_args)
        if cfg.base is None:
            tokenizer = load_tokenizer()  # the presets' byte tokenizer
        else:
            from llama_posttrain.llama.checkpoint import read_config  # torch: not for `--help` and config errors

            try:  # the base's tokenizer: one with ids beyond its vocabulary is named, not a traceback
                tokenizer = resolve_tokenizer(None, cfg.base, read_config(cfg.base)[0].vocab_size)
            except ValueError as e:
                raise PipelineError(f"base: {e}") from None
        try:
            chat = ChatFormat(tokenizer, resolve_chat_template(None, cfg.base))
        except ValueError as e:
            raise PipelineError(f"base: {e}") from None
        self.launcher = make_launcher(cfg, self.dir)
        self.signals = self.launcher.signals
        configs = {kind: ROOT / file for kind, file in cfg.configs.items()}
        try:
            self.recipe = Recipe(cfg, task, chat, self.dir, self.launcher, configs)
        except StageError as e:
            raise PipelineError(str(e)) from None

    def run(self) -> list[dict]:
        """Every stage not done before, then the report. A signal stops it (PipelineInterrupted, llama_posttrain/driver/launch.py)."""
        with self.signals:
            self.preflight()  # before the run folder is made or its stages moved aside for a redo
            self.check_run_folder()
            print(f"pipeline: {self.estimate()}", flush=True)
            try:
                results = self.recipe.run()
                self.signals.check("before the report")
                c = self.cfg
                stages = {stage: getattr(c, stage) for stage in ("pretrain", *STAGE_KINDS)}  # their overrides
                dashboard = wandb_settings(self.stage_configs(), stages)  # None: the stages log no wandb
                write_report(
                    self.dir,
                    dataclasses.asdict(c),
                    results,
                    c.plots,
                    c.rounds,
                    c.eval_prompts,
                    dashboard,
                    self.recipe.verify,
                )
            except StageError as e:
                raise PipelineError(str(e)) from None
        return results

    def preflight(self) -> None:
        """Every input file's records and every training run's config, checked before any job
        (llama_posttrain/driver/preflight.py); all problems in one PipelineError."""
        from llama_posttrain.driver import preflight

        problems, checked = preflight.check(self.recipe)
        if problems:
            lines = "".join(f"\n  {p}" for p in problems)
            raise PipelineError(f"{len(problems)} problem(s) found before any job started:{lines}")
        files = (
            f"{checked.get('files', 0)} data files ({checked.get('records', 0)} records) and "
            if checked.get("files")
            else ""
        )
        print(f"pipeline: preflight: {files}{checked.get('runs', 0)} training run configs checked", flush=True)

    def estimate(self) -> str:
        """How long the stages not done yet took in the last finished run of the same config (a folder under
        `root` with its report, its DONE markers' `seconds`): measured on this machine, under that run's load. No such
        run: no estimate (each job shows its own ETA as it runs)."""
        same = {"name", "root", "plots", "max_dropped", "from_stage"}  # keys that change nothing a stage does
        now = {**dataclasses.asdict(self.cfg), "stage_configs": self.stage_configs()}
        finished = []  # (its summary.json's time, its folder)
        for summary in sorted(self.dir.parent.glob("*/summary.json")):  # a finished run wrote its report
            other = summary.parent
            if not (other / "pipeline.yaml").is_file():  # this folder too: finished, nothing is left
                continue
            try:
                saved = _read_record(other)
            except (PipelineError, OSError) as e:  # another run's folder: not this run's problem
                print(f"pipeline: warning: {e}; {other} left out of the estimate", flush=True)
                continue
            if not config_changes(saved, now, (*same, *SET_BY_PIPELINE))[1]:
                finished.append((summary.stat().st_mtime, other))
        if not finished:
            return f"no estimate yet (no finished run of this config under {self.cfg.root}/); each job shows its ETA"
        other = max(finished)[1]
        seconds = []
        for marker in other.glob("round_*/*/DONE"):
            if not (self.dir / marker.relative_to(other)).exists():  # done here: skipped
                try:
                    seconds.append(float(json.loads(marker.read_text()).get("seconds", 0)))
                except (OSError, ValueError, AttributeError):
                    continue
        if not seconds:
            return "every stage is done: the report only"
        return (
            f"estimate: ~{max(1, round(sum(seconds) / 60))} min on this machine for the {len(seconds)} stages left "
            f"(as long as they took in {other}, the last finished run of this config; a busier machine takes longer)"
        )

    def stage_configs(self) -> dict:
        return {kind: _read_yaml(ROOT / file) for kind, file in sorted(self.cfg.configs.items())}

    def check_run_folder(self) -> None:
        """Record the config at the first start; refuse a later start whose config differs (HARMLESS and
        the stage configs' STAGE_SETS keys aside), so the results of two configs never mix. The record is
        never rewritten. A folder the pipeline cannot write in is refused before anything starts."""
        record, stages = self.dir / "pipeline.yaml", self.dir / "stage_configs.yaml"
        now = {**dataclasses.asdict(self.cfg), "stage_configs": self.stage_configs()}
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write_test.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise PipelineError(
                f"{e.filename or self.dir}: cannot write in the run folder ({e.strerror or e}): the pipeline keeps its "
                "record, its DONE markers and every stage's results there; make it writable, or choose another "
                "`root` or `name`"
            ) from None
        try:  # one pipeline per folder; each stage's training run also locks its own folder
            run_lock.hold(self.dir, "llama_posttrain/driver/pipeline.py " + " ".join(sys.argv[1:]))
        except run_lock.FolderInUse as e:
            raise PipelineError(str(e)) from None
        if not record.is_file():
            own = {stages.name, stages.name + ".tmp", record.name + ".tmp", run_lock.LOCK_NAME}  # a first start
            # killed mid-record left these
            results = sorted(p.name for p in self.dir.iterdir() if p.name not in own) if self.dir.is_dir() else []
            if results:
                raise PipelineError(
                    f"{self.dir} holds results ({', '.join(results[:5])}) but no pipeline.yaml recording the config "
                    f"that made them; {START_OVER}"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text(stages, yaml.safe_dump(now["stage_configs"], sort_keys=False))
            config = {k: v for k, v in now.items() if k not in ("stage_configs", "from_stage")}
            write_text(record, yaml.safe_dump(config, sort_keys=False))  # last: the record is whole
            if self.cfg.from_stage is not None:  # nothing to redo; recorded, so that the same command goes on
                self.redo(now, now)
            return
        try:
            saved = _read_record(self.dir)
        except PipelineError as e:
            raise PipelineError(
                f"{e}: restore it (it records the config that made this folder's results); {START_OVER}"
            ) from None
        # the stage configs' STAGE_SETS keys aside (the pipeline sets them), and for a redo the sampling keys (its
        # stages draw their samples with them)
        redo_keys = REDO_KEYS if self.cfg.from_stage is not None else ()
        ok, refused = config_changes(saved, now, (*HARMLESS, *SET_BY_PIPELINE, *redo_keys))
        sampling = [k for k in [*ok, *refused] if changeable(k, REDO_KEYS)]
        if refused:
            lines = "".join(f"\n  {k}: {was!r} there, {new!r} now" for k, (was, new) in refused.items())
            redo = (
                f"\n{', '.join(sampling)}: sampling keys, which may change for a redo of the stages from a named one "
                "on: add `from_stage=round_<k>/<stage>` (e.g. round_1/rs; its folder and every later stage's are "
                f"moved to redo_<n>/, the earlier stages kept; recorded in {REDO_RECORD})"
                if sampling
                else ""
            )
            raise PipelineError(
                f"{self.dir} was made with another config (recorded in {record.name} and {stages.name}"
                f"{' and ' + REDO_RECORD if (self.dir / REDO_RECORD).is_file() else ''}); differing:{lines}{redo}\n"
                f"{START_OVER}"
            )
        harmless = [k for k in ok if k not in sampling and k != "from_stage"]
        if harmless:
            print(f"{record}: {', '.join(harmless)} changed (no stage's result depends on them); the record is kept")
        if self.cfg.from_stage is not None:
            self.redo(saved, now)

    def redo(self, saved: dict, now: dict) -> None:
        """from_stage: the named stage's folder and every later stage's (done or not), and the report, are moved
        to redo_<n>/, so that those stages run again with the sampling keys (REDO_KEYS) as they are now; redo.yaml
        records it (time, stage, the keys changed, their values, what was moved). A start whose from_stage and
        sampling keys are the last redo's goes on with that redo (the same command resumes it)."""
        fs, record = self.cfg.from_stage, self.dir / REDO_RECORD
        redos = _read_redos(self.dir)
        values = {key: now[key] for key in REDO_KEYS}
        if redos and redos[-1].get("from_stage") == fs and redos[-1]["values"] == values:
            print(
                f"pipeline: from_stage={fs}: redo {len(redos)} of {record} ({redos[-1].get('time')}) goes on: the "
                f"stages it finished are kept (to redo them again, move {fs} away or change a sampling key)",
                flush=True,
            )
            return
        start = stage_place(fs)
        later = [
            p
            for p in self.dir.glob("round_*/*")
            if p.is_dir() and (stage_place(f"{p.parent.name}/{p.name}") or (-1,)) >= start
        ]
        later.sort(key=lambda p: stage_place(f"{p.parent.name}/{p.name}"))
        report = [self.dir / name for name in REPORT_FILES if (self.dir / name).exists()]
        numbers = [int(p.name[5:]) for p in self.dir.glob("redo_*") if p.name[5:].isdigit()]
        dest = self.dir / f"redo_{max([len(redos), *numbers]) + 1}"
        changed = differences({key: saved.get(key) for key in REDO_KEYS}, values)
        moved = []
        with self.signals.deferred():  # moved and recorded, or a rerun moves the rest
            for p in later + report:
                target = dest / p.relative_to(self.dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(p, target)
                moved.append(str(p.relative_to(self.dir)))
            entry = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "from_stage": fs,
                "changed": {key: {"was": was, "now": new} for key, (was, new) in changed.items()},
                "values": values,
                "moved_to": dest.name if moved else None,
                "moved": moved,
            }
            write_text(record, yaml.safe_dump([*redos, entry], sort_keys=False))
        what = ", ".join(f"{key} {was!r} -> {new!r}" for key, (was, new) in changed.items()) or "no key changed"
        where = (
            f"moved {', '.join(moved)} to {dest} (delete it once those results are not needed)"
            if moved
            else "nothing done from it yet"
        )
        print(f"pipeline: from_stage={fs}: {what}; {where}; recorded in {record}", flush=True)
        if "max_new_tokens" in changed and start > (0, 1):
            print(
                f"pipeline: note: max_new_tokens is the evaluations' budget too: the stages before {fs} keep their "
                f"evaluations, made with max_new_tokens {changed['max_new_tokens'][0]}",
                flush=True,
            )


def make_launcher(cfg: PipelineConfig, run_dir: Path) -> Launcher:
    try:
        return Launcher(cfg.launcher, cfg.nnodes, cfg.rdzv_endpoint, cfg.ray_address)
    except ValueError as e:  # nnodes > 1 on one node
        raise PipelineError(str(e)) from None


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__,
        epilog="keys (key = default):\n" + describe(PipelineConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*", help="key=value")
    args = ap.parse_args(argv)
    try:
        cfg = load_pipeline_config(args.config, args.overrides)
        Pipeline(cfg).run()
    except PipelineError as e:
        raise SystemExit(f"pipeline: error: {e}") from None
    except WaitingForLabels as e:  # not a failure: people label the sets, then the same command goes on
        print(f"pipeline: waiting for labels: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_WAITING_FOR_LABELS) from None
    except PipelineInterrupted as e:
        try:
            print(f"\npipeline: {e}", file=sys.stderr, flush=True)
        except OSError:  # a SIGHUP: the terminal may be gone
            pass
        raise SystemExit(128 + e.signum) from None


if __name__ == "__main__":
    main()
