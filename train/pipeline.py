"""Iterative rounds of Llama 3 post-training on a task with a verifier, end to end.

    python train/pipeline.py --config experiments/quickstart/pipeline.yaml [key=value ...]

runs/<name>/round_0/data       task data: seed preference pairs ("human" labels), eval sets, pre-training corpus
            round_0/pretrain   the base: a causal LM pre-trained on a noisy corpus, so it is imperfect
            round_k/rm         reward model from the base on ALL preference data so far
            round_k/rs         rejection sampling: K samples per fresh prompt from the latest policy, RM picks the best
            round_k/sft        SFT from the base on all rejection-sampled data so far
            round_k/pref       new preference pairs sampled from the SFT model, labeled by the verifier
            round_k/dpo        DPO from the SFT model on this round's (the latest) pairs
            summary.json, accuracy.png, rewards.png
Training stages run `torchrun train/{rm,sft,dpo}.py` once per variant (`variants`: override sets,
e.g. seeds or data orders) and average the variants' models (train/average.py). Each stage writes
a DONE marker with its results last: rerunning skips finished stages, and an interrupted training
run resumes from its own checkpoints.

A run folder holds the results of one config: the first start records it (pipeline.yaml, and the
stage config files' contents in stage_configs.yaml) and a later start with a different config is
refused, listing the differing keys, except for keys that change no stage's result (HARMLESS).
The record is never rewritten. To start over, choose a new `name` or delete the folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from data.tasks import arithmetic
from llama import PRESETS, load_model
from llama.chat import ChatFormat
from llama.generate import generate
from llama.tokenizer import load_tokenizer
from train.average import average_checkpoints
from train.sample import read_prompts, rejection_sample, score, verifier_annotator, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
STAGE_KINDS = ("rm", "sft", "dpo")  # the training scripts; "pretrain" runs sft.py


@dataclass
class PipelineConfig:
    name: str = "quickstart"
    root: str = "runs"
    rounds: int = 2
    nproc: int = 2  # torchrun ranks per training stage
    seed: int = 0
    preset: str = "tiny"
    max_digits: int = 2
    pretrain_examples: int = 20000
    pretrain_noise: float = 0.35  # fraction of wrong answers in the pre-training corpus
    seed_pairs: int = 1000  # initial "human" preference pairs (right > wrong)
    rs_prompts: int = 400  # fresh prompts per round for rejection sampling
    pref_prompts: int = 400  # fresh prompts per round for new preference pairs
    eval_prompts: int = 200
    k: int = 8  # samples per prompt
    temperature: float = 1.0
    max_new_tokens: int = 8
    configs: dict[str, str] = field(
        default_factory=lambda: {k: f"experiments/quickstart/{k}.yaml" for k in STAGE_KINDS}
    )  # the stage config files, relative to the repository
    pretrain: dict[str, typing.Any] = field(default_factory=dict)  # "section.key": value overrides of each stage's run
    rm: dict[str, typing.Any] = field(default_factory=dict)
    sft: dict[str, typing.Any] = field(default_factory=dict)
    dpo: dict[str, typing.Any] = field(default_factory=dict)
    # stage -> [overrides, ...]: trained separately, averaged
    variants: dict[str, list[dict[str, typing.Any]]] = field(default_factory=dict)
    plots: bool = True


# Lower bounds of numeric keys: checked with the types before any stage runs.
AT_LEAST = {
    "rounds": 0, "nproc": 1, "max_digits": 1, "pretrain_examples": 1, "pretrain_noise": 0.0, "seed_pairs": 1,
    "rs_prompts": 1, "pref_prompts": 1, "eval_prompts": 1, "k": 2, "temperature": 0.0, "max_new_tokens": 1,
}  # fmt: skip
# Keys whose change leaves every stage's result as it was: a run folder may be continued with new values.
HARMLESS = {"name", "root", "rounds", "plots"}


class PipelineError(RuntimeError):
    """A problem the pipeline reports as one message (no traceback): bad config, refused folder, failed stage."""


def _check_type(value, tp, where: str):
    """`value` against an annotation (str, int, float, bool, Any, dict[K, V], list[V]) -> value; ints pass as floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is typing.Any:
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise PipelineError(f"{where}: expected a mapping, got {value!r}")
        return {_check_type(k, args[0], where): _check_type(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise PipelineError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp in (int, float) and isinstance(value, bool)):
        raise PipelineError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def load_pipeline_config(path: str | None, overrides=()) -> PipelineConfig:
    """YAML file + key=value overrides -> PipelineConfig; every key's type and range checked, errors
    naming the file (or the override) and the key."""
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
    hints = typing.get_type_hints(PipelineConfig)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        where = ", ".join(sorted({source[k] for k in unknown}))
        raise PipelineError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(hints))})")
    for key, value in raw.items():
        where = f"{source[key]}: {key}"
        raw[key] = value = _check_type(value, hints[key], where)
        if key in AT_LEAST and value < AT_LEAST[key]:
            raise PipelineError(f"{where}: must be >= {AT_LEAST[key]}, got {value!r}")
        if key == "pretrain_noise" and value > 1:
            raise PipelineError(f"{where}: a fraction, must be <= 1, got {value!r}")
        if key == "preset" and value not in PRESETS:
            raise PipelineError(f"{where}: unknown model preset {value!r} (known: {', '.join(PRESETS)})")
        if key == "name" and (not value or "/" in value):
            raise PipelineError(f"{where}: must be a non-empty folder name, got {value!r}")
        if key == "configs":
            for kind in set(STAGE_KINDS) - set(value):
                raise PipelineError(f"{where}: no config file for {kind!r} (give one for each of {STAGE_KINDS})")
            for kind, file in value.items():
                if kind not in STAGE_KINDS:
                    raise PipelineError(f"{where}.{kind}: not a training stage (one of {', '.join(STAGE_KINDS)})")
                if not (ROOT / file).is_file():
                    raise PipelineError(f"{where}.{kind}: {ROOT / file} is not a file")
        if key == "variants" and set(value) - {"pretrain", *STAGE_KINDS}:
            raise PipelineError(f"{where}: stages are pretrain, {', '.join(STAGE_KINDS)}; got {sorted(value)}")
    return PipelineConfig(**raw)


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PipelineError(f"{path}: cannot read it as YAML: {e}") from None


def _write_yaml(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def _differences(saved, now, key: str = "") -> dict[str, tuple]:
    """Dotted key -> (saved value, new value) for every leaf that differs; a missing key reads as '<absent>'."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = {}
        for k in [*saved, *(k for k in now if k not in saved)]:
            out |= _differences(saved.get(k, "<absent>"), now.get(k, "<absent>"), f"{key}.{k}" if key else str(k))
        return out
    return {} if saved == now else {key: (saved, now)}


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


START_OVER = "a run folder holds the results of one config: to start over, choose a new `name` or delete the folder"


def _overrides(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.dir = Path(cfg.root) / cfg.name
        self.chat = ChatFormat(load_tokenizer())
        self.results: list[dict] = []

    # ------------------------------------------------------------------ mechanics

    def stage_configs(self) -> dict:
        return {kind: _read_yaml(ROOT / file) for kind, file in sorted(self.cfg.configs.items())}

    def check_run_folder(self) -> None:
        """Record the config at the first start; refuse a later start whose config differs (HARMLESS
        keys aside), so the results of two configs never mix. The record is never rewritten."""
        record, stages = self.dir / "pipeline.yaml", self.dir / "stage_configs.yaml"
        now = {**dataclasses.asdict(self.cfg), "stage_configs": self.stage_configs()}
        if not record.is_file():
            own = {stages.name, stages.name + ".tmp", record.name + ".tmp"}  # a first start killed mid-record
            results = sorted(p.name for p in self.dir.iterdir() if p.name not in own) if self.dir.is_dir() else []
            if results:
                raise PipelineError(
                    f"{self.dir} holds results ({', '.join(results[:5])}) but no pipeline.yaml recording the config "
                    f"that made them; {START_OVER}"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_yaml(stages, now["stage_configs"])
            _write_yaml(record, {k: v for k, v in now.items() if k != "stage_configs"})  # last: the record is whole
            return
        saved = {**(_read_yaml(record) or {}), "stage_configs": _read_yaml(stages) if stages.is_file() else {}}
        changed = _differences(saved, now)
        refused = [k for k in changed if k.split(".")[0] not in HARMLESS]
        if refused:
            lines = "".join(f"\n  {k}: {changed[k][0]!r} there, {changed[k][1]!r} now" for k in refused)
            raise PipelineError(
                f"{self.dir} was made with another config (recorded in {record.name} and {stages.name}); "
                f"differing:{lines}\n{START_OVER}"
            )
        if changed:
            print(f"{record}: {', '.join(changed)} changed (no stage's result depends on them); the record is kept")

    def stage(self, rnd: int, name: str, fn) -> dict:
        """Run fn(stage_dir) unless its DONE marker exists; the marker holds the stage's results."""
        d = self.dir / f"round_{rnd}" / name
        marker = d / "DONE"
        if marker.exists():
            result = json.loads(marker.read_text())
            print(f"[round {rnd}] {name}: done before, skipped", flush=True)
        else:
            d.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            try:
                result = {"round": rnd, "stage": name, **fn(d), "seconds": round(time.time() - t0, 1)}
            except PipelineError as e:
                raise PipelineError(f"[round {rnd}] {name}: {e}") from None
            tmp = marker.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(marker)
            print(
                f"[round {rnd}] {name}: {json.dumps({k: v for k, v in result.items() if k not in ('round', 'stage')})}"
            )
        self.results.append(result)
        return result

    def train(self, kind: str, d: Path, overrides: dict, stage_overrides: dict, variants: list[dict] | None) -> Path:
        """torchrun train/<kind>.py per variant (resuming if interrupted), then average the models."""
        models = []
        for v, extra in enumerate(variants or [{}]):
            run_dir = d / f"variant_{v}"
            if not (run_dir / "model" / "config.json").exists():
                args = {
                    **stage_overrides,
                    **overrides,
                    **extra,
                    "train.run_dir": str(run_dir),
                    "logging.progress": False,
                }
                if "model.checkpoint" in args:  # the stage's own start, not the config file's preset
                    args["model.preset"] = None
                cmd = [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    f"--nproc_per_node={self.cfg.nproc}",
                ]
                cmd += [
                    str(ROOT / "train" / f"{kind}.py"),
                    "--config",
                    str(ROOT / self.cfg.configs[kind]),
                    *_overrides(args),
                ]
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // self.cfg.nproc))}
                log_path = run_dir.parent / f"variant_{v}.log"
                with open(log_path, "a") as log:
                    log.write(f"{ATTEMPT}{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(cmd)}\n")
                    log.flush()
                    rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
                if rc != 0:
                    raise PipelineError(
                        f"train/{kind}.py failed (exit code {rc}) for {run_dir}; the end of its log {log_path}\n"
                        f"{_tail(log_path)}\nRerunning the pipeline resumes from the last finished stage."
                    )
            models.append(run_dir / "model")
        return average_checkpoints(models, d / "model")

    @staticmethod
    def last_eval(run_dir: Path, key: str) -> float | None:
        values = [
            m[f"eval/{key}"]
            for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if f"eval/{key}" in m
        ]
        return values[-1] if values else None

    @torch.no_grad()
    def task_accuracy(self, model_path: Path) -> dict:
        """Fraction of held-out prompts answered right: greedy, and over 4 samples at temperature 1."""
        model = load_model(model_path).eval()
        records = read_prompts(self.dir / "round_0" / "data" / "eval_prompts.jsonl")
        ids = [self.chat.encode_dialog(r["messages"], add_generation_prompt=True).tokens for r in records]
        tok, out = self.chat.tokenizer, {}
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for key, n, temp in (("task_accuracy", 1, 0.0), ("task_accuracy_sampled", 4, 1.0)):
            samples = generate(
                model, ids, n, self.cfg.max_new_tokens, tok.stop_ids, temp, pad_id=tok.pad_id, generator=gen
            )
            right = [
                arithmetic.verify(r["prompt"], tok.decode([t for t in s if t not in tok.stop_ids]))
                for r, ss in zip(records, samples)
                for s in ss
            ]
            out[key] = sum(right) / len(right)
        return out

    @torch.no_grad()
    def rm_accuracy(self, rm_path: Path) -> float:
        rm = load_model(rm_path).eval()
        pairs = [json.loads(x) for x in (self.dir / "round_0" / "data" / "eval_pairs.jsonl").read_text().splitlines()]
        prompts = [[{"role": "user", "content": p["prompt"]}] for p in pairs]
        scores = score(rm, self.chat, prompts, [[p["chosen"], p["rejected"]] for p in pairs])
        return sum(s[0] > s[1] for s in scores) / len(scores)

    # ------------------------------------------------------------------ the recipe

    def run(self) -> list[dict]:
        self.check_run_folder()
        c, data = self.cfg, self.dir / "round_0" / "data"
        torch.manual_seed(c.seed)

        def make_data(d):
            rng_seed = c.seed * 7919
            write_jsonl(
                d / "pretrain.jsonl",
                arithmetic.noisy_corpus(c.pretrain_examples, rng_seed, c.pretrain_noise, c.max_digits),
            )
            write_jsonl(
                d / "pretrain_eval.jsonl", arithmetic.noisy_corpus(200, rng_seed + 1, c.pretrain_noise, c.max_digits)
            )
            import random

            rng = random.Random(rng_seed + 2)
            write_jsonl(
                d / "seed_pairs.jsonl", [arithmetic.preference_record(rng, c.max_digits) for _ in range(c.seed_pairs)]
            )
            write_jsonl(d / "eval_pairs.jsonl", [arithmetic.preference_record(rng, c.max_digits) for _ in range(200)])
            write_jsonl(
                d / "eval_prompts.jsonl", arithmetic.prompts(c.eval_prompts, rng_seed + 3, c.max_digits, "eval")
            )
            write_jsonl(
                d / "eval_sft.jsonl",
                [arithmetic.sft_record(*arithmetic.problem(rng, c.max_digits)) for _ in range(200)],
            )
            return {"seed_pairs": c.seed_pairs}

        self.stage(0, "data", make_data)

        def pretrain(d):
            o = {
                "model.preset": c.preset,
                "data.train": str(data / "pretrain.jsonl"),
                "data.eval": str(data / "pretrain_eval.jsonl"),
            }
            model = self.train("sft", d, {**o, "sft.mask_prompt": False}, c.pretrain, c.variants.get("pretrain"))
            return {"model": str(model), **self.task_accuracy(model)}

        base = Path(self.stage(0, "pretrain", pretrain)["model"])
        policy = base
        for k in range(1, c.rounds + 1):
            rd = self.dir / f"round_{k}"

            def rm_stage(d, k=k):
                files = [data / "seed_pairs.jsonl"] + [
                    self.dir / f"round_{j}" / "pref" / "pairs.jsonl" for j in range(1, k)
                ]
                write_jsonl(d / "train.jsonl", [json.loads(x) for f in files for x in f.read_text().splitlines()])
                o = {
                    "model.checkpoint": str(base),
                    "data.train": str(d / "train.jsonl"),
                    "data.eval": str(data / "eval_pairs.jsonl"),
                }
                model = self.train("rm", d, o, c.rm, c.variants.get("rm"))
                single = self.last_eval(d / "variant_0", "accuracy")
                return {"model": str(model), "rm_accuracy": self.rm_accuracy(model), "rm_accuracy_variant_0": single}

            rm = Path(self.stage(k, "rm", rm_stage)["model"])

            def sample_stage(d, source, kind, k=k, rm=rm):
                records = read_prompts_from(
                    arithmetic.prompts(
                        c.rs_prompts if kind == "rs" else c.pref_prompts,
                        c.seed * 1000 + 2 * k + (kind == "pref"),
                        c.max_digits,
                        f"r{k}{kind}",
                    ),
                    d,
                )
                gen = torch.Generator().manual_seed(c.seed * 1000 + k)
                model, reward = load_model(source).eval(), load_model(rm).eval()
                ann = verifier_annotator(arithmetic.verify) if kind == "pref" else None
                sft, pairs, sets = rejection_sample(
                    records, model, reward, self.chat, c.k, c.max_new_tokens, gen, c.temperature, annotate=ann
                )
                correct = [[arithmetic.verify(s["prompt"][-1]["content"], t) for t in s["responses"]] for s in sets]
                picked = [arithmetic.verify(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in sft]
                write_jsonl(
                    d / ("sft.jsonl" if kind == "rs" else "pairs.jsonl"),
                    sft if kind == "rs" else [{**p, "strength": "significantly_better"} for p in pairs],
                )
                write_jsonl(d / "sets.jsonl", sets)
                return {
                    "sample_accuracy": sum(map(sum, correct)) / max(1, sum(map(len, correct))),
                    "best_of_k_oracle": sum(any(x) for x in correct) / max(1, len(correct)),
                    "rm_pick_accuracy": sum(picked) / max(1, len(picked)),
                    "mean_best_score": sum(r["score"] for r in sft) / max(1, len(sft)),
                    "records": len(sft) if kind == "rs" else len(pairs),
                }

            self.stage(k, "rs", lambda d, p=policy: sample_stage(d, p, "rs"))

            def sft_stage(d, k=k):
                files = [self.dir / f"round_{j}" / "rs" / "sft.jsonl" for j in range(1, k + 1)]
                write_jsonl(d / "train.jsonl", [json.loads(x) for f in files for x in f.read_text().splitlines()])
                o = {
                    "model.checkpoint": str(base),
                    "data.train": str(d / "train.jsonl"),
                    "data.eval": str(data / "eval_sft.jsonl"),
                }
                model = self.train("sft", d, o, c.sft, c.variants.get("sft"))
                return {
                    "model": str(model),
                    "sft_loss": self.last_eval(d / "variant_0", "loss"),
                    **self.task_accuracy(model),
                }

            sft_model = Path(self.stage(k, "sft", sft_stage)["model"])
            self.stage(k, "pref", lambda d, s=sft_model: sample_stage(d, s, "pref"))

            def dpo_stage(d, k=k, sft_model=sft_model, rd=rd):
                o = {
                    "model.checkpoint": str(sft_model),
                    "data.train": str(rd / "pref" / "pairs.jsonl"),
                    "data.eval": str(data / "eval_pairs.jsonl"),
                }
                model = self.train("dpo", d, o, c.dpo, c.variants.get("dpo"))
                out = {
                    "model": str(model),
                    "dpo_reward_accuracy": self.last_eval(d / "variant_0", "rewards/accuracies"),
                }
                out.update(self.task_accuracy(model))
                if len(c.variants.get("dpo") or []) > 1:  # the averaged model against the single ones
                    out["variants"] = [
                        self.task_accuracy(d / f"variant_{v}" / "model") for v in range(len(c.variants["dpo"]))
                    ]
                return out

            policy = Path(self.stage(k, "dpo", dpo_stage)["model"])
        self.report()
        return self.results

    def report(self) -> None:
        (self.dir / "summary.json").write_text(
            json.dumps({"config": dataclasses.asdict(self.cfg), "stages": self.results}, indent=1)
        )
        cols = [
            "rm_accuracy",
            "rm_pick_accuracy",
            "sft_loss",
            "dpo_reward_accuracy",
            "task_accuracy",
            "task_accuracy_sampled",
        ]
        lines = ["| round | stage | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
        for r in self.results:
            if r["stage"] in ("data",):
                continue
            cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "" for c in cols]
            lines.append(f"| {r['round']} | {r['stage']} | " + " | ".join(cells) + " |")
        table = "\n".join(lines)
        (self.dir / "summary.md").write_text(table + "\n")
        print(table)
        if self.cfg.plots:
            from train.plots import line_chart

            acc = [r for r in self.results if "task_accuracy" in r]
            short = len(acc) > 7  # many rounds: "2S" = round 2 SFT, "2D" = round 2 DPO
            labels = [
                "BASE"
                if r["stage"] == "pretrain"
                else f"{r['round']}{r['stage'][0]}"
                if short
                else f"R{r['round']} {r['stage']}"
                for r in acc
            ]
            series = {
                "greedy": [r["task_accuracy"] for r in acc],
                "sampled t=1": [r["task_accuracy_sampled"] for r in acc],
            }
            line_chart(
                self.dir / "accuracy.png",
                "TASK ACCURACY BY STAGE" + (" (S=SFT D=DPO)" if short else ""),
                labels,
                series,
            )
            rounds = list(range(1, self.cfg.rounds + 1))

            def per_round(stage, key):
                return [
                    next((r.get(key) for r in self.results if r["round"] == k and r["stage"] == stage), None)
                    for k in rounds
                ]

            series = {
                "rm acc": per_round("rm", "rm_accuracy"),
                "dpo reward acc": per_round("dpo", "dpo_reward_accuracy"),
                "rm pick acc": per_round("rs", "rm_pick_accuracy"),
            }
            line_chart(self.dir / "rewards.png", "REWARDS BY ROUND", [f"R{k}" for k in rounds], series)


def read_prompts_from(records: list[dict], d: Path) -> list[dict]:
    write_jsonl(d / "prompts.jsonl", records)
    return read_prompts(d / "prompts.jsonl")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*", help="key=value")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    try:
        Pipeline(load_pipeline_config(args.config, args.overrides)).run()
    except PipelineError as e:
        raise SystemExit(f"pipeline: {e}") from None


if __name__ == "__main__":
    main()
