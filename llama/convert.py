"""Convert checkpoints between formats.

python -m llama.convert --from hf|meta|native --to native|hf SRC DST [--dtype bfloat16]

DST may be new, empty, or a checkpoint directory (SRC itself included): its config and weight files
are replaced, everything else in it (tokenizer, README, ...) is kept. Any other non-empty DST is refused.
"""

from __future__ import annotations

import argparse

import torch

from llama.checkpoint import CheckpointError, check_destination, detect_format, load_model, read_config, save_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src_format", choices=("hf", "meta", "native"), required=True)
    ap.add_argument("--to", dest="dst_format", choices=("native", "hf"), required=True)
    ap.add_argument("--head", choices=("lm", "reward"), default=None, help="default: the source's head")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: as stored")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)

    try:
        found = detect_format(args.src)
        if found != args.src_format:
            raise SystemExit(f"{args.src} is a {found} checkpoint, not {args.src_format}")
        check_destination(args.dst)  # before the (long) load
        stored_head = read_config(args.src)[1]
        dtype = getattr(torch, args.dtype) if args.dtype else None
        # --head reward on an LM is an explicit request for a fresh (random) scalar head
        model = load_model(args.src, head=args.head, dtype=dtype, new_head_ok=args.head == "reward")
        save_model(model, args.dst, format=args.dst_format)
    except CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    n = sum(p.numel() for p in model.parameters())
    fresh = ", freshly initialized" if model.head != stored_head and model.head == "reward" else ""
    print(
        f"{args.src} ({found}) -> {args.dst} ({args.dst_format}): {n / 1e6:.1f}M parameters, head {model.head}{fresh}"
    )


if __name__ == "__main__":
    main()
