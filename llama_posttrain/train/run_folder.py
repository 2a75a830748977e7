"""A run folder holds one run, and one process at a time: what `setup` checks before training.

    <run_dir>/run.lock          held by the run's rank 0 while it runs (llama_posttrain/train/run_lock.py)
             config.yaml        the record of the config the checkpoints were trained with, written once
             data.json          the record of the data: each file's content sha256, written once
             checkpoints/ metrics.jsonl wandb_id model/ model_hf/   what the run writes

`claim(cfg, ...)` takes the lock, then decides by `train.resume` whether the run starts fresh or
resumes, and returns the checkpoint to resume from. A resume is refused when the config differs in
anything but CHANGEABLE_ON_RESUME, when train.steps is below the checkpoint's step, or (later, once
the data is read: `check_data`) when a data file's content changed. `train.resume=restart` deletes
the previous run, and only what this project wrote there, in a folder it recorded (a config.yaml of
ours), never a file the new run reads (its start checkpoint, tokenizer, data); it lists what it deletes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from llama_posttrain.data.io import write_text
from llama_posttrain.data.prepare import on_rank0
from llama_posttrain.llama import get_preset
from llama_posttrain.llama.checkpoint import check_destination, read_config
from llama_posttrain.train import run_lock, train_state
from llama_posttrain.train.config import config_changes, read_yaml, save_config, to_dict
from llama_posttrain.train.lifecycle import RESULT

# What a resume may change: how long to train, when to eval/save/log, what to export.
CHANGEABLE_ON_RESUME = (
    "train.steps",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.resume",
    "train.run_dir",
    "train.max_bad_steps",
    "train.export_hf",
    "train.activation_checkpointing",
    "train.shard_degree",
    "train.cpu_offload",
    "logging.*",
    # where and how the same examples are tokenized
    "data.cache",
    "data.cache_dir",
    "data.num_workers",
)

RECORD, DATA_RECORD = "config.yaml", "data.json"
RUN_FILES = ("checkpoints", "model", "model_hf", "metrics.jsonl", RECORD, DATA_RECORD, "wandb_id", RESULT)  # it writes
# What an export writes into model/ and model_hf/ (llama_posttrain/llama/checkpoint.py save_checkpoint): restart deletes these
# and keeps anything else found there.
EXPORT_FILES = (
    "config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_TMP_STEP = re.compile(r"^step_\d{8}\.tmp$")


def cache_dir(cfg) -> str:
    """data.cache_dir, by default <train.run_dir>/.tokenized: a folder the run owns, never beside the data (the
    user's folder, or experiments/*/data read by every run). A pipeline gives its stages one cache folder."""
    return cfg.data.cache_dir or str(Path(cfg.train.run_dir) / ".tokenized")


def claim(cfg, rank: int, world_size: int) -> Path | None:
    """Lock the run folder (rank 0, until it exits) and check it against `train.resume` and the saved
    config; -> the checkpoint to resume from (None: a fresh start), the same on every rank. Rank 0 does
    the work and the other ranks get its answer or its error (llama_posttrain/data/prepare.py `on_rank0`)."""
    return on_rank0(lambda: _claim(cfg, world_size), rank, world_size, "claim the run folder")


def _claim(cfg, world_size: int) -> Path | None:
    run_dir = Path(cfg.train.run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.run_dir {run_dir} is a file, not a folder")
    run_lock.hold(run_dir)
    found = [n for n in RUN_FILES if (run_dir / n).exists()]
    mode = cfg.train.resume
    if mode == "never" and found:
        raise ValueError(
            f"train.run_dir {run_dir} holds another run ({', '.join(found)}) and train.resume=never: choose a new "
            "train.run_dir, or set train.resume=restart to delete that run and start over"
        )
    if mode == "restart" and found:
        delete_previous_run(run_dir, cfg)
    checkpoints = train_state.list_checkpoints(run_dir) if mode == "auto" else []
    if mode == "auto":  # before anything there is read: DCP's .metadata is a pickle (train_state.py, Trust)
        _check_record(run_dir, cfg, found, bool(checkpoints))
    resume = None
    for ckpt in reversed(checkpoints):
        train_state.check_world_size(ckpt, world_size)  # not damage: no fallback to an older one
        problem = train_state.checkpoint_problem(ckpt, world_size)
        if problem is None:
            resume = ckpt
            break
        print(f"WARNING: checkpoint {ckpt} is unusable: {problem}; falling back to the one before", flush=True)
    if resume is None and checkpoints:
        raise ValueError(f"no usable checkpoint in {run_dir / 'checkpoints'} (see the warnings above)")
    if resume is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / DATA_RECORD).unlink(missing_ok=True)  # a start killed before its first checkpoint
        save_config(cfg, run_dir / RECORD)
        return None
    step = train_state.checkpoint_step(resume)
    if cfg.train.steps < step:
        raise ValueError(
            f"train.steps={cfg.train.steps} is below the step of the checkpoint to resume ({resume}, step {step}): "
            f"this run is past it. To train {cfg.train.steps} steps, use a new train.run_dir or train.resume=restart; "
            f"to continue this run, give train.steps >= {step}"
        )
    return resume


def _check_record(run_dir: Path, cfg, found: list[str], resumable: bool) -> None:
    """train.resume=auto in a folder that holds a run: refuse it unless its config.yaml is a record of
    ours whose config differs from `cfg` only in CHANGEABLE_ON_RESUME. Without a checkpoint to resume
    (never saved, or deleted to free disk) the run would start over and replace the recorded run's
    model/, metrics.jsonl and config.yaml, so a changed train.steps is refused too: the same config
    starts over, said so; any other is another run, and needs its own folder or train.resume=restart."""
    record = run_dir / RECORD
    if not record.exists():
        ours = [n for n in found if n in ("checkpoints", "metrics.jsonl", DATA_RECORD, "wandb_id")]
        if "checkpoints" in ours and not resumable:
            ours.remove("checkpoints")  # an empty checkpoints/ (or only files not ours): nothing to resume
        if ours:
            raise ValueError(
                f"{run_dir} holds {', '.join(ours)} but no config.yaml: not a run folder this code wrote (or its "
                "record was deleted), so it can be neither resumed nor safely overwritten. Choose a new "
                "train.run_dir, or move those away."
            )
        return
    if not _is_our_record(record):
        raise ValueError(
            f"{record} is not a config this project recorded (no train.run_dir in a train section), so {run_dir} "
            "is not a run folder this code wrote; refusing to resume or overwrite it. Choose a new train.run_dir."
        )
    # without a checkpoint to resume, a changed train.steps is another run too
    keys = CHANGEABLE_ON_RESUME if resumable else tuple(k for k in CHANGEABLE_ON_RESUME if k != "train.steps")
    ok, refused = config_changes(read_yaml(record), to_dict(cfg), keys, defaults=to_dict(type(cfg)()))
    ok, refused = dict(sorted(ok.items())), dict(sorted(refused.items()))
    if refused:
        lines = "\n".join(f"  {k}: {a!r} (saved) -> {b!r} (now)" for k, (a, b) in refused.items())
        why = (
            "resuming would mix two runs"
            if resumable
            else (
                "it has no checkpoint to resume, so this start would replace that run's files (model/, metrics.jsonl, "
                "config.yaml) with another run's"
            )
        )
        raise ValueError(
            f"{run_dir} holds a run trained with a different config; {why}:\n{lines}\n"
            "Use the saved values, a new train.run_dir, or train.resume=restart to start over."
        )
    if ok and resumable:
        print("resuming with changed " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in ok.items()), flush=True)
    if not resumable:
        outputs = [n for n in found if n not in (RECORD, DATA_RECORD, "checkpoints")]
        replaced = f", replacing its {', '.join(outputs)}" if outputs else ""
        print(
            f"{run_dir}: config.yaml records this config but no checkpoint is left to resume: training it again "
            f"from step 0{replaced}",
            flush=True,
        )


def check_exports(cfg, chat, rank: int, world_size: int) -> None:
    """Refuse at start what the export would refuse after the last step: a foreign model/ or model_hf/
    (another config.json, weights we did not write, tokenizer files that differ from the run's)."""

    def check():
        m = cfg.model
        model_config = read_config(m.checkpoint)[0] if m.checkpoint else get_preset(m.preset)
        outs = (("model", "native"), ("model_hf", "hf"))
        for out, fmt in outs if cfg.train.export_hf else outs[:1]:
            try:
                check_destination(
                    Path(cfg.train.run_dir) / out,
                    chat.tokenizer,
                    chat.template,
                    fmt,
                    config=model_config,
                    source=cfg.model.checkpoint,
                )
            except ValueError as e:
                raise ValueError(f"train.run_dir: the run's export would fail: {e}") from None

    on_rank0(check, rank, world_size, "check the export folders")


# ------------------------------------------------------------------------------------- restart


def _is_our_record(path: Path) -> bool:
    """A config.yaml this project wrote: a mapping of the config's sections, train.run_dir among them."""
    try:
        saved = read_yaml(path)
    except ValueError:
        return False
    return isinstance(saved, dict) and isinstance(saved.get("train"), dict) and "run_dir" in saved["train"]


def _inputs(cfg) -> dict[str, Path]:
    """Every path the config names (config key -> resolved path): every string in it, at any depth (lists,
    `{path, weight}` items), that names an existing file or folder, but train.run_dir itself. Restart must
    not delete any of them. Walking the config, not listing keys, covers keys added later (dpo.reference_checkpoint,
    a new loss's file): a string that only happens to name a path is merely one more thing restart keeps."""
    run_dir = Path(cfg.train.run_dir).resolve()
    paths = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, str) and value:
            try:
                path = Path(value).resolve()
                if path.exists() and path != run_dir:
                    paths[key] = path
            except (OSError, ValueError):  # not a path: too long, a NUL byte
                pass

    walk(to_dict(cfg), "")
    return paths


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def previous_run_files(run_dir: Path) -> tuple[list[Path], list[Path]]:
    """-> (what restart deletes: the files and step folders this project wrote, what it keeps there)."""
    delete, keep = [], []
    for name in ("metrics.jsonl", DATA_RECORD, "wandb_id", RESULT):
        if (run_dir / name).is_file():
            delete.append(run_dir / name)
    ckpts = run_dir / "checkpoints"
    for p in sorted(ckpts.iterdir()) if ckpts.is_dir() else []:
        ours = p.is_dir() and (train_state.STEP_DIR.match(p.name) or _TMP_STEP.match(p.name))
        (delete if ours else keep).append(p)
    for out in ("model", "model_hf"):
        folder = run_dir / out
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            ours = p.is_file() and (p.name in EXPORT_FILES or _SHARD.match(p.name))
            (delete if ours else keep).append(p)
    if (run_dir / RECORD).is_file():  # last: a restart killed midway leaves a folder still recorded as ours
        delete.append(run_dir / RECORD)
    return delete, keep


def delete_previous_run(run_dir: Path, cfg) -> None:
    """train.resume=restart: delete what the previous run wrote, after checking that it is ours and that
    the new run reads none of it; print every path deleted and every path kept."""
    record = run_dir / RECORD
    if not _is_our_record(record):
        found = ", ".join(n for n in RUN_FILES if (run_dir / n).exists())
        raise ValueError(
            f"train.resume=restart: {run_dir} holds {found} but no config.yaml recording a run of this project, so "
            "nothing there is known to be ours; refusing to delete. Choose a new train.run_dir, or move those away."
        )
    delete, keep = previous_run_files(run_dir)
    for key, path in _inputs(cfg).items():
        hit = [p for p in delete if _within(path, p.resolve()) or _within(p.resolve(), path)]
        if hit:
            raise ValueError(
                f"train.resume=restart would delete {hit[0]}, which this run reads ({key}: {path}); nothing was "
                "deleted. Copy it out of the run folder and point the config there, or choose a new train.run_dir."
            )
    print(f"train.resume=restart: deleting the previous run in {run_dir}:", flush=True)
    for p in delete:
        print(f"  deleted {p.relative_to(run_dir)}{'/' if p.is_dir() else ''}", flush=True)
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in keep:
        print(f"  kept {p.relative_to(run_dir)} (not written by this project)", flush=True)
    for out in ("checkpoints", "model", "model_hf"):
        folder = run_dir / out
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


# ------------------------------------------------------------------------------------- data record


def check_data(cfg, fingerprints: dict[str, dict[str, str]], fresh: bool, rank: int, world_size: int) -> None:
    """Record the data's content (`fingerprints`: split -> {file: sha256}, from the loaders) at a fresh
    start; on a resume, refuse data that changed since, naming the file. Rank 0 decides; every rank
    gets its answer."""
    on_rank0(
        lambda: _check_data(Path(cfg.train.run_dir), fingerprints, fresh), rank, world_size, "check the data record"
    )


def _check_data(run_dir: Path, now: dict[str, dict[str, str]], fresh: bool) -> None:
    path = run_dir / DATA_RECORD
    if fresh or not path.is_file():
        if not fresh:
            print(
                f"WARNING: {run_dir} has no {DATA_RECORD} (a run of an older version): its data cannot be "
                "checked against this resume's; recording this data now",
                flush=True,
            )
        write_text(path, json.dumps(now, indent=1, sort_keys=True))
        return
    saved = json.loads(path.read_text())
    changes = []
    for split in sorted(set(saved) | set(now)):
        old, new = saved.get(split) or {}, now.get(split) or {}
        for file in sorted(set(old) | set(new)):
            if old.get(file) != new.get(file):
                was, now_ = old.get(file, "absent")[:16], new.get(file, "absent")[:16]
                changes.append(f"  {split}: {file}: sha256 {was}... (saved) -> {now_}... (now)")
    if changes:
        raise ValueError(
            f"{run_dir} was trained on other data than this resume reads; resuming would mix two datasets:\n"
            + "\n".join(changes)
            + f"\n(recorded in {path}.) Restore the data, use a new train.run_dir, or train.resume=restart."
        )
