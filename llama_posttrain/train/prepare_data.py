"""Tokenize a training config's data ahead of the run, into the cache the run will read (llama_posttrain/data/prepare.py).

    python -m llama_posttrain.train.prepare_data --kind sft --config experiments/quickstart/sft.yaml [section.key=value ...]

prepares every data.train file and data.eval of a training config, printing each load report and
cache folder as training does; the training run started afterwards with the same config (and code)
reads them and starts in seconds. A bad config, data file or record is one line `error: ...` (exit
status 2), as in training. `--verify` also checks every block of each cache against its checksum.
"""

from __future__ import annotations

import argparse
import sys

from llama_posttrain.train.config import load_config
from llama_posttrain.train.dpo import DPOConfig
from llama_posttrain.train.rm import RMConfig
from llama_posttrain.train.sft import SFTConfig

# A training entry point's config class and the encoding options its main() passes to setup (its `run`).
ENTRY_POINTS = {
    "sft": (SFTConfig, lambda cfg: {"train_on_prompt": not cfg.sft.mask_prompt}),
    "rm": (RMConfig, lambda cfg: {"one_row": cfg.rm.one_row}),
    "dpo": (DPOConfig, lambda cfg: {}),
}


def main(argv=None) -> None:
    """The command line: a ValueError / OSError / ImportError (bad config, data, record, disk) is
    printed as `error: ...` on stderr and the exit status is 2, as a training entry point does."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", required=True, choices=list(ENTRY_POINTS), help="the training entry point")
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
    config_class, options = ENTRY_POINTS[args.kind]
    cfg = load_config(config_class, args.config, args.overrides)
    from llama_posttrain.train.run_setup import prepare_caches  # torch (data.cache): after the config is read

    prepare_caches(cfg, args.kind, args.config, args.verify, **options(cfg))


if __name__ == "__main__":
    main(sys.argv[1:])
