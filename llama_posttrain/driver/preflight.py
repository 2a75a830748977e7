"""What the pipeline checks before its first job (llama_posttrain/driver/pipeline.py `Pipeline.preflight`), so that a
bad record or a bad stage setting is found at start, not after the stages before the one that reads it:

- each training run's config (pretrain without a `base`, rm, sft, dpo), once per variant, as its job would get
  it: the arguments Recipe.train builds (the stage config file, the pipeline's stage overrides, the variant's, the
  keys the pipeline sets), read by the training script's own config code (llama_posttrain/train/config.py
  `load_config` with the script's config class: every key's type and range, each section's own checks);
- each record of the files task's files (llama_posttrain/data/tasks/files.py), parsed by the code of the jobs that
  read it (llama_posttrain/data/schema.py, the chat format's turn check of llama_posttrain/data/rows.py): the
  prompt pool and the eval prompts as sampling and evaluation read prompts, the seed preferences as the reward
  model's training data (its data.skip_invalid and data.keep_strengths), the human SFT files as SFT's, the eval
  pairs and dialogs as the evaluations read them (invalid records stop them); a file left with no usable record;
  a prompt pool smaller than the rounds draw.

Tokenizing is left to the jobs (over-long records are in their reports). `check` returns every problem, one line
each naming the file, line and field (or the stage, variant and key); at most MAX_SHOWN invalid records of a file
are listed, the rest counted.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from llama_posttrain.data.records import read_records
from llama_posttrain.data.rows import _check_turns
from llama_posttrain.data.schema import Drop, ValidationError, parse_preference, parse_sft
from llama_posttrain.data.tasks.files import prompt_record
from llama_posttrain.train.config import load_config

MAX_SHOWN = 5  # invalid records listed per file
TRAINING = {"pretrain": "sft", "rm": "rm", "sft": "sft", "dpo": "dpo"}  # stage -> its training script


def script_config(script: str):
    """The config class a training script parses its arguments into."""
    from llama_posttrain.train.dpo import DPOConfig
    from llama_posttrain.train.rm import RMConfig
    from llama_posttrain.train.sft import SFTConfig

    return {"rm": RMConfig, "sft": SFTConfig, "dpo": DPOConfig}[script]


def check(recipe) -> tuple[list[str], dict]:
    """-> (every problem found, what was checked: {"runs": training configs, "files": ..., "records": ...})."""
    problems, checked = [], Counter()
    configs = training_configs(recipe, problems, checked)
    if hasattr(recipe.task, "files"):
        file_problems(recipe, configs, problems, checked)
    return list(dict.fromkeys(problems)), dict(checked)  # a stage config's problem once, not once per variant


def training_configs(recipe, problems: list[str], checked: Counter) -> dict[str, list]:
    """stage -> the parsed config of each of its variants' training runs, as their jobs would parse them; a
    config that does not parse is a problem naming the stage, the variant and where its keys come from."""
    c = recipe.cfg
    nowhere = recipe.dir / ".preflight"  # the runs' folders: never made (no job runs)
    start = str(Path(c.base).resolve()) if c.base else str(nowhere / "round_0" / "pretrain" / "model")
    data = str(nowhere / "data.jsonl")
    runs = {
        "rm": {"model.checkpoint": start, "data.train": data, "data.eval": data},
        "sft": {"model.checkpoint": start, "data.train": [{"path": data, "weight": 1.0}], "data.eval": data},
        "dpo": {"model.checkpoint": start, "data.train": data, "data.eval": data},
    }  # the keys each stage of llama_posttrain/driver/recipe.py sets, with stand-in values of their types
    if c.base is None:
        runs = {
            "pretrain": {"model.preset": c.preset, "data.train": data, "data.eval": data, "sft.mask_prompt": False},
            **runs,
        }
    jobs = []

    def job(name, script, args, *rest, **kw):
        if not script.endswith("average.py"):
            jobs.append(args)

    recipe.job = job  # Recipe.train builds the arguments; the jobs are kept, not started
    recipe.copy_model = lambda d, model: None  # nor is the average of one model copied
    out = {}
    try:
        for stage, overrides in runs.items():
            jobs.clear()
            variants = c.variants.get(stage)
            try:
                recipe.train(TRAINING[stage], nowhere / stage, overrides, getattr(c, stage), variants)
            except (ValueError, OSError) as e:  # its stage config file unreadable
                problems.append(f"stage {stage}: {e}")
                continue
            except (AttributeError, TypeError) as e:  # a file of YAML that is not a mapping of sections
                problems.append(
                    f"stage {stage}: {recipe.stage_config_file[TRAINING[stage]]}: not a training config "
                    f"({type(e).__name__}: {e})"
                )
                continue
            out[stage] = []
            for v, argv in enumerate(jobs):
                checked["runs"] += 1
                assert argv[0] == "--config", argv
                source = f"the pipeline's `{stage}:` overrides" + (f", variants.{stage}[{v}]" if variants else "")
                try:
                    out[stage].append(load_config(script_config(TRAINING[stage]), argv[1], argv[2:]))
                except ValueError as e:
                    problems.append(f"stage {stage} (its config file {argv[1]}, {source}): {e}")
    finally:
        del recipe.job, recipe.copy_model
    return out


def file_problems(recipe, configs: dict[str, list], problems: list[str], checked: Counter) -> None:
    """Every record of the files task's files, as the jobs that read them parse it."""
    c, chat, task = recipe.cfg, recipe.chat, recipe.task
    files = task.files()

    def data(stage: str):  # a stage's data options: skipping only if every variant skips; variant 0's strengths
        runs = configs.get(stage) or []
        return all(r.data.skip_invalid for r in runs) and bool(runs), runs[0].data.keep_strengths if runs else None

    def prompt(obj, where):
        prompt_record(obj, where)

    def preference(keep):
        def parse(obj, where):
            record = parse_preference(obj, where)
            _check_turns(record, chat, where)
            if keep is not None and record.strength not in keep:
                return f"filtered: strength {record.strength} (data.keep_strengths)"

        return parse

    def eval_pair(obj, where):  # llama_posttrain/jobs/evaluation.py read_pairs: best and worst scored as one message
        record = parse_preference(obj, where)
        _check_turns(record, chat, where)
        if any(len(r) != 1 for r in (record.responses[0], record.responses[-1])):
            raise ValidationError(f"{where}: responses: scored as one assistant message each, got several")

    def dialog(obj, where):
        _check_turns(parse_sft(obj, where), chat, where)

    skip_rm, keep = data("rm")
    skip_sft, _ = data("sft")
    pool = check_file(task.prompts, "prompts", prompt, False, problems, checked)
    need = c.rounds * (c.rs_prompts + c.pref_prompts)
    if pool["usable"] < need and pool["usable"] == pool["records"]:
        problems.append(
            f"{task.prompts}: the prompt pool has {pool['usable']} prompts; {c.rounds} rounds x (rs_prompts "
            f"{c.rs_prompts} + pref_prompts {c.pref_prompts}) draw {need} (a prompt is never used twice): give more "
            "prompts, or fewer rounds or prompts per round"
        )
    for path in files["preferences"]:
        check_file(path, "preference records", preference(keep), skip_rm, problems, checked, "rm")
    for path in files["sft"]:
        check_file(path, "SFT records", dialog, skip_sft, problems, checked, "sft")
    for key, parse, what in (
        ("eval_pairs", eval_pair, "preference records"),
        ("eval_sft", dialog, "SFT records"),
        ("eval_prompts", prompt, "prompts"),
    ):
        if files.get(key):
            check_file(files[key], what, parse, False, problems, checked)


def check_file(
    path, what: str, parse, skip_invalid: bool, problems: list[str], checked: Counter, stage=None
) -> Counter:
    """Each record of a data path through `parse` (it raises ValidationError or Drop, or returns why the record is
    filtered out); -> the counts ("records", "usable", "invalid", the drops and filters). Invalid records are
    problems, unless the reading stage skips them (data.skip_invalid: counted and printed); a path with no usable
    record is one."""
    counts, shown = Counter(), []
    try:
        for where, obj in read_records(path):
            counts["records"] += 1
            try:
                if isinstance(obj, ValidationError):
                    raise obj
                reason = parse(obj, where)
            except ValidationError as e:
                counts["invalid"] += 1
                if len(shown) < MAX_SHOWN:
                    shown.append(str(e))
                continue
            except Drop as e:  # well-formed, nothing to train on (tied scores): the jobs count it too
                counts[f"dropped: {e}"] += 1
                continue
            counts[reason or "usable"] += 1
    except (OSError, ValueError, ImportError) as e:  # unreadable: damaged Parquet, a folder, pyarrow missing
        problems.append(f"{path}: {e}")
        return counts
    checked["files"] += 1
    checked["records"] += counts["records"]
    if counts["invalid"] and skip_invalid:
        print(
            f"preflight: {path}: {counts['invalid']} invalid {what} will be skipped ({stage} data.skip_invalid)",
            flush=True,
        )
    elif counts["invalid"]:
        problems += shown
        if counts["invalid"] > len(shown):
            problems.append(
                f"{path}: {counts['invalid'] - len(shown)} more invalid {what} (the first {len(shown)} above)"
            )
    if not counts["usable"] and (skip_invalid or not counts["invalid"]):
        rest = ", ".join(f"{n} {k}" for k, n in counts.items() if k != "records")
        problems.append(f"{path}: no usable {what} ({counts['records']} records{': ' + rest if rest else ''})")
    return counts
