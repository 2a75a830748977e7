"""Convert checkpoints between formats.

python -m llama_posttrain.llama.convert --from hf|meta|native --to native|hf SRC DST [--dtype bfloat16]
python -m llama_posttrain.llama.convert --from dcp --to native|hf RUN_DIR/checkpoints/step_N DST
python -m llama_posttrain.llama.convert --from gguf [--to native|hf] FILE.gguf DST

--to defaults to native.

DST may be new, empty, or a checkpoint directory (SRC itself included): its config and weight files
are replaced, everything else in it (README, ...) is kept. Any other non-empty DST is refused.

The tokenizer (--tokenizer, else SRC's) and the chat template (--chat-template, else the one SRC's
tokenizer_config.json names, else llama3) are written beside the weights (llama_posttrain/llama/formats/hf.py tokenizer_files):
with --to hf a folder that transformers' AutoTokenizer and AutoModel* load on their own, whose
tokenizer_config.json holds `model_max_length` (the model's max_seq_len) and whose generation_config.json
holds our stop ids and the sampling defaults (do_sample, temperature, top_p, ...) of SRC's own
generation_config.json, if it has one (--from dcp: of the run's model.checkpoint). With no
tokenizer given or in SRC only the weights are written (printed), and DST's own tokenizer files stay.
DST's own tokenizer files (tokenizer.json, tokenizer_config.json with its chat template,
special_tokens_map.json, generation_config.json, ...) are never replaced silently: where they differ
from those to write, or would be read in their place, the conversion is refused before any work,
naming them, unless --replace-tokenizer. Converting in place (DST = SRC) keeps SRC's tokenizer files
as they are unless --tokenizer (with --replace-tokenizer) is given.

`--from dcp` takes the model out of a training checkpoint (llama_posttrain/train/train_state.py: DCP shards of the
model and optimizer; the optimizer is not read), on one process, no process group. The model config
comes from the run folder's config.yaml (model.checkpoint's config, or model.preset) and the head
from the run's kind (a reward-model run's config has an `rm` section). Run it from the folder the
training ran in if model.checkpoint is a relative path. DCP's .metadata is a pickle: convert only
run folders you trust.

`--from gguf` reads a llama.cpp GGUF file (llama_posttrain/llama/formats/gguf.py; needs the `gguf` extra):
every tensor dequantized to float32 (--dtype casts it), the config from its metadata, and its own
tokenizer and chat template written as Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json
with the template, special_tokens_map.json, generation_config.json with its stop ids) beside the weights.
DST's own tokenizer files are refused as above unless --replace-tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch

from llama_posttrain.llama.chat import TEMPLATES, resolve_chat_template
from llama_posttrain.llama.checkpoint import (
    CheckpointError,
    check_destination,
    check_tokenizer_files,
    detect_format,
    load_model,
    read_config,
    save_model,
)
from llama_posttrain.llama.config import ModelConfig, get_preset
from llama_posttrain.llama.formats import gguf, read_yaml
from llama_posttrain.llama.model import Transformer
from llama_posttrain.llama.paths import check_outputs
from llama_posttrain.llama.tokenizer import resolve_tokenizer, tokenizer_in_dir


def run_config(step_dir) -> tuple[dict, Path]:
    """-> (the saved config, its path) of the run that wrote the training checkpoint RUN_DIR/checkpoints/step_N."""
    step_dir = Path(step_dir)
    if not (step_dir / ".metadata").is_file():
        raise CheckpointError(f"{step_dir}: not a training checkpoint (no .metadata); give RUN_DIR/checkpoints/step_N")
    saved_file = step_dir.parent.parent / "config.yaml"
    if step_dir.parent.name != "checkpoints" or not saved_file.is_file():
        raise CheckpointError(
            f"{step_dir}: no run config at {saved_file}; a training checkpoint is read in its run folder "
            "(RUN_DIR/checkpoints/step_N beside RUN_DIR/config.yaml), which holds the model config"
        )
    try:
        saved = read_yaml(saved_file)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise CheckpointError(f"{saved_file}: no model section: not a run config this code wrote")
    return saved, saved_file


def run_model_config(step_dir) -> tuple[ModelConfig, str, str | None]:
    """-> (model config, head, format of model.checkpoint or None for a preset) of the run that wrote
    the training checkpoint RUN_DIR/checkpoints/step_N, from RUN_DIR/config.yaml."""
    saved, saved_file = run_config(step_dir)
    if "rm" in saved:
        head = "reward"
    elif "sft" in saved or "dpo" in saved:
        head = "lm"
    else:
        raise CheckpointError(f"{saved_file}: cannot tell the run's kind (no rm, sft or dpo section), so not its head")
    checkpoint, preset = saved["model"].get("checkpoint"), saved["model"].get("preset")
    if checkpoint:
        if not Path(checkpoint).exists():
            raise CheckpointError(
                f"{saved_file}: model.checkpoint {checkpoint} (read for the model config) is not found from "
                f"{Path.cwd()}; run from the folder the training ran in"
            )
        config, _, fmt = read_config(checkpoint)
        return config, head, fmt
    if preset:
        try:
            return get_preset(preset), head, None
        except ValueError as e:
            raise CheckpointError(f"{saved_file}: model.preset: {e}") from None
    raise CheckpointError(f"{saved_file}: neither model.checkpoint nor model.preset is set")


def load_training_checkpoint(step_dir, dtype: torch.dtype | None = None) -> Transformer:
    """The model of a training checkpoint (llama_posttrain/train/train_state.py), as saved (fp32 master weights)."""
    import torch.distributed.checkpoint as dcp

    from llama_posttrain.llama.formats.dcp_metadata import SafeReader  # .metadata is a pickle: never pickle.load it

    config, head, fmt = run_model_config(step_dir)
    metadata = SafeReader(str(step_dir)).read_metadata().state_dict_metadata
    stored = {k.removeprefix("model."): v for k, v in metadata.items() if k.startswith("model.")}
    if fmt == "meta" and head == "lm" and "output.weight" not in stored and not config.tie_embeddings:
        # training from a Meta folder whose output equals the embeddings ties them (llama.load_model)
        config = dataclasses.replace(config, tie_embeddings=True)
    with torch.device("meta"):
        model = Transformer(config, head=head)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"missing: {n} {expected[n]}" for n in sorted(set(expected) - set(stored))]
    problems += [f"unexpected: {n}" for n in sorted(set(stored) - set(expected))]
    problems += [
        f"shape: {n} is {tuple(stored[n].size)} in the checkpoint, the run's config wants {expected[n]}"
        for n in sorted(set(stored) & set(expected))
        if tuple(stored[n].size) != expected[n]
    ]
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise CheckpointError(
            f"{step_dir} does not match its run's model config:\n  " + "\n  ".join(problems[:8]) + more
        )
    state = {n: torch.empty(expected[n], dtype=stored[n].properties.dtype) for n in expected}
    with warnings.catch_warnings():  # torch warns that it loads in one process even when asked to
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": state}, checkpoint_id=str(step_dir), storage_reader=SafeReader(str(step_dir)), no_dist=True)
    model.load_state_dict({n: t.to(dtype or t.dtype) for n, t in state.items()}, assign=True)
    return model


def gguf_model(f: gguf.GGUFFile, config: ModelConfig, dtype: torch.dtype | None = None) -> Transformer:
    """The language model of a GGUF file, dequantized (float32) and cast to `dtype`."""
    state = gguf.read_state(f, config)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict({n: t.to(dtype or t.dtype) for n, t in state.items()}, assign=True)
    return model


def save_gguf_model(model: Transformer, files: dict[str, bytes], dst, format: str, replace_tokenizer: bool) -> None:
    """save_model plus the GGUF's tokenizer files. A new or empty DST is built beside it and renamed into
    place (all or nothing); into an existing folder the tokenizer files are checked first
    (check_tokenizer_files: refused where they differ, unless replace_tokenizer), then each is written
    through a temp name after the weights."""
    dst = Path(dst)
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            for name, content in files.items():
                (tmp / name).write_bytes(content)
            save_model(model, tmp, format=format)  # a folder of tokenizer files only: the weights are added
            os.replace(tmp, dst)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return
    shadow = check_tokenizer_files(dst, files, replace_tokenizer)
    replaced = [n for n in files if (dst / n).is_file() and (dst / n).read_bytes() != files[n]]
    save_model(model, dst, format=format)
    for name, content in files.items():
        tmp = dst / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_bytes(content)
        os.replace(tmp, dst / name)
    for name in shadow:
        (dst / name).unlink()
    if replaced or shadow:
        print(f"{dst}: replaced its tokenizer files {', '.join(replaced + shadow)} (--replace-tokenizer)")


def convert_gguf(args) -> None:
    """--from gguf: the file's language model, tokenizer and chat template into args.dst."""
    if args.head == "reward" or args.tokenizer or args.chat_template:
        raise SystemExit(
            "error: --from gguf writes the file's own language model, tokenizer and chat template: "
            "--head reward, --tokenizer and --chat-template do not apply"
        )
    try:
        f = gguf.GGUFFile(args.src)
        config = gguf.config_from_gguf(f)
        files = gguf.tokenizer_files(f, config.max_seq_len)
        check_destination(args.dst)  # both before the (long) dequantization
        check_tokenizer_files(args.dst, files, args.replace_tokenizer)
        model = gguf_model(f, config, getattr(torch, args.dtype) if args.dtype else None)
        save_gguf_model(model, files, args.dst, args.dst_format, args.replace_tokenizer)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    n = sum(p.numel() for p in model.parameters())
    written = f", tokenizer files {', '.join(files)}" if files else ""
    print(f"{args.src} (gguf) -> {args.dst} ({args.dst_format}): {n / 1e6:.1f}M parameters, head lm{written}")


def tokenizer_to_write(args, folder, vocab_size: int) -> dict:
    """save_model's tokenizer and chat_template: --tokenizer, else the one in `folder`; {} (printed) if none,
    or if converting in place (the folder's own tokenizer files stay as they are)."""
    if not args.tokenizer and folder is not None and Path(folder).resolve() == Path(args.dst).resolve():
        print(
            f"in place: the tokenizer files in {folder} are kept (--tokenizer with --replace-tokenizer rewrites them)"
        )
        return {}
    if not args.tokenizer and (folder is None or tokenizer_in_dir(folder) is None):
        print(f"no tokenizer given (--tokenizer) or in {args.src}: writing the weights only, no tokenizer files")
        return {}
    tokenizer = resolve_tokenizer(args.tokenizer, folder, vocab_size)
    return {"tokenizer": tokenizer, "chat_template": resolve_chat_template(args.chat_template, folder)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src_format", choices=("hf", "meta", "native", "dcp", "gguf"), required=True)
    ap.add_argument("--to", dest="dst_format", choices=("native", "hf"), default="native")
    ap.add_argument(
        "--head", choices=("lm", "reward"), default=None, help="default: the source's head (dcp: the run's)"
    )
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: as stored")
    ap.add_argument("--tokenizer", help="tokenizer file or model folder to write beside the weights; default: SRC's")
    ap.add_argument("--chat-template", choices=TEMPLATES, help="default: the one SRC names, else llama3")
    ap.add_argument(
        "--replace-tokenizer",
        action="store_true",
        help="replace DST's own tokenizer files where they differ from those written (default: refuse, naming them)",
    )
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)
    if args.src_format == "gguf":
        return convert_gguf(args)

    try:
        # SRC == DST converts an HF or native folder in place (the model is read whole before it is written; a
        # Meta folder is refused where it is written); any other output that is an input is refused
        in_place = args.src_format in ("hf", "native", "meta") and Path(args.src).resolve() == Path(args.dst).resolve()
        check_outputs({"SRC": None if in_place else args.src, "--tokenizer": args.tokenizer}, {"DST": args.dst})
        dtype = getattr(torch, args.dtype) if args.dtype else None
        if args.src_format == "dcp":
            found, (config, stored_head, _) = "dcp", run_model_config(args.src)
            if args.head not in (None, stored_head):
                raise SystemExit(
                    f"error: {args.src} is a checkpoint of a run with the {stored_head} head, not {args.head}"
                )
            check_destination(args.dst)
            run = run_config(args.src)[0]["model"]  # the run's tokenizer and chat template, unless given
            args.tokenizer = args.tokenizer or run.get("tokenizer")
            args.chat_template = args.chat_template or run.get("chat_template")
            tok = tokenizer_to_write(args, run.get("checkpoint"), config.vocab_size)
            source = run.get("checkpoint")  # the model the run trained: its generation defaults are kept
        else:
            found = detect_format(args.src)
            if found != args.src_format:
                raise SystemExit(f"{args.src} is a {found} checkpoint, not {args.src_format}")
            check_destination(args.dst)  # before the (long) load
            config, stored_head, _ = read_config(args.src)
            tok = tokenizer_to_write(args, args.src, config.vocab_size)
            source = args.src
        if tok:  # DST's own tokenizer files are not replaced silently: checked before the load too
            tok["source"] = source
            check_destination(
                args.dst, **tok, format=args.dst_format, replace_tokenizer=args.replace_tokenizer, config=config
            )
        if args.src_format == "dcp":
            model = load_training_checkpoint(args.src, dtype)
        else:  # --head reward on an LM is an explicit request for a fresh (random) scalar head
            model = load_model(args.src, head=args.head, dtype=dtype, new_head_ok=args.head == "reward")
        save_model(model, args.dst, format=args.dst_format, replace_tokenizer=args.replace_tokenizer, **tok)
    except (CheckpointError, ValueError) as e:  # ValueError: the tokenizer or chat template
        raise SystemExit(f"error: {e}") from None
    n = sum(p.numel() for p in model.parameters())
    fresh = ", freshly initialized" if model.head != stored_head and model.head == "reward" else ""
    print(
        f"{args.src} ({found}) -> {args.dst} ({args.dst_format}): {n / 1e6:.1f}M parameters, head {model.head}{fresh}"
    )


if __name__ == "__main__":
    main()
