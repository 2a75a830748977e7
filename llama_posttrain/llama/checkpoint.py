"""Checkpoints: load and save a model in any of the formats, told apart by the files in the directory.

- native (llama_posttrain/llama/formats/native.py): `config.json` {"format": "llama-native", "head", "model": ModelConfig}
  + safetensors with our (Meta) parameter names, one file or shards with `model.safetensors.index.json`.
- hf (llama_posttrain/llama/formats/hf.py): `config.json` (LlamaForCausalLM / LlamaForSequenceClassification) +
  safetensors with HF names and HF's q/k layout; with the tokenizer, the files transformers needs.
- meta (llama_posttrain/llama/formats/meta.py, read only): `params.json` + `consolidated.NN.pth` model-parallel shards.

Loading builds the model on the meta device and assigns the loaded tensors by name, so the
weights are in memory once. Saving never deletes a file this project did not write (see
`save_checkpoint`; `replace_tokenizer=True` asks it to replace the folder's own tokenizer files), never
replaces a folder's own tokenizer files silently (`check_tokenizer_files`), and model files are
safetensors only: no pickle is ever written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

from llama_posttrain.llama.config import ModelConfig
from llama_posttrain.llama.formats import CheckpointError, hf, meta, native, read_json
from llama_posttrain.llama.formats.hf import generation_defaults, is_generation_default, tokenizer_files
from llama_posttrain.llama.formats.native import INDEX, MAX_SHARD_BYTES, NATIVE, open_weights, tensor_files
from llama_posttrain.llama.heads import HEADS, all_weight_names, get_head
from llama_posttrain.llama.model import Transformer
from llama_posttrain.llama.tokenizer_kinds import Tokenizer

__all__ = [
    "MAX_SHARD_BYTES",
    "CheckpointError",
    "check_destination",
    "check_tokenizer_files",
    "detect_format",
    "load_model",
    "open_weights",
    "read_config",
    "save_checkpoint",
    "save_model",
    "state_dtype",
    "tensor_files",
    "tokenizer_files",
]


def detect_format(path) -> str:
    path = Path(path)
    if (path / "params.json").is_file():
        return "meta"
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json or params.json)")
    return "native" if read_json(cfg).get("format") == NATIVE else "hf"


def read_config(path) -> tuple[ModelConfig, str, str]:
    """-> (config, head stored in the checkpoint, format). Errors name the config file."""
    path = Path(path)
    fmt = detect_format(path)
    file = path / ("params.json" if fmt == "meta" else "config.json")
    raw = read_json(file)
    try:
        if fmt == "meta":
            return meta.config_from_meta(raw, str(file)), "lm", fmt
        if fmt == "native":
            return *native.config_from_json(raw, str(file)), fmt
        cfg, head = hf.config_from_hf(raw, str(file))
        return cfg, head, fmt
    except CheckpointError:
        raise
    except KeyError as e:
        raise CheckpointError(f"{file}: missing key {e}") from None
    except (TypeError, ValueError, AttributeError) as e:  # wrong types or values in the JSON
        msg = str(e)
        raise CheckpointError(msg if msg.startswith(str(file)) else f"{file}: {msg}") from None


# ----------------------------------------------------------------------------- load


def load_model(
    path, head: str | None = None, dtype: torch.dtype | None = None, device="cpu", new_head_ok: bool = False
) -> Transformer:
    """Load a native, Hugging Face or Meta checkpoint directory (auto-detected) into our model.

    `head` defaults to the checkpoint's. Another head whose weights the checkpoint does not hold
    (head="reward" on an LM checkpoint: it would score with random weights) is an error unless
    `new_head_ok`: then the stored head is dropped and a freshly initialized one is made (how reward-model
    training starts from an LM: a scalar head).
    `dtype` defaults to the stored one.
    """
    path = Path(path)
    config, stored_head, fmt = read_config(path)
    spec = get_head(head or stored_head)
    new = spec.weight_names(config) if spec.name != stored_head else set()  # weights the checkpoint lacks
    if new and not new_head_ok:
        raise CheckpointError(
            f"{path} is a {HEADS[stored_head].model_title} checkpoint with no {spec.title} ({', '.join(sorted(new))}) "
            f"to load with head={spec.name!r}: pass a {spec.model_title} checkpoint (a fresh head is made only "
            "where asked for, e.g. a scalar head to start reward-model training)"
        )
    if fmt == "meta":
        tensors, config = meta.read_tensors(path, config)  # tied where Meta stores the matrix twice
    else:
        tensors = native.read_tensors(path, device)
        if fmt == "hf":
            tensors = hf.state_from_hf(tensors, config)
    with torch.device("meta"):
        model = Transformer(config, head=spec)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    # another head's weights, or a tied LM head's copy (HF may store it)
    droppable = all_weight_names() - set(expected)

    problems = []
    for name in sorted(set(expected) - set(tensors) - new):
        problems.append(f"missing: {name} {tuple(expected[name])}")
    for name in sorted(set(tensors) - set(expected) - droppable):
        problems.append(f"unexpected: {name.removeprefix('<hf>')} {tuple(tensors[name].shape)}")
    for name in sorted(set(tensors) & set(expected)):
        if tensors[name].shape != expected[name]:
            problems.append(
                f"shape: {name} is {tuple(tensors[name].shape)} in the checkpoint, model wants {tuple(expected[name])}"
            )
    if problems:
        raise CheckpointError(f"{path} ({fmt}) does not match the model config:\n  " + "\n  ".join(problems))

    state = {}
    for name in list(tensors):  # convert one tensor at a time: never two copies of the model
        t = tensors.pop(name)
        if name in expected:
            state[name] = t.to(device=device, dtype=dtype or t.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if new:
        spec.fresh(model)
    return model


# ----------------------------------------------------------------------------- save


def _is_new(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def check_destination(
    path,
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
    format: str = "native",
    replace_tokenizer: bool = False,
    config: ModelConfig | None = None,
    source=None,
) -> None:
    """Raise unless `save_checkpoint` may write to `path`. Call it before long work whose result goes there.

    Allowed: a missing or empty directory; a (native or HF) checkpoint directory, whose config and
    weights are replaced and the rest kept; a folder of other files (a tokenizer, a README) that holds
    no config.json or weight file we did not write, to which ours are added. Anything else is refused
    rather than overwritten. With `tokenizer` (and `chat_template`, `format`, `config`, `source`: what the
    save will write), the folder's own tokenizer files are checked too (`check_tokenizer_files`). Without
    `config` (a check before the model is known) what depends on the model is not compared: the
    `model_max_length` of tokenizer_config.json and the generation defaults (`source`'s) of
    generation_config.json; the save compares them before it writes anything."""
    path = Path(path)
    if _is_new(path):
        return
    if not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory")
    if (path / "params.json").exists():
        raise CheckpointError(
            f"{path} holds a Meta checkpoint (params.json): writing another checkpoint beside it would leave two "
            "in one folder; write to a new directory"
        )
    if (path / "config.json").exists():
        try:
            read_config(path)
        except CheckpointError as e:
            raise CheckpointError(
                f"refusing to write a checkpoint into {path}: its config.json is not a Llama checkpoint's and would "
                f"be overwritten ({e}); choose a new or empty directory"
            ) from None
    else:
        clash = sorted(p.name for p in path.iterdir() if native.is_weight_name(p.name) and not native.written_by_us(p))
        if clash:
            raise CheckpointError(
                f"refusing to write a checkpoint into {path}: it holds weight files this project did not write and "
                f"no config.json ({', '.join(clash)}); choose a new or empty directory"
            )
    if tokenizer is not None:
        if config is None:
            files = tokenizer_files(tokenizer, chat_template, format)
            unknown = {
                "tokenizer_config.json": "model_max_length".__eq__,
                "generation_config.json": is_generation_default,
            }
        else:
            files = tokenizer_files(tokenizer, chat_template, format, config.max_seq_len, generation_defaults(source))
            unknown = {}
        check_tokenizer_files(path, files, replace_tokenizer, unknown)


# A model folder's tokenizer and chat format: what tokenizer_files writes, and what would be read in place
# of (or beside) what it writes. generation_config.json only counts where it is written (HF).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _same_json_but(theirs: bytes, ours: bytes, unknown) -> bool:
    """Whether two JSON objects are equal in every key but those `unknown(key)` says are not known yet."""
    try:
        a, b = json.loads(theirs), json.loads(ours)
    except ValueError:
        return False
    if not isinstance(a, dict) or not isinstance(b, dict):
        return False
    return {k: v for k, v in a.items() if not unknown(k)} == {k: v for k, v in b.items() if not unknown(k)}


def check_tokenizer_files(path, files: dict[str, bytes], replace: bool = False, unknown=None) -> list[str]:
    """Raise unless writing the tokenizer files `files` (name -> content) into the existing folder `path`
    replaces nothing of the folder's own. A file there with other content than ours (another tokenizer,
    chat template or generation config: a user's, or an earlier save's) is refused unless `replace`;
    a tokenizer file there that `files` does not hold (a tokenizer.model read before our tokenizer.json,
    a chat_template.jinja read before our tokenizer_config.json's template) is refused too, and with
    `replace` returned, for the caller to remove once the new files are in place. Identical files pass.
    `unknown`: {file name: key -> bool}, the keys of a JSON file that an early check cannot know (what
    the model decides); they are not compared there (`check_destination` without the model config)."""
    path = Path(path)
    if not files or not path.is_dir():
        return []
    unknown = unknown or {}

    def differs(n: str) -> bool:
        theirs = (path / n).read_bytes()
        return theirs != files[n] and not (n in unknown and _same_json_but(theirs, files[n], unknown[n]))

    differ = [n for n in files if (path / n).is_file() and differs(n)]
    shadow = [n for n in TOKENIZER_FILES if n not in files and n != "generation_config.json" and (path / n).exists()]
    if (differ or shadow) and not replace:
        problems = []
        if differ:
            problems.append(f"{', '.join(differ)} would be replaced by this checkpoint's (they differ)")
        if shadow:
            problems.append(f"{', '.join(shadow)} would be read instead of the tokenizer files it writes")
        raise CheckpointError(
            f"refusing to write the tokenizer files into {path}: its own {'; '.join(problems)}. Keep them by "
            "writing to a new folder, or replace them: --replace-tokenizer (replace_tokenizer=True)"
        )
    return shadow


def state_dtype(state: dict) -> torch.dtype:
    """The dtype of a state dict's floating-point tensors (what a checkpoint records as its dtype)."""
    return next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)


def save_checkpoint(
    state,
    config: ModelConfig,
    head: str,
    path,
    format: str = "native",
    max_shard_bytes=MAX_SHARD_BYTES,
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
    dtype: torch.dtype | None = None,
    replace_tokenizer: bool = False,
    source=None,
):
    """Write a full (unsharded) state dict in native or HF format, safetensors only.

    `dtype`: cast the weights to it as they are written (default: as they are). `tokenizer` (and the
    `chat_template` name, llama_posttrain/llama/chat.py): also write the tokenizer files (`tokenizer_files`), so that
    the folder is complete for transformers (HF) or for this project's tools (native); tokenizer_config.json
    holds `model_max_length` = the config's max_seq_len. `source`: the model folder the weights came from
    (a training run's model.checkpoint, convert's SRC); its generation_config.json's sampling defaults
    (do_sample, temperature, top_p, ...) are kept in the generation_config.json written, beside our stop ids.

    A new or empty `path` is built as a temp directory beside it and renamed into place: all or nothing.
    Into an existing folder (an earlier save, the source of an in-place conversion, a folder holding a
    tokenizer; see `check_destination` for what is refused) only config.json, the index, the weight
    files and the tokenizer files (if given) are written, each through a temp name, config.json last;
    every other file is kept. Weight files of the previous checkpoint that the new one does not name
    are removed only if this project wrote them (the WRITER tag); others are left, listed, and not read.
    The folder's own tokenizer files are never replaced silently: any that differ from those written
    here, or would be read in their place, are refused (`check_tokenizer_files`) unless
    `replace_tokenizer`; then they are replaced, and those not written here removed (both printed).
    """
    if format not in ("native", "hf"):
        raise ValueError(f"unknown checkpoint format {format!r}; expected 'native' or 'hf'")
    if chat_template is not None and tokenizer is None:
        raise ValueError("a chat template is written with the tokenizer files: pass the tokenizer too")
    path = Path(path)
    state = {k: v.detach() for k, v in state.items()}
    dtype = dtype or state_dtype(state)
    extra = {}
    if tokenizer is not None:
        extra = tokenizer_files(tokenizer, chat_template, format, config.max_seq_len, generation_defaults(source))
    if format == "hf":
        state, cfg = hf.state_to_hf(state, config), hf.config_to_hf(config, head, dtype, tokenizer)
    else:
        cfg = native.config_json(config, head)

    if _is_new(path):
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            native.write_files(tmp, state, cfg, max_shard_bytes, False, dtype, extra)
            os.replace(tmp, path)  # onto a missing or empty directory: one rename
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return

    check_destination(path)
    shadow = check_tokenizer_files(path, extra, replace_tokenizer)
    replaced = [n for n in extra if (path / n).is_file() and (path / n).read_bytes() != extra[n]]
    previous = native.previous_weight_files(path)
    # Keep an existing index (replaced, naming the new files) rather than deleting it.
    written = native.write_files(path, state, cfg, max_shard_bytes, (path / INDEX).is_file(), dtype, extra)
    left = []
    for name in sorted(previous - written):
        if native.written_by_us(path / name):
            (path / name).unlink()
        else:
            left.append(name)
    for name in shadow:
        (path / name).unlink()
    done = [f"replaced {', '.join(replaced)} with this checkpoint's"] if replaced else []
    done += [f"removed {', '.join(shadow)}, which would have been read in place of them"] if shadow else []
    if done:
        print(f"{path}: the folder's own tokenizer files (replace_tokenizer): {'; '.join(done)}", file=sys.stderr)
    if left:
        print(
            f"{path}: left {len(left)} weight file(s) of the previous checkpoint that this project did not write "
            f"(not read: the new checkpoint does not name them; delete them if not needed): {', '.join(left)}",
            file=sys.stderr,
        )


def save_model(
    model: Transformer,
    path,
    format: str = "native",
    max_shard_bytes: int = MAX_SHARD_BYTES,
    tokenizer: Tokenizer | None = None,
    chat_template: str | None = None,
    dtype: torch.dtype | None = None,
    replace_tokenizer: bool = False,
    source=None,
) -> None:
    """`save_checkpoint` of a model; with `tokenizer` (and `chat_template`) a folder transformers loads on its own;
    `source`: the model folder it came from, whose generation defaults are kept."""
    state = model.state_dict()
    save_checkpoint(
        state,
        model.config,
        model.head,
        path,
        format,
        max_shard_bytes,
        tokenizer,
        chat_template,
        dtype,
        replace_tokenizer,
        source,
    )
