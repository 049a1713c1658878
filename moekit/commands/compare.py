"""`moekit compare`: dense vs MoE variants at equal active compute on one corpus; writes a report."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path

from moekit.tasks import add_task_arguments, run_task


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.train.compare import DEFAULT_VARIANTS, VARIANTS, CompareConfig

    p.add_argument("--out", type=Path, default=Path("runs/compare"),
                   help="output folder (default runs/compare); rerunning resumes unfinished variants")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="NAME",
                   help=f"variants to train (default {' '.join(DEFAULT_VARIANTS)}); any of "
                        f"{', '.join(VARIANTS)}")
    p.add_argument("--corpus", type=Path, default=None,
                   help="folder or file of UTF-8 text (default: Shakespeare, fetched on demand)")
    p.add_argument("--cache-dir", type=Path, default=None, help="Shakespeare cache folder")
    defaults = CompareConfig()
    for f in fields(CompareConfig):
        value = getattr(defaults, f.name)
        p.add_argument("--" + f.name.replace("_", "-"), type=type(value), default=None,
                       help=f"default {value}")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_task_arguments(p, "compare")


def run(args: argparse.Namespace) -> int:
    from moekit.train.compare import CompareConfig, check_variants, run_compare
    from moekit.train.data import default_cache_dir, fetch_shakespeare, is_fetched

    if args.task != "lm":
        return run_task(args, "compare", [f.name for f in fields(CompareConfig)])
    check_variants(args.variants)
    overrides = {f.name: getattr(args, f.name) for f in fields(CompareConfig)
                 if getattr(args, f.name) is not None}
    config = replace(CompareConfig(), **overrides)
    if args.corpus is None:
        cache = args.cache_dir or default_cache_dir()
        if not is_fetched(cache):
            print(f"fetching the Shakespeare corpus into {cache} ...")
            try:
                fetch_shakespeare(cache)
            except RuntimeError as err:
                raise ValueError(str(err)) from err
    try:
        report = run_compare(config, variants=args.variants, out_dir=args.out, corpus=args.corpus,
                             cache_dir=args.cache_dir, progress=not args.quiet)
    except KeyboardInterrupt as stop:
        print(f"\n{stop or 'interrupted'}")
        return 130
    print((report / "summary.md").read_text())
    print(f"report: {report / 'summary.md'} (plots beside it)")
    return 0
