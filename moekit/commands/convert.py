"""`moekit convert SRC DST`: between Hugging Face and moekit checkpoint layouts, with a dtype change.

SRC is a Hugging Face directory (config.json) or a moekit one (moekit_config.json). DST is written
in the Hugging Face layout (`--to hf`, per-expert "split" or 3-D "fused" experts) or moekit's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.hf.checkpoint import MOEKIT_CONFIG, from_pretrained, load_moekit, save_moekit, save_pretrained


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="checkpoint directory to read (Hugging Face or moekit layout)")
    p.add_argument("dst", type=Path, help="directory to write")
    p.add_argument("--to", choices=("hf", "moekit"), default="hf", help="layout to write (default hf)")
    p.add_argument("--layout", choices=("split", "fused"), default="split",
                   help="expert layout of a Hugging Face checkpoint: per-expert 2-D (split, default) "
                        "or 3-D fused")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype to write (default: keep the source's)")
    p.add_argument("--model-type", default=None,
                   help="Hugging Face model_type to write (default: the source's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 500MB or 5GB (default 5GB)")


def run(args: argparse.Namespace) -> int:
    if args.src.resolve() == args.dst.resolve():
        raise ValueError(f"dst {args.dst} is the source directory; write to a new directory")
    if (args.src / MOEKIT_CONFIG).is_file():
        model = load_moekit(args.src, dtype=args.dtype)
    else:
        model = from_pretrained(args.src, dtype=args.dtype)
    if args.to == "hf":
        files = save_pretrained(model, args.dst, max_shard_size=args.max_shard_size, layout=args.layout,
                                model_type=args.model_type)
    else:
        files = save_moekit(model, args.dst, max_shard_size=args.max_shard_size)
    dtype = next(model.parameters()).dtype
    print(f"wrote {args.dst} ({args.to} layout, {str(dtype).removeprefix('torch.')}): {', '.join(files)}")
    return 0
