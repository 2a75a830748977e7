"""The Llama 3 recipe, round by round: what each stage reads, which job it launches, what it keeps.

    round 0   data      the task's data (a synthetic task writes it; the `files` task names the user's)
              pretrain  the base: a causal LM on the task's corpus, or the config's `base`
    round k   rm        reward model from the base on ALL preference data so far (seed + every round's pairs)
              rs        K samples per fresh prompt from the latest policy; the RM keeps the best (cleaned)
              sft       SFT from the base on all rejection-sampled data so far (+ the human SFT files)
              pref      new pairs from the SFT model's samples, labeled by the annotator: the task's
                        verifier, the latest RM (+ a safety RM), or people (the driver stops for labels)
              dpo       DPO from the SFT model (its reference) on this round's pairs only

Every stage that touches a model is a job started through the launcher (llama_posttrain/driver/launch.py): training
(train/{rm,sft,dpo}.py, once per variant), averaging of the variants (llama_posttrain/jobs/average.py), sampling
(llama_posttrain/jobs/sample.py) and evaluation (llama_posttrain/jobs/evaluate.py: task accuracy with a verifier, RM pair accuracy,
held-out NLL, the latest RM's mean score of a policy's samples). This file only plans: it writes the
jobs' inputs, reads their result files and keeps each stage's results in its DONE marker.

A DONE marker holds its paths (RESULT_PATHS) relative to the run folder, so a copied or renamed folder reads
its own results; a path outside it is one the config names (its base, the files task's files) or refused.
A sampling stage that produced nothing (0 SFT records, 0 pairs), or dropped more than the config's `max_dropped`
of its samples or prompts, is not marked done: it stops, saying why and which keys to change
(llama_posttrain/data/drops.py KNOBS); the pipeline's `from_stage` redoes it with them (REDO_KEYS).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from llama_posttrain.data.annotators import file_annotator, name_ids, preference_pair
from llama_posttrain.data.clean import CleanRules
from llama_posttrain.data.drops import drop_reason, drop_report, drops_for, too_lossy
from llama_posttrain.data.io import write_json, write_jsonl, write_text
from llama_posttrain.data.schema import ValidationError
from llama_posttrain.driver.launch import ATTEMPT, Job, JobFailed, Launcher, PipelineInterrupted
from llama_posttrain.driver.processes import log_end, rank_env
from llama_posttrain.jobs.configs import AverageConfig, EvalConfig, SampleConfig, args_of
from llama_posttrain.llama.chat import TEMPLATES
from llama_posttrain.train.config import NonNegInt, PosInt, from_flat_dict, opt, read_yaml
from llama_posttrain.train.logger import read_metrics

STAGE_KINDS = ("rm", "sft", "dpo")  # the training scripts; "pretrain" runs sft.py
FIRST_STAGES, ROUND_STAGES = ("data", "pretrain"), ("rm", "rs", "sft", "pref", "dpo")  # round 0's, each round's


def stage_names(rounds: int) -> list[str]:
    """Every stage of `rounds` rounds in the order `Recipe.run` does them: round_0/data, ..., round_<k>/dpo."""
    return [f"round_0/{s}" for s in FIRST_STAGES] + [
        f"round_{k}/{s}" for k in range(1, rounds + 1) for s in ROUND_STAGES
    ]


def stage_place(name: str) -> tuple[int, int] | None:
    """round_<k>/<stage> -> (k, its place in the round), the order of the stages; None if it names no stage."""
    head, _, stage = name.partition("/")
    k = head.removeprefix("round_")
    if not k.isdigit() or str(int(k)) != k:
        return None
    stages = FIRST_STAGES if int(k) == 0 else ROUND_STAGES
    return (int(k), stages.index(stage)) if stage in stages else None


EVAL_SIZE = 200  # a synthetic task's held-out preference pairs, SFT records and pre-training dialogs
# Stage config keys the pipeline sets for every stage run: their values in the stage config files are
# never used, so a change of them (a stage config's own run folder) changes no result.
# logging.group / job_type / name: the stage run's place on the dashboard (wandb: the pipeline run's group,
# the stage, round_k/stage/variant_v).
STAGE_SETS = ("train.run_dir", "logging.progress", "logging.group", "logging.job_type", "logging.name")
# The training configs' keys that name files or folders: a stage override's relative path is made absolute
# (relative to where the pipeline started), and so is one a stage config file names (Recipe.file_paths). tests/
# check the list is whole.
PATH_KEYS = (
    "model.checkpoint",
    "model.tokenizer",
    "data.train",
    "data.eval",
    "data.cache_dir",
    "dpo.reference_checkpoint",
    "train.run_dir",
)
# The sampling keys: they change only what the rs and pref stages draw, so they may change for a redo of the
# stages from a named one on (the pipeline's from_stage; max_new_tokens is the evaluations' budget too: the stages
# before it keep their evaluations).
REDO_KEYS = (
    "max_new_tokens",
    "temperature",
    "k",
    "cleaning",
    "sample_batch_size",
    "sample_compile",
    "sample_nproc",
    "engine",
    "vllm_gpu_memory_utilization",
    "vllm_max_model_len",
)
RESULT_PATHS = ("model", "files")  # the results (DONE markers) that hold paths: "files" {what: path or [paths]}
MARKER_NEEDS = {"data": ("files",), **dict.fromkeys(("pretrain", "rm", "sft", "dpo"), ("model",))}  # read later


def absolute(path) -> str:
    """A path as the jobs need it: relative to the directory the pipeline started in (the driver's), absolute."""
    return os.path.abspath(os.path.expanduser(str(path)))


def absolute_paths(overrides: dict) -> dict:
    """A stage's overrides with the PATH_KEYS values absolute (data.train: a path, a list, [{path, weight}])."""

    def fix(value):
        if isinstance(value, str):
            return absolute(value)
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            return {**value, "path": absolute(value["path"])}
        return value

    return {k: fix(v) if k in PATH_KEYS and v is not None else v for k, v in overrides.items()}


def _map_paths(result: dict, fn) -> dict:
    """`result` with fn applied to each path it holds (RESULT_PATHS)."""

    def each(value):
        if isinstance(value, list):
            return [each(v) for v in value]
        return fn(value) if isinstance(value, str) else value

    out = dict(result)
    if isinstance(out.get("model"), str):
        out["model"] = fn(out["model"])
    if isinstance(out.get("files"), dict):
        out["files"] = {k: each(v) for k, v in out["files"].items()}
    return out


NEAR_CHANCE = 0.6  # a reward model's held-out pair accuracy below this is said: its rankings are close to coin flips


def near_chance(accuracy: float | None) -> str | None:
    """The warning for a reward model whose held-out pair accuracy is near chance (0.5), else None."""
    if accuracy is None or accuracy >= NEAR_CHANCE:
        return None
    return (
        f"warning: the reward model's held-out pair accuracy {accuracy:.3f} is near chance (0.5): rejection "
        "sampling's picks will be close to random ones; train it longer or on more pairs (rm: {train.steps: ...}, "
        "seed_pairs)"
    )


class StageError(RuntimeError):
    """A stage cannot go on: printed as one message (the pipeline's PipelineError)."""


class WaitingForLabels(RuntimeError):
    """The human annotator's sets are written; the pipeline stops until their labels are there."""


def override_args(overrides: dict) -> list[str]:
    """{"train.steps": 3} -> ["train.steps=3"]: a training script's command-line overrides (values as JSON)."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def last_eval(run_dir: Path, key: str) -> float | None:
    """The last logged `eval/<key>` of a training run, None if it never evaluated."""
    values = [m[f"eval/{key}"] for m in read_metrics(Path(run_dir) / "metrics.jsonl") if f"eval/{key}" in m]
    return values[-1] if values else None


def copy_folder(src: Path, dst: Path) -> None:
    """dst: a copy of the folder src (files and times, `cp -a`), whole or not at all: copied beside it, then
    renamed over any earlier dst (an interrupted attempt's, as is an interrupted copy; one driver per run folder)."""
    tmp = dst.with_name(f".{dst.name}.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, symlinks=True)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _concat_jsonl(files: list[Path], out: Path) -> None:
    write_jsonl(out, [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()])


@dataclass
class Cleaning:
    """`cleaning`: rejection sampling's filters, each a llama_posttrain/jobs/sample.py flag (the rules of
    llama_posttrain/data/clean.py), checked when the pipeline starts rather than when sampling does."""

    dedup: bool = opt(False, "--dedup: drop an SFT record repeating an earlier prompt+response")
    max_chars: PosInt | None = opt(None, "--max-chars: drop a sample longer than this")
    max_repeat: float | None = opt(None, "--max-repeat: drop a sample whose repeated n-grams cover more, in [0, 1]")
    repeat_ngram: PosInt = opt(3, "--repeat-ngram: the n of max_repeat")
    ban_phrase: list[str] = opt([], "--ban-phrase, each: drop a sample containing it (case-insensitive)")
    max_emoji: NonNegInt | None = opt(None, "--max-emoji: drop a sample with more emoji")
    max_exclamation: NonNegInt | None = opt(None, "--max-exclamation: drop a sample with more exclamation marks")

    @classmethod
    def of(cls, cleaning: dict, where: str = "cleaning") -> Cleaning:
        """The pipeline's `cleaning` mapping, checked; ValueError naming `where` and the key."""
        return from_flat_dict(cls, cleaning, where)

    def rules(self) -> CleanRules:
        return CleanRules(
            self.max_repeat, self.repeat_ngram, tuple(self.ban_phrase), self.max_emoji, self.max_exclamation
        )

    def __post_init__(self):
        if self.max_repeat is not None and not 0 <= self.max_repeat <= 1:
            raise ValueError(f"max_repeat: a fraction in [0, 1], got {self.max_repeat}")
        if any(not p.strip() for p in self.ban_phrase):
            raise ValueError("ban_phrase: an empty phrase would ban every sample")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


class Recipe:
    """The rounds of one pipeline config in one run folder. `chat`: the pipeline's chat format (every stage
    trains, samples and evaluates with its tokenizer and template)."""

    def __init__(self, cfg, task, chat, run_dir: Path, launcher: Launcher, stage_config_file):
        self.cfg, self.task, self.chat, self.dir, self.launcher = cfg, task, chat, run_dir, launcher
        self.stage_config_file = stage_config_file  # kind -> the stage's config file (absolute)
        self.cleaning = Cleaning.of(cfg.cleaning)  # checked when the pipeline's config was read
        self.results: list[dict] = []
        self.averages_copied = 0  # averaging jobs not run: one model each, copied (copy_model)
        self.verify = getattr(task, "verify", None)
        self.annotator = cfg.annotator if cfg.annotator != "auto" else ("verifier" if self.verify else "rm")
        if self.annotator == "verifier" and self.verify is None:
            raise StageError(f"annotator: verifier, but task {cfg.task!r} has no verifier: use rm or human")

    @property
    def data(self) -> Path:
        return self.dir / "round_0" / "data"

    def files(self) -> dict:
        """The data every round reads: written by the data stage (a synthetic task), or the user's (files)."""
        return self.read_marker(self.data / "DONE", needs=("files",))["files"]

    # ------------------------------------------------------------------------------------------ rounds

    def run(self) -> list[dict]:
        self.stage(0, "data", self.make_data)
        base = Path(self.stage(0, "pretrain", self.pretrain)["model"])
        policy = base
        for k in range(1, self.cfg.rounds + 1):
            rm = Path(self.stage(k, "rm", self.train_rm, base)["model"])
            self.stage(k, "rs", self.rejection_sampling, policy, rm)
            sft = Path(self.stage(k, "sft", self.train_sft, base, rm)["model"])
            self.stage(k, "pref", self.new_pairs, sft, rm)
            policy = Path(self.stage(k, "dpo", self.train_dpo, sft, rm)["model"])
        if self.cfg.rounds:  # every policy's held-out samples scored by one RM, the last round's
            self.score_with_last_rm(rm)
        if self.averages_copied:
            print(f"pipeline: {self.averages_copied} averages of one model copied, not run as jobs", flush=True)
        return self.results

    def make_data(self, d: Path, k: int) -> dict:
        """A synthetic task's data for every round (seed pairs, eval sets, pre-training corpus), or the
        `files` task's own files, checked; -> {"files": {what: path(s)}}."""
        c, seed = self.cfg, self.cfg.seed * 7919
        if hasattr(self.task, "files"):  # the user's data: nothing to write
            return {"files": self.task.files()}
        if c.base is None:
            write_jsonl(d / "pretrain.jsonl", self.task.pretrain_corpus(c.pretrain_examples, seed))
            write_jsonl(d / "pretrain_eval.jsonl", self.task.pretrain_corpus(EVAL_SIZE, seed + 1))
        pairs, eval_pairs, eval_sft = self.task.seed_data(c.seed_pairs, EVAL_SIZE, seed + 2)
        write_jsonl(d / "seed_pairs.jsonl", pairs)
        write_jsonl(d / "eval_pairs.jsonl", eval_pairs)
        write_jsonl(d / "eval_prompts.jsonl", self.task.prompts(c.eval_prompts, seed + 3, "eval"))
        write_jsonl(d / "eval_sft.jsonl", eval_sft)
        files = {"preferences": [str(d / "seed_pairs.jsonl")], "sft": []}
        files.update({name: str(d / f"{name}.jsonl") for name in ("eval_pairs", "eval_prompts", "eval_sft")})
        return {"seed_pairs": c.seed_pairs, "files": files}

    def pretrain(self, d: Path, k: int) -> dict:
        """The base: an LM pre-trained on the task's corpus (every token a target), or the config's `base`."""
        c = self.cfg
        if c.base is not None:
            return {"model": absolute(c.base), **self.eval_job(d, Path(absolute(c.base)), "base", rm=None)}
        overrides = {
            "model.preset": c.preset,
            "data.train": str(self.data / "pretrain.jsonl"),
            "data.eval": str(self.data / "pretrain_eval.jsonl"),
            "sft.mask_prompt": False,
        }
        model = self.train("sft", d, overrides, c.pretrain, c.variants.get("pretrain"))
        return {"model": str(model), **self.eval_job(d, model, "base", rm=None)}

    def train_rm(self, d: Path, k: int, base: Path) -> dict:
        """Reward model from the base on all preference data so far: the seed data and every earlier round's."""
        files = self.files()["preferences"] + [
            str(self.dir / f"round_{j}" / "pref" / "pairs.jsonl") for j in range(1, k)
        ]
        overrides = {"model.checkpoint": str(base), "data.train": self.train_data(files, d / "train.jsonl")}
        if self.files().get("eval_pairs"):
            overrides["data.eval"] = self.files()["eval_pairs"]
        model = self.train("rm", d, overrides, self.cfg.rm, self.cfg.variants.get("rm"))
        single = last_eval(d / "variant_0", "accuracy")
        result = {"model": str(model), **self.eval_job(d, model, "rm", rm=None), "rm_accuracy_variant_0": single}
        if (warning := near_chance(result.get("rm_accuracy"))) is not None:
            print(f"{self.where(d)}: {warning}", flush=True)
        return result

    def rejection_sampling(self, d: Path, k: int, policy: Path, rm: Path) -> dict:
        """K samples per fresh prompt from the latest policy; the reward model's best of each (after the
        cleaning rules) is SFT data."""
        report = self.sample(d, k, "rs", self.cfg.rs_prompts, policy, rm, ("sft",), annotate=None)
        sft = [json.loads(line) for line in (d / "sft.jsonl").read_text().splitlines()]
        self.check_losses(d, report, ("sft",), len(sft), d / "sft.jsonl", "SFT records", "rs_prompts")
        return {**self.sample_metrics(d, sft), "records": len(sft), "dropped": report}

    def train_sft(self, d: Path, k: int, base: Path, rm: Path) -> dict:
        """SFT from the base on all rejection-sampled data so far, and the task's human SFT files (weighted)."""
        rs = [str(self.dir / f"round_{j}" / "rs" / "sft.jsonl") for j in range(1, k + 1)]
        train = self.train_data(rs, d / "train.jsonl")
        human = self.files().get("sft") or []
        if human:
            w = self.cfg.sft_weights
            train = [{"path": train, "weight": w.get("rejection_sampled", 1.0)}] + [
                {"path": f, "weight": w.get("human", 1.0)} for f in human
            ]
        overrides = {"model.checkpoint": str(base), "data.train": train}
        if self.files().get("eval_sft"):
            overrides["data.eval"] = self.files()["eval_sft"]
        model = self.train("sft", d, overrides, self.cfg.sft, self.cfg.variants.get("sft"))
        return {
            "model": str(model),
            "sft_loss": last_eval(d / "variant_0", "loss"),
            **self.eval_job(d, model, "sft", rm),
        }

    def new_pairs(self, d: Path, k: int, sft_model: Path, rm: Path) -> dict:
        """New preference pairs from K samples per fresh prompt of this round's SFT model, best against worst
        by the annotator: the task's verifier (exact: every pair significantly better), the latest RM
        (+ safety_rm), or people: the sets are written to label and the pipeline stops until they are."""
        c = self.cfg
        annotate = {"verifier": f"verifier:{c.task}", "rm": None, "human": None}[self.annotator]
        outputs = ("pairs",) if self.annotator != "human" else ()
        report = self.sample(d, k, "pref", c.pref_prompts, sft_model, rm, outputs, annotate=annotate)
        if self.annotator == "human":  # the samples, before anyone labels them; the labels' ties are people's calls
            self.check_losses(d, report, ("pairs",), None, d / "sets.jsonl", "sets to label", "pref_prompts")
            report = self.human_pairs(d)
        strength = "significantly_better" if self.annotator == "verifier" else None
        pairs = [json.loads(line) for line in (d / "sampled_pairs.jsonl").read_text().splitlines()]
        if not pairs and self.annotator == "human":
            raise StageError(
                f"{d / 'sampled_pairs.jsonl'}: 0 preference pairs from {c.pref_prompts} prompts x {c.k} samples "
                f"(dropped: {json.dumps(report)}); not marked done, DPO would have nothing to train on: label some "
                f"sets of {d / 'labels.jsonl'} with a strict preference, then rerun"
            )
        if self.annotator != "human":
            self.check_losses(
                d, report, ("pairs",), len(pairs), d / "sampled_pairs.jsonl", "preference pairs", "pref_prompts"
            )
        write_jsonl(d / "pairs.jsonl", [{**p, "strength": strength} if strength else p for p in pairs])
        sft = [json.loads(line) for line in (d / "sft.jsonl").read_text().splitlines()] if self.verify else []
        return {**self.sample_metrics(d, sft), "records": len(pairs), "dropped": report}

    def check_losses(
        self, d: Path, report: dict, outputs: tuple, made: int | None, file: Path, what: str, prompts_key: str
    ) -> None:
        """Stop a sampling stage (not marked done) that made nothing, or dropped more than `max_dropped` of its
        samples or (`made`: the records it made; None: the samples only) of its prompts: the reason, the keys
        to change (llama_posttrain/data/drops.py KNOBS), how to redo the stage with them or accept the loss."""
        c = self.cfg
        prompts = len((d / "prompts.jsonl").read_text().splitlines())
        why = too_lossy(report, prompts, c.k, f"max_new_tokens {c.max_new_tokens}", c.max_dropped, outputs, made)
        if why is None and made != 0:
            return
        nothing = {
            "sft": ": SFT would have no rejection-sampled record",
            "pairs": ": DPO would have nothing to train on",
        }
        accept = (
            f"; or keep these samples with a larger `max_dropped` (now {c.max_dropped:g}; 1: stop only when nothing "
            "is left) and the same command"
            if made != 0
            else ""
        )
        raise StageError(
            f"{file}: {f'{made} {what} from ' if made is not None else ''}{prompts} prompts x {c.k} samples "
            f"(dropped: {json.dumps(report)}; {d / 'sample.log'} has the counts): "
            f"{why or 'every prompt lost its samples'}. Not marked done{nothing[outputs[0]] if made == 0 else ''}. "
            f"To go on: redo this stage with the keys changed, adding `from_stage={d.parent.name}/{d.name}` (its "
            f"samples are moved aside and drawn again; the sampling keys {', '.join(REDO_KEYS[:4])} and the "
            f"engine's may change so){accept}; more {prompts_key}: a new `name`"
        )

    def human_pairs(self, d: Path) -> dict:
        """The human annotator: the sets to label (each prompt's samples that the drop rules keep: finished,
        not empty, the cleaning rules) are written; once labels.jsonl is there, pairs from it."""
        labels, to_label = d / "labels.jsonl", d / "to_label.jsonl"
        dropped = {"no_pair_fewer_than_2": 0, "no_pair": 0}
        if not labels.is_file():
            c, rules = self.cleaning, self.cleaning.rules()
            sets = []
            for s in map(json.loads, (d / "sets.jsonl").read_text().splitlines()):
                kept = [t for t, f in zip(s["responses"], s["finished"]) if not drop_reason(t, f, c.max_chars, rules)]
                if len(kept) < 2:
                    dropped["no_pair_fewer_than_2"] += 1
                else:
                    sets.append({"id": s["id"], "prompt": s["prompt"], "responses": kept})
            write_jsonl(to_label, sets)
            write_json(d / "to_label_dropped.json", dropped)
            raise WaitingForLabels(
                f"{len(sets)} sets to label in {to_label} ({dropped['no_pair_fewer_than_2']} prompts with fewer than "
                f"2 usable samples left out): write {labels}, one JSON line per set, "
                '{"id": ..., "ranking": [best response index, ..., worst]} or {"id": ..., "scores": [...]}; '
                "then rerun the same command (it continues from this stage)"
            )
        dropped = json.loads((d / "to_label_dropped.json").read_text())
        try:  # every bad label named (file:line: field), a label for no set of to_label.jsonl among them
            annotate = file_annotator(labels, sets=to_label)
        except ValidationError as e:
            raise StageError(f"{e}\nfix {labels.name} and rerun the same command") from None
        pairs = []
        for s in map(json.loads, to_label.read_text().splitlines()):
            scores = annotate(s, s["responses"])  # None: a set the file does not label (partial labelling)
            pair = preference_pair({"messages": s["prompt"]}, s["responses"], scores) if scores is not None else None
            if pair is None:
                key = "no_pair_unlabelled" if scores is None else "no_pair"
                dropped[key] = dropped.get(key, 0) + 1
            else:
                pairs.append({"id": s["id"], **pair})
        write_jsonl(d / "sampled_pairs.jsonl", pairs)
        print(
            f"pref: {len(pairs)} pairs from {labels}; {dropped['no_pair']} sets without a strict preference, "
            f"{dropped.get('no_pair_unlabelled', 0)} sets not labelled{name_ids(annotate.unlabelled)}"
        )
        return {key: n for key, n in dropped.items() if n}

    def train_dpo(self, d: Path, k: int, sft_model: Path, rm: Path) -> dict:
        """DPO from this round's SFT model on this round's pairs; with several variants, each is evaluated
        beside their average."""
        variants = self.cfg.variants.get("dpo")
        overrides = {
            "model.checkpoint": str(sft_model),
            "data.train": str(self.dir / f"round_{k}" / "pref" / "pairs.jsonl"),
        }
        if self.files().get("eval_pairs"):
            overrides["data.eval"] = self.files()["eval_pairs"]
        model = self.train("dpo", d, overrides, self.cfg.dpo, variants)
        out = {"model": str(model), "dpo_reward_accuracy_variant_0": last_eval(d / "variant_0", "rewards/accuracies")}
        out.update(self.eval_job(d, model, "dpo", rm, reference=sft_model))  # the averaged model's reward accuracy
        if len(variants or []) > 1:  # the averaged model against the single ones
            out["variants"] = [
                self.eval_job(d, d / f"variant_{v}" / "model", f"dpo_variant_{v}", rm) for v in range(len(variants))
            ]
        return out

    # ------------------------------------------------------------------------------------------ stages

    def stage(self, rnd: int, name: str, fn, *args) -> dict:
        """fn(stage_dir, rnd, *args) -> results, unless the stage's DONE marker exists: it holds the results
        (its paths relative to the run folder; the results returned hold them absolute)."""
        d = self.dir / f"round_{rnd}" / name
        marker = d / "DONE"
        if marker.exists():
            result = self.read_marker(marker, needs=MARKER_NEEDS.get(name, ()))
            print(f"[round {rnd}] {name}: done before, skipped", flush=True)
        else:
            t0 = time.time()
            try:
                d.mkdir(parents=True, exist_ok=True)
                result = {"round": rnd, "stage": name, **fn(d, rnd, *args), "seconds": round(time.time() - t0, 1)}
                with self.launcher.signals.deferred():  # the marker is written whole, or not at all
                    write_text(marker, json.dumps(_map_paths(result, self.relative), indent=1))
            except (StageError, JobFailed) as e:
                raise StageError(f"[round {rnd}] {name}: {e}") from None
            except OSError as e:  # the driver's own files: a full disk, a folder made read-only
                raise StageError(f"[round {rnd}] {name}: {e.filename}: {e.strerror or e}; rerun once fixed") from None
            except PipelineInterrupted as e:  # no DONE marker: a rerun does the stage again (its training resumes)
                e.where = f"in [round {rnd}] {name}"
                raise
            shown = {k: v for k, v in _map_paths(result, self.relative).items() if k not in ("round", "stage", "files")}
            print(f"[round {rnd}] {name}: {json.dumps(shown)}", flush=True)
        self.results.append(_map_paths(result, self.relative))  # the report's (summary.json): as the markers
        return result

    def relative(self, path: str) -> str:
        """A result's path as a marker holds it: relative to the run folder if inside it, else as it is."""
        p, here = Path(path).resolve(), self.dir.resolve()
        return str(p.relative_to(here)) if p.is_relative_to(here) else path

    def outside_inputs(self) -> set[Path]:
        """The paths outside the run folder a marker may hold: the config's base, the files task's files."""
        named = [self.cfg.base] if self.cfg.base is not None else []
        if hasattr(self.task, "files"):
            for value in self.task.files().values():
                named += value if isinstance(value, list) else [value]
        return {Path(absolute(p)).resolve() for p in named if p}

    def read_marker(self, marker: Path, needs: tuple = ()) -> dict:
        """A DONE marker's results with its paths absolute; a marker that is not one the pipeline wrote, or
        that points outside this run folder at something the config does not name, stops with what to do.
        A marker written before markers held relative paths (absolute, inside this folder) is read, and
        rewritten relative so that a copy of the folder reads its own."""
        redo = f"delete {marker} (and the later stages' DONE markers) to redo the stage"
        try:
            result = json.loads(marker.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise StageError(f"{marker}: not a DONE marker the pipeline wrote ({e or 'empty'}): {redo}") from None
        missing = [k for k in ("round", "stage", *needs) if not isinstance(result, dict) or k not in result]
        if missing:
            raise StageError(f"{marker}: not a DONE marker the pipeline wrote (no {', '.join(missing)}): {redo}")
        here, outside, old = self.dir.resolve(), [], []

        def resolve(value: str) -> str:
            p = Path(value)
            full = (here / p).resolve()
            if not full.is_relative_to(here) and full not in self.outside_inputs():
                outside.append(value)
            elif p.is_absolute() and full.is_relative_to(here):
                old.append(value)
            return str(self.dir / full.relative_to(here)) if full.is_relative_to(here) else value

        resolved = _map_paths(result, resolve)
        if outside:
            raise StageError(
                f"{marker}: points outside this run folder {self.dir} at {outside[0]}, which the config does not "
                "name: the folder was copied or renamed from another one whose markers held absolute paths, and "
                f"would read that folder's results. Run this version once in the original folder (it rewrites its "
                f"markers relative) and copy it again, or {redo}"
            )
        if old:
            write_text(marker, json.dumps(_map_paths(result, self.relative), indent=1))
        return resolved

    @staticmethod
    def where(d: Path) -> str:
        return f"[round {d.parent.name.removeprefix('round_')}] {d.name}"  # round_1/sft -> "[round 1] sft"

    def job(self, name: str, script: str, args: list[str], log: Path, nproc: int, run_dir=None) -> None:
        """One job through the launcher, every rank with the same settings whatever the launcher and however its
        ranks are laid out over nodes (rank_env: threads from all its ranks, nproc x nnodes)."""
        env = rank_env(max(1, nproc) * (self.cfg.nnodes if nproc else 1))
        self.launcher.run(Job(name, script, args, log, nproc, env, run_dir))

    def train_data(self, files: list[str], out: Path):
        """A training run's data.train for these files: one concatenated JSONL file where all are JSONL
        (the order of a single file), else the list (the loader reads each format)."""
        if all(str(f).endswith(".jsonl") for f in files):
            _concat_jsonl([Path(f) for f in files], out)
            return str(out)
        return [str(f) for f in files]

    def train(self, kind: str, d: Path, overrides: dict, stage_overrides: dict, variants: list[dict] | None) -> Path:
        """train/<kind>.py per variant (a run resumes if interrupted), then the variants' average."""
        models = []
        for v, extra in enumerate(variants or [{}]):
            run_dir = d / f"variant_{v}"
            if not (run_dir / "model" / "config.json").exists():
                place = (self.cfg.name, d.name, f"{d.parent.name}/{d.name}/variant_{v}")  # group, job type, name
                own = dict(zip(STAGE_SETS, (str(run_dir), False, *place)))  # whatever the stage config file says
                args = absolute_paths(
                    {**self.file_paths(kind, d, overrides), **stage_overrides, **overrides, **extra, **own}
                )
                if "model.checkpoint" in args:  # the stage's own start, not the config file's preset
                    args["model.preset"] = None
                if self.chat.template in TEMPLATES:  # the pipeline's format throughout; a folder's own template
                    args.setdefault("model.chat_template", self.chat.template)  # travels with its checkpoints
                if self.cfg.base is not None:
                    args.setdefault("model.tokenizer", absolute(self.chat.tokenizer.path))
                argv = ["--config", str(self.stage_config_file[kind]), *override_args(args)]
                name = self.where(d) + (f" variant {v}" if len(variants or []) > 1 else "")
                self.job(
                    name, f"llama_posttrain/train/{kind}.py", argv, d / f"variant_{v}.log", self.cfg.nproc, run_dir
                )
            models.append(run_dir / "model")
        if len(models) == 1:  # the average of one model is that model: no job (a process start, torch's import)
            self.copy_model(d, models[0])
            return d / "model"
        average = args_of(AverageConfig(checkpoints=[str(m) for m in models], out=str(d / "model")))
        self.job(f"{self.where(d)}: averaging", "llama_posttrain/jobs/average.py", average, d / "average.log", nproc=0)
        return d / "model"

    def copy_model(self, d: Path, model: Path) -> None:
        """The average of one model, without a job: its folder copied to the stage's model folder. That is what
        llama_posttrain/jobs/average.py would write: the same tensors (a weight of 1 in fp64 is exact), config,
        tokenizer and other files. Said in average.log, whose first line is the command that redoes it, and
        counted (`averages_copied`, printed at the end)."""
        out, log, t0 = d / "model", d / "average.log", time.time()
        cmd = f"cp -a -T {shlex.quote(str(model))} {shlex.quote(str(out))}"
        with open(log, "a") as f:
            f.write(f"{ATTEMPT}{time.strftime('%Y-%m-%d %H:%M:%S')}: cd {shlex.quote(os.getcwd())} && {cmd}\n")
        copy_folder(model, out)
        said = f"one model: {model} copied to {out}, llama_posttrain/jobs/average.py not run (its average is itself)"
        with open(log, "a") as f:
            f.write(said + "\n")
        log_end(log, 0, time.time() - t0)
        print(f"{self.where(d)}: averaging: {said}", flush=True)
        self.averages_copied += 1

    def file_paths(self, kind: str, d: Path, overrides: dict) -> dict:
        """What a training job takes from its stage config file's paths, given to it absolute: the PATH_KEYS the
        file names, relative to the directory the pipeline started in (as for the file's own command started
        there; the job's folder plays no part); the tokenized caches in the run folder's .tokenized unless the
        file names a data.cache_dir. Its data is the pipeline's: data.eval is the task's eval file or none (a
        value of the file's replaced by none is said)."""
        file = self.stage_config_file[kind]
        raw = read_yaml(file) or {}
        named = {f"{s}.{k}": v for s, keys in raw.items() if isinstance(keys, dict) for k, v in keys.items()}
        out = {"data.cache_dir": str(self.dir / ".tokenized")}
        keep = {k: v for k, v in named.items() if k in PATH_KEYS and v is not None}
        if "model.preset" in overrides:  # pretraining from a preset: the file's checkpoint is not made the start
            keep.pop("model.checkpoint", None)
        out.update(keep)
        out["data.eval"] = None
        if named.get("data.eval") and "data.eval" not in overrides:
            print(
                f"{self.where(d)}: {file}: data.eval {named['data.eval']} not used: the pipeline evaluates on the "
                "task's eval files (none here; the files task's eval_pairs / eval_sft)",
                flush=True,
            )
        return out

    def model_keys(self) -> dict:
        """A job's tokenizer and chat template: the pipeline's (SampleConfig's and EvalConfig's keys)."""
        keys = {"chat_template": self.chat.template} if self.chat.template in TEMPLATES else {}
        return keys | ({"tokenizer": absolute(self.chat.tokenizer.path)} if self.cfg.base is not None else {})

    def sample(self, d: Path, k: int, split: str, n: int, model: Path, rm: Path, outputs: tuple, annotate) -> dict:
        """A sampling job: K samples for each of n fresh prompts (prompts.jsonl), scored by the RM; ->
        {DROPS key: count} of what was dropped on the way to `outputs` (printed too)."""
        c = self.cfg
        report_file = d / "sample_report.json"
        if not report_file.is_file():  # (a human annotator's rerun finds the samples done)
            write_jsonl(d / "prompts.jsonl", self.fresh_prompts(k, split, n))
            native = c.engine == "native"
            job = SampleConfig(
                policy=str(model), rm=str(rm), prompts=str(d / "prompts.jsonl"), **self.model_keys(), k=c.k,
                max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=c.seed * 1000 + k, engine=c.engine,
                out_report=str(report_file), out_sft=str(d / "sft.jsonl"), out_sets=str(d / "sets.jsonl"),
                out_pairs=str(d / "sampled_pairs.jsonl"), annotate=annotate or None,
                task_args=c.task_args if annotate else None, safety_rm=absolute(c.safety_rm) if c.safety_rm else None,
                **dataclasses.asdict(self.cleaning), **({
                    "batch_size": c.sample_batch_size, "compile": c.sample_compile,
                    "compile_mode": None if c.sample_compile_mode == "default" else c.sample_compile_mode,
                } if native else {
                    "vllm_gpu_memory_utilization": c.vllm_gpu_memory_utilization,
                    "vllm_max_model_len": c.vllm_max_model_len or None,
                }),
            )  # fmt: skip
            nproc = 0 if c.engine == "vllm" else (c.sample_nproc or c.nproc)
            self.job(f"{self.where(d)}: sampling", "llama_posttrain/jobs/sample.py", args_of(job), d / "sample.log",
                     nproc)  # fmt: skip
        dropped = json.loads(report_file.read_text()).get("dropped", {})
        records = len((d / "prompts.jsonl").read_text().splitlines())
        lines, warning = drop_report(dropped, records, c.k, f"max_new_tokens {c.max_new_tokens}", outputs)
        for line in lines:
            print(f"[round {k}] {d.name}: {line}", flush=True)
        if warning:
            print(f"[round {k}] {d.name}: {warning}", flush=True)
        return {key: dropped[key] for key in drops_for(outputs) if dropped.get(key)}

    def fresh_prompts(self, k: int, split: str, n: int) -> list[dict]:
        """Prompts no round used before: a synthetic task makes them; a prompt pool is drawn in order."""
        c = self.cfg
        if not hasattr(self.task, "prompt_pool"):
            return self.task.prompts(n, c.seed * 1000 + 2 * k + (split == "pref"), f"r{k}{split}")
        pool = self.task.prompt_pool(c.seed)
        start = (k - 1) * (c.rs_prompts + c.pref_prompts) + (c.rs_prompts if split == "pref" else 0)
        if start + n > len(pool):
            raise StageError(
                f"the prompt pool has {len(pool)} prompts; round {k}'s {split} needs prompts {start + 1}..{start + n} "
                f"(rounds x (rs_prompts + pref_prompts) = {c.rounds * (c.rs_prompts + c.pref_prompts)}): a prompt "
                "is never used twice, so give more prompts or fewer rounds / prompts per round"
            )
        return pool[start : start + n]

    def sample_metrics(self, d: Path, sft: list[dict]) -> dict:
        """How good the samples are by the verifier (a task that has one): all of them, the best of K (an
        oracle), the RM's picks; the RM's mean best score."""
        out = {"mean_best_score": sum(r["score"] for r in sft) / max(1, len(sft))} if sft else {}
        if self.verify is None:
            return out
        sets = [json.loads(line) for line in (d / "sets.jsonl").read_text().splitlines()]
        right = [[self.verify(s["prompt"][-1]["content"], t) for t in s["responses"]] for s in sets]
        picked = [self.verify(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in sft]
        return {
            "sample_accuracy": sum(map(sum, right)) / max(1, sum(map(len, right))),
            "best_of_k_oracle": sum(max(x) for x in right) / max(1, len(right)),
            "rm_pick_accuracy": sum(picked) / max(1, len(picked)),
            **out,
        }

    def eval_job(self, d: Path, model: Path, name: str, rm: Path | None, reference: Path | None = None) -> dict:
        """An evaluation job of a model: a reward model's pair accuracy (`name` "rm"); a policy's task accuracy
        (a task with a verifier), held-out NLL, the latest RM's mean score of its samples, and (`reference`:
        the DPO model's SFT model) the DPO implicit reward accuracy on the held-out pairs, as the DPO run's
        eval computes it. A policy (base, sft, dpo) keeps its samples for the last RM (score_with_last_rm).
        -> the metrics, `n` (each one's sample size) and `std` (of a mean's terms)."""
        c, files = self.cfg, self.files()
        out = d / f"eval_{name}.json"
        if not out.is_file():
            keys = {"model": str(model), "out": str(out), **self.model_keys()}
            if name == "rm":
                if not files.get("eval_pairs"):
                    return {}
                keys["pairs"] = files["eval_pairs"]
            else:
                prompts = files.get("eval_prompts")
                keep = name in ("base", "sft", "dpo") and c.rounds > 0  # samples for the last round's RM
                if prompts and (self.verify is not None or rm is not None or keep):
                    keys |= {"prompts": prompts, "max_new_tokens": c.max_new_tokens, "seed": c.seed}
                    keys |= {"batch_size": c.eval_batch_size, "keep_samples": keep}
                if prompts and self.verify is not None:
                    keys |= {"verifier": c.task, "task_args": c.task_args}
                if prompts and rm is not None:
                    keys["rm"] = str(rm)
                if files.get("eval_sft"):
                    keys["nll"] = files["eval_sft"]
                if reference is not None and files.get("eval_pairs"):
                    keys |= {"pairs": files["eval_pairs"], **self.dpo_eval_keys(d, reference)}
                if not {"prompts", "nll", "pairs"} & set(keys):
                    return {}
            self.job(f"{self.where(d)}: evaluating {name}", "llama_posttrain/jobs/evaluate.py",
                     args_of(EvalConfig(**keys)), d / f"eval_{name}.log", c.eval_nproc or c.nproc)  # fmt: skip
        result = json.loads(out.read_text())
        keys = ("task_accuracy", "task_accuracy_sampled", "rm_accuracy", "nll", "rm_score", "dpo_reward_accuracy")
        found = {key: result[key] for key in keys if key in result}
        for part in ("n", "std"):  # absent from a result an earlier version wrote
            kept = {k: v for k, v in (result.get(part) or {}).items() if k in found}
            if kept:
                found[part] = kept
        return found

    def dpo_eval_keys(self, d: Path, reference: Path) -> dict:
        """The DPO run's recorded config (variant 0's: its loss and format mask) and, unless the loss is
        reference-free, its reference: the evaluation's dpo_config and reference."""
        from llama_posttrain.losses.dpo import needs_reference
        from llama_posttrain.train.config import read_yaml

        config = d / "variant_0" / "config.yaml"
        loss = ((read_yaml(config) or {}).get("dpo") or {}).get("loss", "sigmoid")
        return {"dpo_config": str(config)} | ({"reference": str(reference)} if needs_reference(loss) else {})

    def score_with_last_rm(self, rm: Path) -> None:
        """One evaluation job after the last round: the last round's RM scores the held-out samples that every
        policy's evaluation kept (base, each round's SFT and DPO model), so that `rm_score_last_rm` compares
        them on one scale (`rm_score` is each round's own RM's). Added to those stages' results (the report's),
        not to their DONE markers; the job's result (round_R/rm/eval_policies.json) is reused while it is newer
        than its inputs. A policy whose evaluation kept no samples is left out and said."""
        prompts = self.files().get("eval_prompts")
        kept, missing = {}, []
        for r in self.results:
            name = {"pretrain": "base", "sft": "sft", "dpo": "dpo"}.get(r["stage"])
            f = self.dir / f"round_{r['round']}" / r["stage"] / f"eval_{name}.json"
            if name is None:
                continue
            if f.is_file() and "samples" in json.loads(f.read_text()):
                kept[f"round_{r['round']}/{r['stage']}"] = f
            else:
                missing.append(f"round_{r['round']}/{r['stage']}")
        where = f"[round {self.cfg.rounds}] rm"
        if missing:
            print(f"{where}: the last RM's scores: {len(missing)} policies kept no samples, left out: {missing}")
        if not prompts or not kept:
            return
        d = Path(rm).parent
        out = d / "eval_policies.json"
        inputs = [*kept.values(), Path(rm) / "config.json"]
        if not out.is_file() or out.stat().st_mtime_ns < max(p.stat().st_mtime_ns for p in inputs if p.exists()):
            job = EvalConfig(
                model=str(rm), out=str(out), **self.model_keys(), prompts=prompts,
                score_samples=[str(f) for f in kept.values()],
            )  # fmt: skip
            log, nproc = d / "eval_policies.log", self.cfg.eval_nproc or self.cfg.nproc
            self.job(f"{where}: scoring every policy's samples", "llama_posttrain/jobs/evaluate.py", args_of(job), log,
                     nproc)  # fmt: skip
        scores = json.loads(out.read_text())["rm_score_of"]
        for r in self.results:
            f = kept.get(f"round_{r['round']}/{r['stage']}")
            if f is not None and str(f) in scores:
                r["rm_score_last_rm"] = scores[str(f)]["rm_score"]
                r["n"] = {**r.get("n", {}), "rm_score_last_rm": scores[str(f)]["n"]}
                r["std"] = {**r.get("std", {}), "rm_score_last_rm": scores[str(f)]["std"]}
        shown = {k: round(scores[str(f)]["rm_score"], 4) for k, f in kept.items() if str(f) in scores}
        print(f"{where}: the last RM's mean score of each policy's held-out samples: {json.dumps(shown)}", flush=True)
