"""What every training entry point does before the loop: `setup` (llama_posttrain/train/lifecycle.py `main_guard` runs
around it all).

    cfg = parse_args(SFTConfig, argv, __doc__)
    s = setup(cfg, kind="sft", head="lm", train_on_prompt=not cfg.sft.mask_prompt)
    -> s.d (process group), s.chat, s.train_loader, s.eval_loader, s.model, s.resume_from

Order matters for failing early: the config is parsed and checked, the run folder is locked and
checked against it (llama_posttrain/train/run_folder.py `claim`), the tokenizer is checked against the model's
vocabulary, the data is loaded and checked against the run's record of it; only then are weights read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from llama_posttrain.data import cache
from llama_posttrain.data.loader import DataLoader, build_loaders
from llama_posttrain.data.prepare import prepare_config
from llama_posttrain.data.records import train_sources
from llama_posttrain.llama.chat import ChatFormat, resolve_chat_template
from llama_posttrain.llama.paths import check_outputs
from llama_posttrain.train import run_folder
from llama_posttrain.train.config import Config
from llama_posttrain.train.distributed import Dist, build_model, init_distributed, model_tokenizer


@dataclass
class Setup:
    cfg: Config
    d: Dist
    chat: ChatFormat
    train_loader: DataLoader
    eval_loader: DataLoader | None
    model: object  # the FSDP-sharded Transformer being trained
    resume_from: Path | None  # the checkpoint to resume from; None: a fresh start


def setup(cfg: Config, kind: str, head: str, **encode_kw) -> Setup:
    """Process group, run folder, chat format, loaders, model: everything `loop.run` needs.
    encode_kw: passed to data.loader.load_examples (e.g. train_on_prompt, one_row)."""
    d = init_distributed()
    resume_from = run_folder.claim(cfg, d.rank, d.world_size)
    m, t = cfg.model, cfg.train
    verbose = d.local_rank == 0  # `tokenizer:` / `chat template:` printed once per node, not once per rank
    tokenizer = model_tokenizer(m.checkpoint, m.preset, m.tokenizer, verbose)
    chat = ChatFormat(tokenizer, resolve_chat_template(m.chat_template, m.checkpoint, verbose))
    run_folder.check_exports(cfg, chat, d.rank, d.world_size)
    buckets = (128 if t.compile else 0) if t.shape_buckets == "auto" else t.shape_buckets  # see TrainSection
    cfg.data.cache_dir = run_folder.cache_dir(cfg)  # after the record (claim): it holds the value given
    train_loader, eval_loader = build_loaders(
        cfg.data, kind, chat, d.rank, d.world_size, d.is_main, buckets, **encode_kw
    )
    data = {"train": train_loader.fingerprints, "eval": eval_loader.fingerprints if eval_loader else {}}
    run_folder.check_data(cfg, data, resume_from is None, d.rank, d.world_size)
    layout = {"shard_degree": t.shard_degree, "cpu_offload": t.cpu_offload, "static_shapes": len(train_loader.shapes)}
    model = build_model(
        d, m.checkpoint, m.preset, head, t.seed, t.mixed_precision, t.activation_checkpointing, t.compile, **layout
    )
    return Setup(cfg, d, chat, train_loader, eval_loader, model, resume_from)


def prepare_caches(cfg: Config, kind: str, config_path: str | None, verify: bool, **encode_kw) -> None:
    """Tokenize the config's data into the caches `setup` will read (llama_posttrain/train/prepare_data.py), with
    the chat format as `setup` builds it (the same cache key), printing each load report; verify: also check
    every block of each cache against its checksum."""
    cfg.data.cache_dir = run_folder.cache_dir(cfg)  # where the run started with this config looks for them
    m = cfg.model
    sources = {"--config": config_path, "data.train": [p for p, _ in train_sources(cfg.data.train)]}
    sources |= {"data.eval": cfg.data.eval, "model.checkpoint": m.checkpoint, "model.tokenizer": m.tokenizer}
    check_outputs(sources, {"data.cache_dir": cfg.data.cache_dir})  # never a cache onto a file the run reads
    chat = ChatFormat(
        model_tokenizer(m.checkpoint, m.preset, m.tokenizer), resolve_chat_template(m.chat_template, m.checkpoint)
    )
    parts, evaluation = prepare_config(cfg.data, kind, chat, verbose=True, **encode_kw)
    for found in [*parts, evaluation] if evaluation else parts:
        data = found.open()
        if verify:
            t0 = time.perf_counter()
            data.verify()
            print(f"{data.folder}: every block verified in {time.perf_counter() - t0:.1f} s", flush=True)
        print(cache.report_line(data), flush=True)  # the load report, as training prints it
