"""Convert checkpoints between formats.

python -m llama.convert --from hf|meta|native --to native|hf SRC DST [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch

from llama.checkpoint import detect_format, load_model, save_model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src_format", choices=("hf", "meta", "native"), required=True)
    ap.add_argument("--to", dest="dst_format", choices=("native", "hf"), required=True)
    ap.add_argument("--head", choices=("lm", "reward"), default=None, help="default: the source's head")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: as stored")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args(argv)

    found = detect_format(args.src)
    if found != args.src_format:
        raise SystemExit(f"{args.src} is a {found} checkpoint, not {args.src_format}")

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = load_model(args.src, head=args.head, dtype=dtype)
    save_model(model, args.dst, format=args.dst_format)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.src} ({found}) -> {args.dst} ({args.dst_format}): {n / 1e6:.1f}M parameters, head {model.head}")


if __name__ == "__main__":
    main()
