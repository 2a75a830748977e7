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

import json
import time
from pathlib import Path

from llama_posttrain.data.annotators import file_annotator, name_ids, preference_pair
from llama_posttrain.data.drops import drop_reason, too_lossy
from llama_posttrain.data.io import write_json, write_jsonl, write_text
from llama_posttrain.data.schema import ValidationError
from llama_posttrain.driver.launch import JobFailed, Launcher, PipelineInterrupted
from llama_posttrain.driver.pipeline_config import Cleaning
from llama_posttrain.driver.stage_jobs import StageJobs, last_eval
from llama_posttrain.driver.stages import REDO_KEYS, StageError, WaitingForLabels, absolute

EVAL_SIZE = 200  # a synthetic task's held-out preference pairs, SFT records and pre-training dialogs
RESULT_PATHS = ("model", "files")  # the results (DONE markers) that hold paths: "files" {what: path or [paths]}
MARKER_NEEDS = {"data": ("files",), **dict.fromkeys(("pretrain", "rm", "sft", "dpo"), ("model",))}  # read later


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


class Recipe(StageJobs):
    """The rounds of one pipeline config in one run folder. `chat`: the pipeline's chat format (every stage
    trains, samples and evaluates with its tokenizer and template). The jobs its stages start are StageJobs'
    (stage_jobs.py)."""

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
