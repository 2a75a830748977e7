"""The jobs a stage of the recipe starts, and what it reads back from them: a training run per variant and the
variants' average (or the copy of one model), a sampling job, an evaluation job, the last RM's scoring of every
policy's samples. Each builds its job's arguments from the pipeline's config (the stage config file's paths,
the pipeline's stage overrides, the variant's, the keys the pipeline sets: STAGE_SETS) and starts it through the
launcher. StageJobs is a base of the Recipe (recipe.py), whose attributes it uses (cfg, dir, chat, launcher,
stage_config_file, cleaning, verify, averages_copied) with its `files()`; the Recipe says which stage runs when."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from pathlib import Path

from llama_posttrain.data.drops import drop_report, drops_for
from llama_posttrain.data.io import write_jsonl
from llama_posttrain.driver.launch import ATTEMPT, Job
from llama_posttrain.driver.processes import log_end, rank_env
from llama_posttrain.driver.stages import PATH_KEYS, STAGE_SETS, StageError, absolute, absolute_paths
from llama_posttrain.jobs.configs import AverageConfig, EvalConfig, SampleConfig, args_of
from llama_posttrain.llama.chat import TEMPLATES
from llama_posttrain.train.config import read_yaml
from llama_posttrain.train.logger import read_metrics


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


class StageJobs:
    """The jobs of the Recipe's stages (recipe.py): their arguments, their start, their results."""

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
