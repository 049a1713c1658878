"""`moekit convert SRC DST`: between Hugging Face and moekit checkpoint layouts, with a dtype change.

SRC is any directory `moekit.from_pretrained` opens (Hugging Face, moekit's native format, a
training run's final/). DST is written in the Hugging Face layout (`--to hf`, per-expert "split" or
3-D "fused" experts) or moekit's native one; it must be new or empty unless `--overwrite`, which
replaces an earlier checkpoint's files there and never touches any other file.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="checkpoint directory to read (Hugging Face or moekit layout)")
    p.add_argument("dst", type=Path, help="directory to write (new or empty, unless --overwrite)")
    p.add_argument("--to", choices=("hf", "moekit"), default="hf", help="layout to write (default hf)")
    p.add_argument("--layout", choices=("split", "fused"), default="split",
                   help="expert layout of a Hugging Face checkpoint: per-expert 2-D (split, default) "
                        "or 3-D fused")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype to write (default: keep the source's)")
    p.add_argument("--model-type", default=None,
                   help="Hugging Face model_type to write (default: the source's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 500MB or 5GB (default 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="DST may hold an earlier checkpoint: replace its weights, index and config files "
                        "(other files are left alone)")


def run(args: argparse.Namespace) -> int:
    from moekit.hf.checkpoint import from_pretrained
    from moekit.hf.io import check_destination
    from moekit.hf.native import save_native
    from moekit.hf.save import save_pretrained

    if args.src.resolve() == args.dst.resolve():
        raise ValueError(f"dst {args.dst} is the source directory; write to a new directory")
    check_destination(args.dst, overwrite=args.overwrite)  # before the (long) load; changes nothing
    model = from_pretrained(args.src, dtype=args.dtype)
    if args.to == "hf":
        files = save_pretrained(model, args.dst, max_shard_size=args.max_shard_size, layout=args.layout,
                                model_type=args.model_type, overwrite=args.overwrite)
    else:
        files = save_native(model, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    dtype = next(model.parameters()).dtype
    print(f"wrote {args.dst} ({args.to} layout, {str(dtype).removeprefix('torch.')}): {', '.join(files)}")
    return 0
