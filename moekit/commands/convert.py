"""`moekit convert SRC DST`: between Hugging Face and moekit checkpoint layouts, with a dtype change.

SRC is any directory `moekit.from_pretrained` opens (Hugging Face, moekit's native format, a
training run's final/). DST is written in the Hugging Face layout (`--to hf`, per-expert "split" or
3-D "fused" experts) or moekit's native one; it must be new or empty unless `--overwrite`, which
replaces an earlier checkpoint's files there and never touches any other file. `--quantize int8|int4`
writes weight-only quantized experts (and with `--quantize-attention` attention projections) in the
native format, scales beside the weights (`moekit.inference.quant`); loading DST then equals loading
SRC with `quantize=` bit for bit.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="checkpoint directory to read (Hugging Face or moekit layout)")
    p.add_argument("dst", type=Path, help="directory to write (new or empty, unless --overwrite)")
    p.add_argument("--to", choices=("hf", "moekit"), default=None,
                   help="layout to write (default hf; moekit with --quantize, the only layout quantized weights have)")
    p.add_argument("--layout", choices=("split", "fused"), default="split",
                   help="expert layout of a Hugging Face checkpoint: per-expert 2-D (split, default) "
                        "or 3-D fused")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype to write (default: keep the source's)")
    p.add_argument("--model-type", default=None,
                   help="Hugging Face model_type to write (default: the source's)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 500MB or 5GB (default 5GB)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="store weight-only quantized experts: int8 per output channel, int4 in groups of 32 "
                        "(native layout)")
    p.add_argument("--quantize-attention", action="store_true",
                   help="with --quantize: quantize the attention projections too")
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
    if args.quantize is None and args.quantize_attention:
        raise ValueError("--quantize-attention needs --quantize int8|int4")
    if args.quantize is not None and args.to == "hf":
        raise ValueError("--quantize writes moekit's native layout (Hugging Face configs have no place for "
                         "these scales); leave out --to hf, or use --to moekit")
    if args.quantize is not None and (args.layout != "split" or args.model_type is not None):
        raise ValueError("--layout and --model-type describe a Hugging Face layout; --quantize writes the "
                         "native one")
    check_destination(args.dst, overwrite=args.overwrite)  # before the (long) load; changes nothing
    if args.quantize is not None:
        return _quantize(args)
    model = from_pretrained(args.src, dtype=args.dtype)
    if (args.to or "hf") == "hf":
        files = save_pretrained(model, args.dst, max_shard_size=args.max_shard_size, layout=args.layout,
                                model_type=args.model_type, overwrite=args.overwrite)
    else:
        files = save_native(model, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    dtype = next(model.parameters()).dtype
    print(f"wrote {args.dst} ({args.to or 'hf'} layout, {str(dtype).removeprefix('torch.')}): {', '.join(files)}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from moekit.hf.native import is_native, read_native
    from moekit.inference.quant import save_quantized
    from moekit.load import from_pretrained

    if is_native(args.src) and read_native(args.src).quantize is not None:
        raise ValueError(f"{args.src} already holds quantized weights; convert its float original instead")
    # moekit.from_pretrained's quantize-on-load: the same tensors the saved file will hold
    model = from_pretrained(args.src, dtype=args.dtype, quantize=args.quantize,
                            **({"quantize_attention": True} if args.quantize_attention else {}))
    files = save_quantized(model, args.dst, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    total = sum((args.dst / f).stat().st_size for f in files if (args.dst / f).is_file())
    print(f"wrote {args.dst} (moekit layout, {args.quantize} experts"
          f"{' and attention' if args.quantize_attention else ''}, {total / 1e6:.1f} MB): {', '.join(files)}")
    return 0
