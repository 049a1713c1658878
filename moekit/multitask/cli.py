"""`moekit train --task multitask` and `moekit compare --task multitask`: data, config, library calls."""

from __future__ import annotations

import argparse

from moekit.multitask.compare import (
    DEFAULT_MODELS,
    MODELS,
    MultiTaskCompareConfig,
    check_models,
    run_multitask_compare,
    train_one,
)
from moekit.multitask.data import TabularData, census_dir, fetch_census_income, is_census, load_census
from moekit.task_config import task_config


def load_data(args: argparse.Namespace) -> TabularData:
    if args.data is not None and str(args.data) != "census-income":
        return load_census(args.data)
    folder = census_dir()
    if not is_census(folder):
        print(f"fetching Census-Income into {folder} ...")
        try:
            fetch_census_income(folder)
        except RuntimeError as err:
            raise ValueError(str(err)) from err
    return load_census(folder)


def train(args: argparse.Namespace, shared_flags: list[str]) -> int:
    config = task_config(MultiTaskCompareConfig, args, shared_flags)
    model = args.variant or "mmoe"
    check_models([model])
    data = load_data(args)
    if not args.quiet:
        print(f"{data.describe()}\n{model}: {MODELS[model]}")
    if (args.out / "metrics.jsonl").exists() or (args.out / "income" / "metrics.jsonl").exists():
        raise ValueError(f"{args.out} already holds a run; choose a new --out (nothing was overwritten)")
    result = train_one(model, config, data, config.seed, args.out)
    print(f"trained {config.steps} steps; test AUC " + ", ".join(f"{k} {v:.4f}" for k, v in result["auc"].items())
          + f"; metrics in {args.out}")
    return 0


def compare(args: argparse.Namespace, shared_flags: list[str]) -> int:
    from moekit.train.compare import DEFAULT_VARIANTS as LM_DEFAULT

    config = task_config(MultiTaskCompareConfig, args, shared_flags)
    models = list(DEFAULT_MODELS) if args.variants == list(LM_DEFAULT) else args.variants
    check_models(models)
    data = load_data(args)
    if not args.quiet:
        print(data.describe())
    report = run_multitask_compare(config, data, models=models, out_dir=args.out, progress=not args.quiet)
    print((report / "summary.md").read_text())
    print(f"report: {report / 'summary.md'} (summary.json and gate_weights.png beside it)")
    return 0
