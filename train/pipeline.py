"""Iterative rounds of Llama 3 post-training on a task with a verifier, end to end.

    python train/pipeline.py --config experiments/quickstart/pipeline.yaml [key=value ...]

runs/<name>/round_0/data       task data: seed preference pairs ("human" labels), eval sets, pre-training corpus
            round_0/pretrain   the base: a causal LM pre-trained on the task's noisy corpus, so it is imperfect
            round_k/rm         reward model from the base on ALL preference data so far
            round_k/rs         rejection sampling: K samples per fresh prompt from the latest policy, RM picks the best
            round_k/sft        SFT from the base on all rejection-sampled data so far
            round_k/pref       new preference pairs sampled from the SFT model, labeled by the task's verifier
            round_k/dpo        DPO from the SFT model on this round's (the latest) pairs
            summary.json, summary.md, accuracy.png, rewards.png (plots: pip install -e '.[plots]')
The task is a plug-in named in the config (`task`, `task_args`): its prompts, verifier, seed data and
pre-training corpus; the interface is in data/tasks/__init__.py, data/tasks/arithmetic.py an example.
Training stages run `torchrun train/{rm,sft,dpo}.py` once per variant (`variants`: override sets,
e.g. seeds or data orders) and average the variants' models (train/average.py). Each stage writes
a DONE marker with its results last: rerunning skips finished stages, and an interrupted training
run resumes from its own checkpoints. SIGTERM or Ctrl-C is forwarded to the training run going on (it saves
its last finished step), or stops the pipeline's own work (sampling, evaluation) at once; the pipeline then
exits with 128 + the signal, naming the stage, and the same command resumes (Signals).
Rejection sampling prints what it drops (train/sample.py DROPS) and each sampling stage's results count it.

A run folder holds the results of one config: the first start records it (pipeline.yaml, and the
stage config files' contents in stage_configs.yaml) and a later start with a different config is
refused, listing the differing keys, except for keys that change no stage's result (HARMLESS, and the
stage configs' keys the pipeline sets for every stage run, STAGE_SETS: their own `train.run_dir`).
The record is never rewritten. To start over, choose a new `name` or delete the folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import typing
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
import yaml

from data.jsonl import write_jsonl
from data.schema import parse_prompt
from data.tasks import load_task, task_factory
from llama import PRESETS, load_model
from llama.chat import ChatFormat, resolve_chat_template
from llama.checkpoint import read_config
from llama.generate import decode_sample, generate
from llama.tokenizer import load_tokenizer, resolve_tokenizer
from train import run_lock
from train.average import average_checkpoints
from train.config import AtLeast, NonNegFloat, NonNegInt, PosInt, _comments, from_flat_dict
from train.distributed import torchrun_command
from train.logger import read_metrics
from train.sample import drop_report, drops_for, read_prompts, rejection_sample, score, verifier_annotator

ROOT = Path(__file__).resolve().parent.parent
STAGE_KINDS = ("rm", "sft", "dpo")  # the training scripts; "pretrain" runs sft.py
Preset = Literal[tuple(PRESETS)]  # a model preset's name (llama/config.py)
EVAL_SIZE = 200  # held-out preference pairs, SFT records and pre-training dialogs
QUICKSTART_CONFIGS = {kind: f"experiments/quickstart/{kind}.yaml" for kind in STAGE_KINDS}


@dataclass
class PipelineConfig:
    name: str = "quickstart"  # the run folder: <root>/<name>
    root: str = "runs"
    task: str = "arithmetic"  # a task in data/tasks (TASKS), or a 'package.module:factory' path
    task_args: dict[str, typing.Any] = field(default_factory=dict)  # the task's settings, e.g. {max_digits: 1}
    base: str | None = None  # a checkpoint to start from instead of pre-training on the task's corpus
    rounds: NonNegInt = 2
    nproc: PosInt = 2  # torchrun ranks per training stage
    seed: int = 0
    preset: Preset = "tiny"  # the pre-trained base's architecture
    pretrain_examples: PosInt = 20000  # size of the pre-training corpus
    seed_pairs: PosInt = 1000  # initial "human" preference pairs
    rs_prompts: PosInt = 400  # fresh prompts per round for rejection sampling
    pref_prompts: PosInt = 400  # fresh prompts per round for new preference pairs
    eval_prompts: PosInt = 200  # held-out prompts of the task accuracy
    k: Annotated[int, AtLeast(2)] = 8  # samples per prompt
    temperature: NonNegFloat = 1.0  # of the rounds' sampling
    max_new_tokens: PosInt = 8
    configs: dict[str, str] = field(default_factory=lambda: dict(QUICKSTART_CONFIGS))  # rm/sft/dpo -> config file
    pretrain: dict[str, typing.Any] = field(default_factory=dict)  # "section.key": value overrides of each stage's run
    rm: dict[str, typing.Any] = field(default_factory=dict)
    sft: dict[str, typing.Any] = field(default_factory=dict)
    dpo: dict[str, typing.Any] = field(default_factory=dict)
    variants: dict[str, list[dict[str, typing.Any]]] = field(default_factory=dict)  # stage -> [overrides]: averaged
    plots: bool = True  # accuracy.png, rewards.png (matplotlib)


# Keys whose change leaves every stage's result as it was: a run folder may be continued with new values.
HARMLESS = {"name", "root", "rounds", "plots"}
# Stage config keys the pipeline sets for every stage run (Pipeline.train): their values in the stage config
# files are never used, so a change of them (a stage config's own run folder) is harmless too.
STAGE_SETS = ("train.run_dir", "logging.progress")


class PipelineError(RuntimeError):
    """A problem the pipeline reports as one message (no traceback): bad config, refused folder, failed stage."""


class Interrupted(BaseException):
    """A signal stopped the pipeline: `main` prints one line and exits 128 + the signal. A BaseException,
    like KeyboardInterrupt, so that no `except Exception` on the way holds it up."""

    def __init__(self, signum: int, detail: str = ""):
        super().__init__(signum, detail)
        self.signum, self.detail, self.where = signum, detail, ""

    def __str__(self) -> str:
        where = f" {self.where}" if self.where else ""  # "in [round 1] sft", "before the report"
        detail = f" ({self.detail})" if self.detail else ""
        return (
            f"{signal.Signals(self.signum).name}: stopped{where}{detail}; rerun the same command to resume "
            "(finished stages are skipped, an interrupted training run resumes from its checkpoints)"
        )


def _process_tree(pid: int) -> list[int]:
    """pid and its descendants (Linux /proc; elsewhere pid alone). torchrun starts each worker in a session
    of its own, so a process group does not reach them: they are found by parent."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])  # "pid (comm) state ppid ..."
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # it ended meanwhile
        pass


class Signals:
    """SIGTERM, SIGINT (Ctrl-C) and SIGHUP while the pipeline runs (`with` installs the handlers, in the
    main thread only; a SIGHUP ignored as under nohup stays ignored):
    - while a stage's torchrun runs (`run`), the signal is forwarded to it, once (SIGHUP as SIGTERM, which
      the training loop saves on); torchrun forwards it to its workers, which save their last finished step
      and exit. The pipeline waits for torchrun, then stops. A second signal kills torchrun and its workers
      at once, without waiting for the save (as a second Ctrl-C stops a training run without saving).
    - during the pipeline's own work (data, sampling, evaluation, averaging), it stops at once: the stage
      is left without its DONE marker, so a rerun does it again. Inside `deferred()` (a DONE marker being
      written) the signal waits for the next `check`.
    torchrun runs in a session of its own, so a Ctrl-C in the terminal reaches only the pipeline, and
    torchrun gets each signal once, from the pipeline."""

    HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self):
        self.signum: int | None = None
        self.child: subprocess.Popen | None = None
        self.killed = False  # a second signal killed the child
        self.deferring = 0
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.HANDLED:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self.previous[s] = signal.signal(s, self.handler)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def handler(self, signum, frame):
        first = self.signum is None
        self.signum = self.signum or signum
        if self.child is not None:
            if first:
                _send(self.child.pid, signal.SIGTERM if signum == signal.SIGHUP else signum)
            else:
                self.killed = True
                for pid in reversed(_process_tree(self.child.pid)):  # the workers, then torchrun
                    _send(pid, signal.SIGKILL)
            return
        if not self.deferring:
            raise Interrupted(self.signum)

    def check(self, where: str = "") -> None:
        """Stop here if a signal came while it could not stop the pipeline at once."""
        if self.signum is not None:
            e = Interrupted(self.signum)
            e.where = where
            raise e

    @contextmanager
    def deferred(self):
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1

    def run(self, cmd: list[str], **popen_kw) -> int:
        """Run cmd in a session of its own, signals forwarded to it -> its exit code."""
        with self.deferred():  # a signal now is forwarded once the child exists
            self.child = subprocess.Popen(cmd, start_new_session=True, **popen_kw)
        try:
            if self.signum is not None:
                _send(self.child.pid, signal.SIGTERM if self.signum == signal.SIGHUP else self.signum)
            while True:  # polled: the handlers run promptly whichever thread the signal interrupted
                try:
                    return self.child.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            self.child = None


# ---------------------------------------------------------------------------------------------- config


def load_pipeline_config(path: str | None, overrides=()) -> PipelineConfig:
    """YAML file + key=value overrides -> PipelineConfig; every key's type and range checked (train/config.py),
    then the values types cannot check; errors name the file (or the override) and the key."""
    raw, source = {}, {}
    if path:
        raw = _read_yaml(Path(path)) or {}
        if not isinstance(raw, dict):
            raise PipelineError(f"{path}: expected a mapping of keys, got {type(raw).__name__}")
        source = dict.fromkeys(raw, str(path))
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise PipelineError(f"override {item!r} must look like key=value")
        try:
            raw[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise PipelineError(f"override {item!r}: not valid YAML: {e}") from None
        source[key] = f"override {item!r}"
    try:
        cfg = from_flat_dict(PipelineConfig, raw, source)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    _check_values(cfg, source)
    return cfg


def _check_values(cfg: PipelineConfig, source: dict[str, str]) -> None:
    """What the types do not say: a folder name, one stage config file per training script, the variants'
    stages, the task and its settings, a starting checkpoint or a corpus to pre-train on."""

    def where(key: str) -> str:
        return f"{source.get(key, 'default')}: {key}"

    if not cfg.name or "/" in cfg.name:
        raise PipelineError(f"{where('name')}: must be a non-empty folder name, got {cfg.name!r}")
    for kind in set(STAGE_KINDS) - set(cfg.configs):
        raise PipelineError(f"{where('configs')}: no config file for {kind!r} (give one for each of {STAGE_KINDS})")
    for kind, file in cfg.configs.items():
        if kind not in STAGE_KINDS:
            raise PipelineError(f"{where('configs')}.{kind}: not a training stage (one of {', '.join(STAGE_KINDS)})")
        if not (ROOT / file).is_file():
            raise PipelineError(f"{where('configs')}.{kind}: {ROOT / file} is not a file")
    if set(cfg.variants) - {"pretrain", *STAGE_KINDS}:
        stages = ", ".join(["pretrain", *STAGE_KINDS])
        raise PipelineError(f"{where('variants')}: stages are {stages}; got {sorted(cfg.variants)}")
    task = make_task(cfg.task, cfg.task_args, source)
    if cfg.base is not None and not Path(cfg.base).is_dir():
        raise PipelineError(f"{where('base')}: {cfg.base} is not a checkpoint folder")
    if cfg.base is None and not hasattr(task, "pretrain_corpus"):
        raise PipelineError(
            f"{where('task')}: task {cfg.task!r} has no pre-training corpus (pretrain_corpus): "
            "give `base: <checkpoint folder>` to start from"
        )


def make_task(task: str, args: dict, source: dict[str, str] | None = None):
    """The config's task (data/tasks), made with its task_args: a dataclass task's arguments are checked
    like the config's keys. Errors name the file or override that set the task or its arguments."""
    source = source or {}
    try:
        factory = task_factory(task)
    except ValueError as e:
        raise PipelineError(f"{source.get('task', 'default')}: task: {e}") from None
    where = f"{source.get('task_args', source.get('task', 'default'))}: task_args"
    if dataclasses.is_dataclass(factory):
        try:
            return from_flat_dict(factory, args, where)
        except ValueError as e:
            raise PipelineError(str(e)) from None  # it names `where` and the argument
    try:
        return load_task(task, args)
    except ValueError as e:
        raise PipelineError(f"{where}: {e}") from None


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PipelineError(f"{path}: cannot read it as YAML: {e}") from None


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _differences(saved, now, key: str = "") -> dict[str, tuple]:
    """Dotted key -> (saved value, new value) for every leaf that differs; a missing key reads as '<absent>'."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = {}
        for k in [*saved, *(k for k in now if k not in saved)]:
            out |= _differences(saved.get(k, "<absent>"), now.get(k, "<absent>"), f"{key}.{k}" if key else str(k))
        return out
    return {} if saved == now else {key: (saved, now)}


def _without_stage_sets(config: dict) -> dict:
    """A recorded config without the STAGE_SETS keys of its stage configs (sections left empty dropped)."""
    stages = {}
    for kind, stage in (config.get("stage_configs") or {}).items():
        if isinstance(stage, dict):
            stage = {section: dict(keys) if isinstance(keys, dict) else keys for section, keys in stage.items()}
            for key in STAGE_SETS:
                section, _, name = key.partition(".")
                if isinstance(stage.get(section), dict):
                    stage[section].pop(name, None)
                    if not stage[section]:
                        del stage[section]
        stages[kind] = stage
    return {**config, "stage_configs": stages}


START_OVER = "a run folder holds the results of one config: to start over, choose a new `name` or delete the folder"
ATTEMPT = "=== pipeline: "  # starts each attempt's part of a stage's log


def _tail(path: Path, n: int = 30) -> str:
    """The last n lines of the latest attempt in a log, without torchrun's own traceback (ChildFailedError)
    that ends a failed run: the worker's error before it is what tells what went wrong."""
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    starts = [i for i, line in enumerate(lines) if line.startswith(ATTEMPT)]
    lines = lines[starts[-1] + 1 :] if starts else lines
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if tracebacks and any("ChildFailedError" in line for line in lines[tracebacks[-1] :]):
        lines = lines[: tracebacks[-1]]
    return "\n".join("  | " + line for line in lines[-n:]) or "  | (empty)"


def _saved(kind: str, run_dir: Path, log_path: Path, rc: int, killed: bool) -> str:
    """What a training run stopped by a signal left, from its log's latest attempt ("SIGTERM: saved step N",
    train/loop.py)."""
    if killed:
        return f"train/{kind}.py killed by a second signal, without saving; its log: {log_path}"
    if rc == 0:
        return f"train/{kind}.py finished {run_dir}"
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    saved = re.findall(r"^SIG[A-Z]+: saved step (\d+)", text.rpartition(ATTEMPT)[2], re.MULTILINE)
    if saved:
        return f"train/{kind}.py saved step {saved[-1]} in {run_dir}"
    return f"train/{kind}.py stopped before it saved a step (exit code {rc}); its log: {log_path}"


def override_args(overrides: dict) -> list[str]:
    """{"train.steps": 3} -> ["train.steps=3"]: a training script's command-line overrides (values as JSON)."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def last_eval(run_dir: Path, key: str) -> float | None:
    """The last logged `eval/<key>` of a training run, None if it never evaluated."""
    values = [m[f"eval/{key}"] for m in read_metrics(Path(run_dir) / "metrics.jsonl") if f"eval/{key}" in m]
    return values[-1] if values else None


def _concat_jsonl(files: list[Path], out: Path) -> None:
    write_jsonl(out, [json.loads(line) for f in files for line in f.read_text().splitlines()])


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.dir = Path(cfg.root) / cfg.name
        self.task = make_task(cfg.task, cfg.task_args)
        if cfg.base is None:
            tokenizer = load_tokenizer()  # the presets' byte tokenizer
        else:
            tokenizer = resolve_tokenizer(None, cfg.base, read_config(cfg.base)[0].vocab_size)
        self.chat = ChatFormat(tokenizer, resolve_chat_template(None, cfg.base))
        self.results: list[dict] = []
        self.signals = Signals()

    @property
    def data(self) -> Path:
        return self.dir / "round_0" / "data"

    # ------------------------------------------------------------------------------------- the recipe

    def run(self) -> list[dict]:
        """Every stage not done before, then the report. A signal stops it (Interrupted, see Signals)."""
        with self.signals:
            self.check_run_folder()
            torch.manual_seed(self.cfg.seed)
            self.stage(0, "data", self.make_data)
            base = Path(self.stage(0, "pretrain", self.pretrain)["model"])
            policy = base
            for k in range(1, self.cfg.rounds + 1):
                rm = Path(self.stage(k, "rm", self.train_rm, base)["model"])
                self.stage(k, "rs", self.rejection_sampling, policy, rm)
                sft = Path(self.stage(k, "sft", self.train_sft, base)["model"])
                self.stage(k, "pref", self.new_pairs, sft, rm)
                policy = Path(self.stage(k, "dpo", self.train_dpo, sft)["model"])
            self.signals.check("before the report")
            self.report()
        return self.results

    def make_data(self, d: Path, k: int) -> dict:
        """The task's data for every round: the seed preference pairs, the eval sets, the pre-training corpus."""
        c, seed = self.cfg, self.cfg.seed * 7919
        if c.base is None:
            write_jsonl(d / "pretrain.jsonl", self.task.pretrain_corpus(c.pretrain_examples, seed))
            write_jsonl(d / "pretrain_eval.jsonl", self.task.pretrain_corpus(EVAL_SIZE, seed + 1))
        pairs, eval_pairs, eval_sft = self.task.seed_data(c.seed_pairs, EVAL_SIZE, seed + 2)
        write_jsonl(d / "seed_pairs.jsonl", pairs)
        write_jsonl(d / "eval_pairs.jsonl", eval_pairs)
        write_jsonl(d / "eval_prompts.jsonl", self.task.prompts(c.eval_prompts, seed + 3, "eval"))
        write_jsonl(d / "eval_sft.jsonl", eval_sft)
        return {"seed_pairs": c.seed_pairs}

    def pretrain(self, d: Path, k: int) -> dict:
        """The base: an LM pre-trained on the task's corpus (every token a target), or the config's `base`."""
        c = self.cfg
        if c.base is not None:
            return {"model": c.base, **self.task_accuracy(Path(c.base))}
        overrides = {
            "model.preset": c.preset,
            "data.train": str(self.data / "pretrain.jsonl"),
            "data.eval": str(self.data / "pretrain_eval.jsonl"),
            "sft.mask_prompt": False,
        }
        model = self.train("sft", d, overrides, c.pretrain, c.variants.get("pretrain"))
        return {"model": str(model), **self.task_accuracy(model)}

    def train_rm(self, d: Path, k: int, base: Path) -> dict:
        """Reward model from the base on all preference pairs so far: the seed pairs and every earlier round's."""
        files = [self.data / "seed_pairs.jsonl"] + [
            self.dir / f"round_{j}" / "pref" / "pairs.jsonl" for j in range(1, k)
        ]
        _concat_jsonl(files, d / "train.jsonl")
        overrides = {
            "model.checkpoint": str(base),
            "data.train": str(d / "train.jsonl"),
            "data.eval": str(self.data / "eval_pairs.jsonl"),
        }
        model = self.train("rm", d, overrides, self.cfg.rm, self.cfg.variants.get("rm"))
        single = last_eval(d / "variant_0", "accuracy")
        return {"model": str(model), "rm_accuracy": self.rm_accuracy(model), "rm_accuracy_variant_0": single}

    def rejection_sampling(self, d: Path, k: int, policy: Path, rm: Path) -> dict:
        """K samples per fresh prompt from the latest policy; the reward model's best of each is SFT data."""
        sft, _, sets, dropped = self.sample(d, k, "rs", self.cfg.rs_prompts, policy, rm, None, ("sft",))
        write_jsonl(d / "sft.jsonl", sft)
        write_jsonl(d / "sets.jsonl", sets)
        return {**self.sample_metrics(sft, sets, records=len(sft)), "dropped": dropped}

    def train_sft(self, d: Path, k: int, base: Path) -> dict:
        """SFT from the base on all rejection-sampled data so far."""
        files = [self.dir / f"round_{j}" / "rs" / "sft.jsonl" for j in range(1, k + 1)]
        _concat_jsonl(files, d / "train.jsonl")
        overrides = {
            "model.checkpoint": str(base),
            "data.train": str(d / "train.jsonl"),
            "data.eval": str(self.data / "eval_sft.jsonl"),
        }
        model = self.train("sft", d, overrides, self.cfg.sft, self.cfg.variants.get("sft"))
        return {"model": str(model), "sft_loss": last_eval(d / "variant_0", "loss"), **self.task_accuracy(model)}

    def new_pairs(self, d: Path, k: int, sft_model: Path, rm: Path) -> dict:
        """New preference pairs: K samples per fresh prompt from this round's SFT model, the verifier's best
        against its worst (the labels are exact, so every pair counts as significantly better)."""
        annotate = verifier_annotator(self.task.verify)
        sft, pairs, sets, dropped = self.sample(
            d, k, "pref", self.cfg.pref_prompts, sft_model, rm, annotate, ("pairs",)
        )
        write_jsonl(d / "pairs.jsonl", [{**p, "strength": "significantly_better"} for p in pairs])
        write_jsonl(d / "sets.jsonl", sets)
        return {**self.sample_metrics(sft, sets, records=len(pairs)), "dropped": dropped}

    def train_dpo(self, d: Path, k: int, sft_model: Path) -> dict:
        """DPO from this round's SFT model on this round's pairs; with several variants, each is evaluated
        beside their average."""
        variants = self.cfg.variants.get("dpo")
        overrides = {
            "model.checkpoint": str(sft_model),
            "data.train": str(self.dir / f"round_{k}" / "pref" / "pairs.jsonl"),
            "data.eval": str(self.data / "eval_pairs.jsonl"),
        }
        model = self.train("dpo", d, overrides, self.cfg.dpo, variants)
        out = {"model": str(model), "dpo_reward_accuracy": last_eval(d / "variant_0", "rewards/accuracies")}
        out.update(self.task_accuracy(model))
        if len(variants or []) > 1:  # the averaged model against the single ones
            out["variants"] = [self.task_accuracy(d / f"variant_{v}" / "model") for v in range(len(variants))]
        return out

    def report(self) -> None:
        """summary.json (the config and every stage's results), summary.md (a table), and the plots."""
        summary = {"config": dataclasses.asdict(self.cfg), "stages": self.results}
        _write_text(self.dir / "summary.json", json.dumps(summary, indent=1))
        table = summary_table(self.results)
        _write_text(self.dir / "summary.md", table + "\n")
        print(table)
        if self.cfg.plots:
            self.plot()

    def plot(self) -> None:
        from train.plots import HOW_TO_GET, have_matplotlib, line_chart

        if not have_matplotlib():
            print(f"plots: skipped (matplotlib is not installed); to get them: {HOW_TO_GET}, and rerun the pipeline")
            return
        labels, series = accuracy_by_stage(self.results)
        ylabel = f"fraction right ({self.cfg.eval_prompts} held-out prompts)"
        line_chart(self.dir / "accuracy.png", "Task accuracy by stage", labels, series, "stage", ylabel)
        drawn = [self.dir / "accuracy.png"]
        if self.cfg.rounds:
            labels, series = rewards_by_round(self.results, self.cfg.rounds)
            line_chart(self.dir / "rewards.png", "Reward accuracy by round", labels, series, "round", "fraction right")
            drawn.append(self.dir / "rewards.png")
        print("plots:", ", ".join(map(str, drawn)))

    # ------------------------------------------------------------------------------------- mechanics

    def stage_configs(self) -> dict:
        return {kind: _read_yaml(ROOT / file) for kind, file in sorted(self.cfg.configs.items())}

    def check_run_folder(self) -> None:
        """Record the config at the first start; refuse a later start whose config differs (HARMLESS and
        the stage configs' STAGE_SETS keys aside), so the results of two configs never mix. The record is
        never rewritten."""
        record, stages = self.dir / "pipeline.yaml", self.dir / "stage_configs.yaml"
        now = {**dataclasses.asdict(self.cfg), "stage_configs": self.stage_configs()}
        try:  # one pipeline per folder; each stage's training run also locks its own folder
            run_lock.hold(self.dir, "train/pipeline.py " + " ".join(sys.argv[1:]))
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
            _write_text(stages, yaml.safe_dump(now["stage_configs"], sort_keys=False))
            config = {k: v for k, v in now.items() if k != "stage_configs"}
            _write_text(record, yaml.safe_dump(config, sort_keys=False))  # last: the record is whole
            return
        saved = {**(_read_yaml(record) or {}), "stage_configs": _read_yaml(stages) if stages.is_file() else {}}
        changed = _differences(saved, now)
        # the stage configs' STAGE_SETS keys aside: the pipeline sets them for every stage run
        strict = _differences(_without_stage_sets(saved), _without_stage_sets(now))
        refused = [k for k in strict if k.split(".")[0] not in HARMLESS]
        if refused:
            lines = "".join(f"\n  {k}: {strict[k][0]!r} there, {strict[k][1]!r} now" for k in refused)
            raise PipelineError(
                f"{self.dir} was made with another config (recorded in {record.name} and {stages.name}); "
                f"differing:{lines}\n{START_OVER}"
            )
        if changed:
            print(f"{record}: {', '.join(changed)} changed (no stage's result depends on them); the record is kept")

    def stage(self, rnd: int, name: str, fn, *args) -> dict:
        """fn(stage_dir, rnd, *args) -> results, unless the stage's DONE marker exists: it holds the results."""
        d = self.dir / f"round_{rnd}" / name
        marker = d / "DONE"
        self.signals.check(f"before [round {rnd}] {name}")
        if marker.exists():
            result = json.loads(marker.read_text())
            print(f"[round {rnd}] {name}: done before, skipped", flush=True)
        else:
            d.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            try:
                result = {"round": rnd, "stage": name, **fn(d, rnd, *args), "seconds": round(time.time() - t0, 1)}
                with self.signals.deferred():  # the marker is written whole, or not at all
                    _write_text(marker, json.dumps(result, indent=1))
            except PipelineError as e:
                raise PipelineError(f"[round {rnd}] {name}: {e}") from None
            except Interrupted as e:  # no DONE marker: a rerun does the stage again (its training resumes)
                e.where = f"in [round {rnd}] {name}"
                raise
            shown = {k: v for k, v in result.items() if k not in ("round", "stage")}
            print(f"[round {rnd}] {name}: {json.dumps(shown)}")
        self.results.append(result)
        return result

    def train(self, kind: str, d: Path, overrides: dict, stage_overrides: dict, variants: list[dict] | None) -> Path:
        """torchrun train/<kind>.py per variant (resuming if interrupted), then average the models."""
        models = []
        for v, extra in enumerate(variants or [{}]):
            run_dir = d / f"variant_{v}"
            if not (run_dir / "model" / "config.json").exists():
                own = dict(zip(STAGE_SETS, (str(run_dir), False)))  # whatever the stage config file says
                args = {**stage_overrides, **overrides, **extra, **own}
                self.torchrun(kind, run_dir, args, d / f"variant_{v}.log")
            models.append(run_dir / "model")
        return average_checkpoints(models, d / "model")

    def torchrun(self, kind: str, run_dir: Path, args: dict, log_path: Path) -> None:
        """One training run, its output appended to log_path; a failure raises with the log's end."""
        if "model.checkpoint" in args:  # the stage's own start, not the config file's preset
            args["model.preset"] = None
        # every stage trains with the pipeline's tokenizer and chat format, whatever its start folder holds
        args.setdefault("model.chat_template", self.chat.template)
        if self.cfg.base is not None:
            args.setdefault("model.tokenizer", str(self.chat.tokenizer.path))
        script, config = str(ROOT / "train" / f"{kind}.py"), str(ROOT / self.cfg.configs[kind])
        cmd = torchrun_command(script, self.cfg.nproc, ["--config", config, *override_args(args)])
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // self.cfg.nproc))}
        with open(log_path, "a") as log:
            log.write(f"{ATTEMPT}{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
            log.flush()
            rc = self.signals.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if self.signals.signum is not None:  # forwarded to it: it saved (or not) and stopped
            raise Interrupted(self.signals.signum, _saved(kind, run_dir, log_path, rc, self.signals.killed))
        if rc != 0:
            raise PipelineError(
                f"train/{kind}.py failed (exit code {rc}) for {run_dir}; the end of its log {log_path}\n"
                f"{_tail(log_path)}\nRerunning the pipeline resumes from the last finished stage."
            )

    def sample(self, d: Path, k: int, split: str, n: int, model: Path, rm: Path, annotate, outputs: tuple):
        """K samples for each of n fresh prompts (saved as prompts.jsonl), scored by the reward model
        -> (SFT records, preference pairs by `annotate`, else by the RM, sets, drops) as train/sample.py.
        What is dropped on the way to the stage's `outputs` ("sft", "pairs") is printed, and returned
        as {DROPS key: count} (the stage's results keep it)."""
        c = self.cfg
        prompts = self.task.prompts(n, c.seed * 1000 + 2 * k + (split == "pref"), f"r{k}{split}")
        write_jsonl(d / "prompts.jsonl", prompts)
        records = read_prompts(d / "prompts.jsonl")  # parsed as sample.py parses a prompt file
        generator = torch.Generator().manual_seed(c.seed * 1000 + k)
        policy, reward = load_model(model).eval(), load_model(rm).eval()
        sft, pairs, sets, dropped = rejection_sample(
            records, policy, reward, self.chat, c.k, c.max_new_tokens, generator, c.temperature, annotate=annotate
        )
        lines, warning = drop_report(dropped, len(records), c.k, f"max_new_tokens {c.max_new_tokens}", outputs)
        for line in lines:
            print(f"[round {k}] {d.name}: {line}", flush=True)
        if warning:
            print(f"[round {k}] {d.name}: {warning}", file=sys.stderr, flush=True)
        return sft, pairs, sets, {key: dropped[key] for key in drops_for(outputs) if dropped.get(key)}

    def sample_metrics(self, sft: list[dict], sets: list[dict], records: int) -> dict:
        """How good the samples are by the verifier: all of them, the best of K (an oracle), the RM's picks."""
        verify = self.task.verify
        right = [[verify(s["prompt"][-1]["content"], t) for t in s["responses"]] for s in sets]
        picked = [verify(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in sft]
        return {
            "sample_accuracy": sum(map(sum, right)) / max(1, sum(map(len, right))),
            "best_of_k_oracle": sum(max(x) for x in right) / max(1, len(right)),
            "rm_pick_accuracy": sum(picked) / max(1, len(picked)),
            "mean_best_score": sum(r["score"] for r in sft) / max(1, len(sft)),
            "records": records,
        }

    @torch.no_grad()
    def task_accuracy(self, model_path: Path) -> dict:
        """The verifier's mean score on the held-out prompts: greedy, and over 4 samples at temperature 1."""
        model = load_model(model_path).eval()
        records = read_prompts(self.data / "eval_prompts.jsonl")
        ids = [self.chat.encode_dialog(r["messages"], add_generation_prompt=True).tokens for r in records]
        tok, out = self.chat.tokenizer, {}
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for key, n, temp in (("task_accuracy", 1, 0.0), ("task_accuracy_sampled", 4, 1.0)):
            samples = generate(
                model, ids, n, self.cfg.max_new_tokens, tok.stop_ids, temp, pad_id=tok.pad_id, generator=gen
            )
            scores = [
                self.task.verify(r["messages"][-1]["content"], decode_sample(tok, s))
                for r, ss in zip(records, samples)
                for s in ss
            ]
            out[key] = sum(scores) / len(scores)
        return out

    @torch.no_grad()
    def rm_accuracy(self, rm_path: Path) -> float:
        """Fraction of held-out pairs the reward model ranks right."""
        rm = load_model(rm_path).eval()
        path = self.data / "eval_pairs.jsonl"
        pairs = [json.loads(line) for line in path.read_text().splitlines()]
        prompts = [parse_prompt(p["prompt"], f"{path}:{i}") for i, p in enumerate(pairs, 1)]
        scores = score(rm, self.chat, prompts, [[p["chosen"], p["rejected"]] for p in pairs])
        return sum(s[0] > s[1] for s in scores) / len(scores)


# ---------------------------------------------------------------------------------------------- report

TABLE_COLUMNS = [
    "rm_accuracy", "rm_pick_accuracy", "sft_loss", "dpo_reward_accuracy", "task_accuracy", "task_accuracy_sampled",
]  # fmt: skip


def summary_table(results: list[dict]) -> str:
    """A markdown table: one row per stage (the data stage aside), one column per metric."""
    lines = ["| round | stage | " + " | ".join(TABLE_COLUMNS) + " |", "|---|---|" + "---:|" * len(TABLE_COLUMNS)]
    for r in results:
        if r["stage"] == "data":
            continue
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "" for c in TABLE_COLUMNS]
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


def describe() -> str:
    """Every key with its default and comment: the `--help` epilog."""
    comments = _comments(PipelineConfig)
    lines = []
    for f in dataclasses.fields(PipelineConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"  {f.name} = {default!r}" + (f"  # {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, epilog="keys (key = default):\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*", help="key=value")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        Pipeline(load_pipeline_config(args.config, args.overrides)).run()
    except PipelineError as e:
        raise SystemExit(f"pipeline: {e}") from None
    except Interrupted as e:
        try:
            print(f"\npipeline: {e}", file=sys.stderr, flush=True)
        except OSError:  # a SIGHUP: the terminal may be gone
            pass
        raise SystemExit(128 + e.signum) from None


if __name__ == "__main__":
    main()
