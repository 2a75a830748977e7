"""Tokenize a training config's data ahead of the run, into the cache the run will map (llama_posttrain/data/prepare.py).

    python -m llama_posttrain.train.prepare_data --kind sft --config experiments/quickstart/sft.yaml [section.key=value ...]

prepares every data.train file and data.eval of a training config, printing each load report and
cache folder as training does; the training run started afterwards with the same config (and code)
maps them and starts in seconds. A bad config, data file or record is one line `error: ...` (exit
status 2), as in training. `--verify` also checks every block of each cache against its checksum.
"""

from __future__ import annotations

import argparse
import sys
import time

from llama_posttrain.data.records import train_sources
from llama_posttrain.llama.paths import check_outputs
from llama_posttrain.train.config import load_config

# data.cache, data.prepare and train.distributed import torch: imported in `_main`, so `--help` answers at once.


def _entry_point(kind: str):
    """A training entry point's config class and the encoding options its main() passes to setup."""
    if kind == "sft":
        from llama_posttrain.train.sft import SFTConfig

        return SFTConfig, lambda cfg: {"train_on_prompt": not cfg.sft.mask_prompt}
    if kind == "rm":
        from llama_posttrain.train.rm import RMConfig

        return RMConfig, lambda cfg: {"one_row": cfg.rm.one_row}
    from llama_posttrain.train.dpo import DPOConfig

    return DPOConfig, lambda cfg: {}


def main(argv=None) -> None:
    """The command line: a ValueError / OSError / ImportError (bad config, data, record, disk) is
    printed as `error: ...` on stderr and the exit status is 2, as a training entry point does."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", required=True, choices=["sft", "rm", "dpo"], help="the training entry point")
    ap.add_argument("--config", help="the training YAML file")
    ap.add_argument("--verify", action="store_true", help="also check every block of each cache (reads it all)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, as for the training run")
    args = ap.parse_args(argv)
    try:
        _main(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _main(args) -> None:
    from llama_posttrain.data import cache
    from llama_posttrain.data.prepare import prepare_config
    from llama_posttrain.llama.chat import ChatFormat, resolve_chat_template
    from llama_posttrain.train import run_folder
    from llama_posttrain.train.distributed import model_tokenizer

    config_class, options = _entry_point(args.kind)
    cfg = load_config(config_class, args.config, args.overrides)
    cfg.data.cache_dir = run_folder.cache_dir(cfg)  # where the run started with this config looks for them
    m = cfg.model  # the chat format as llama_posttrain/train/run_setup.py `setup` builds it: the same cache key
    check_outputs(  # the caches are written under data.cache_dir: never onto a file the run reads
        {"--config": args.config, "data.train": [p for p, _ in train_sources(cfg.data.train)],
         "data.eval": cfg.data.eval, "model.checkpoint": m.checkpoint, "model.tokenizer": m.tokenizer},
        {"data.cache_dir": cfg.data.cache_dir},
    )  # fmt: skip
    chat = ChatFormat(
        model_tokenizer(m.checkpoint, m.preset, m.tokenizer), resolve_chat_template(m.chat_template, m.checkpoint)
    )
    parts, evaluation = prepare_config(cfg.data, args.kind, chat, verbose=True, **options(cfg))
    for found in [*parts, evaluation] if evaluation else parts:
        data = found.open()
        if args.verify:
            t0 = time.perf_counter()
            data.verify()
            print(f"{data.folder}: every block verified in {time.perf_counter() - t0:.1f} s", flush=True)
        print(cache.report_line(data), flush=True)  # the load report, as training prints it


if __name__ == "__main__":
    main(sys.argv[1:])
