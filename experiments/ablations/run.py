"""Ablations the Llama 3 paper reports only in words, on the data of a finished pipeline run.

    python llama_posttrain/driver/pipeline.py --config experiments/quickstart/pipeline.yaml     # first, once
    python experiments/ablations/run.py --run runs/quickstart --round 1

1. DPO with and without formatting-token masking, with and without the NLL term (alpha 0.2 / 0):
   the same SFT model, preference pairs, steps and seeds; task accuracy (greedy, sampled) and
   held-out reward accuracy.
2. The one-row reward model ([prompt][r_a][r_b]) against separate rows ([prompt][r_a] [prompt][r_b]):
   held-out accuracy, tokens per step and step time.
3. Averaged against single models: the pipeline's DPO variants (in its summary.json).
Results go to experiments/ablations/results.md (appended, with the command and date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

from llama_posttrain.driver.pipeline import Pipeline
from llama_posttrain.driver.pipeline_config import load_pipeline_config
from llama_posttrain.driver.stage_jobs import last_eval, override_args
from llama_posttrain.train.distributed import torchrun_command
from llama_posttrain.train.logger import read_metrics

ROOT = Path(__file__).resolve().parent.parent.parent


def torchrun(kind: str, config: str, overrides: dict, log: Path) -> None:
    """train/<kind>.py on 2 ranks with the pipeline's stage config and these overrides; output to `log`."""
    cmd = torchrun_command(
        str(ROOT / "llama_posttrain" / "train" / f"{kind}.py"),
        2,
        ["--config", str(ROOT / config), *override_args(overrides)],
    )
    with open(log, "w") as f:
        subprocess.run(
            cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=f, stderr=subprocess.STDOUT
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/quickstart")
    ap.add_argument("--round", type=int, default=1)
    ap.add_argument("--config", default="experiments/quickstart/pipeline.yaml")
    ap.add_argument("--out", default="experiments/ablations/results.md")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    run, rd = Path(args.run), Path(args.run) / f"round_{args.round}"
    cfg = load_pipeline_config(args.config)
    pipe = Pipeline(cfg)
    pipe.dir = run
    work = run / "ablations"
    work.mkdir(exist_ok=True)
    lines = [
        f"## ablations, {datetime.date.today()}",
        "",
        f"command: python experiments/ablations/run.py {' '.join(sys.argv[1:])}".rstrip(),
    ]
    lines += [f"data: {rd} (pipeline config {args.config}); seeds {args.seeds}; means over seeds", ""]

    # 1. DPO: formatting mask x NLL
    lines += ["### DPO: formatting-token masking and the NLL term", ""]
    lines += [
        "| mask formatting | alpha (NLL) | task acc greedy | task acc sampled | eval reward acc |",
        "|---|---:|---:|---:|---:|",
    ]
    dpo = dict(cfg.dpo)
    for mask in (True, False):
        for alpha in (0.2, 0.0):
            accs, samp, rew = [], [], []
            for seed in args.seeds:
                d = work / f"dpo_mask{int(mask)}_alpha{alpha}_seed{seed}"
                if not (d / "model" / "config.json").exists():
                    o = {**dpo, "model.checkpoint": str(rd / "sft" / "model"), "model.preset": None}
                    o.update(
                        {
                            "data.train": str(rd / "pref" / "pairs.jsonl"),
                            "data.eval": str(run / "round_0/data/eval_pairs.jsonl"),
                        }
                    )
                    o.update({"dpo.mask_format": mask, "dpo.alpha": alpha, "train.seed": seed, "data.seed": seed})
                    o.update({"train.run_dir": str(d), "logging.progress": False})
                    torchrun("dpo", cfg.configs["dpo"], o, work / f"{d.name}.log")
                acc = pipe.task_accuracy(d / "model")
                accs.append(acc["task_accuracy"])
                samp.append(acc["task_accuracy_sampled"])
                rew.append(last_eval(d, "rewards/accuracies"))
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            lines.append(f"| {mask} | {alpha} | {mean(accs):.3f} | {mean(samp):.3f} | {mean(rew):.3f} |")
            print(lines[-1], flush=True)

    # 2. RM: one row against separate rows
    lines += ["", "### Reward model: one row per prompt against separate rows", ""]
    lines += ["| layout | eval pairwise acc (per seed) | tokens / step | step time (s) |", "|---|---:|---:|---:|"]
    rm = dict(cfg.rm)
    for one_row in (True, False):
        accs, toks, times = [], [], []
        for seed in args.seeds:
            d = work / f"rm_onerow{int(one_row)}_seed{seed}"
            if not (d / "model" / "config.json").exists():
                o = {**rm, "model.checkpoint": str(run / "round_0/pretrain/model"), "model.preset": None}
                o.update(
                    {
                        "data.train": str(rd / "rm" / "train.jsonl"),
                        "data.eval": str(run / "round_0/data/eval_pairs.jsonl"),
                    }
                )
                o.update(
                    {
                        "rm.one_row": one_row,
                        "train.seed": seed,
                        "data.seed": seed,
                        "train.run_dir": str(d),
                        "logging.progress": False,
                    }
                )
                torchrun("rm", cfg.configs["rm"], o, work / f"{d.name}.log")
            steps = [m for m in read_metrics(d / "metrics.jsonl") if "tokens" in m]
            accs.append(last_eval(d, "accuracy"))
            toks.append(sum(m["tokens"] for m in steps) / len(steps))
            times.append(sum(m["tokens"] / m["tokens_per_s"] for m in steps[1:]) / max(1, len(steps) - 1))
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        layout = "one row [prompt][r_a][r_b]" if one_row else "separate rows [prompt][r_a] [prompt][r_b]"
        per_seed = ", ".join(f"{a:.3f}" for a in accs)
        lines.append(f"| {layout} | {mean(accs):.3f} ({per_seed}) | {mean(toks):.0f} | {mean(times):.3f} |")
        print(lines[-1], flush=True)

    # 3. averaged vs single, from the pipeline's own DPO variants
    summary = json.loads((run / "summary.json").read_text())
    lines += ["", "### Averaged against single models (the pipeline's DPO variants)", ""]
    lines += ["| round | model | task acc greedy | task acc sampled |", "|---|---|---:|---:|"]
    for s in summary["stages"]:
        if s["stage"] == "dpo" and "variants" in s:
            lines.append(
                f"| {s['round']} | average of {len(s['variants'])} | {s['task_accuracy']:.3f} | {s['task_accuracy_sampled']:.3f} |"
            )
            for v, acc in enumerate(s["variants"]):
                lines.append(
                    f"| {s['round']} | variant {v} | {acc['task_accuracy']:.3f} | {acc['task_accuracy_sampled']:.3f} |"
                )
    text = "\n".join(lines) + "\n\n"
    print(text)
    with open(ROOT / args.out, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
