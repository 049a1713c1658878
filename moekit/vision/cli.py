"""`moekit train --task vision` and `moekit compare --task vision`: data, config, library calls."""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from moekit.task_config import task_config
from moekit.vision.compare import (
    DEFAULT_VARIANTS,
    VARIANTS,
    VisionCompareConfig,
    check_variants,
    run_vision_compare,
)
from moekit.vision.data import (
    ImageData,
    fashion_mnist_dir,
    fetch_fashion_mnist,
    is_fashion_mnist,
    load_image_folder,
)


def load_data(args: argparse.Namespace) -> ImageData:
    if args.data is not None and str(args.data) != "fashion-mnist":
        return load_image_folder(args.data)
    folder = fashion_mnist_dir()
    if not is_fashion_mnist(folder):
        print(f"fetching Fashion-MNIST into {folder} ...")
        try:
            fetch_fashion_mnist(folder)
        except RuntimeError as err:
            raise ValueError(str(err)) from err
    return load_image_folder(folder)


def train(args: argparse.Namespace, shared_flags: list[str]) -> int:
    from moekit.model.accounting import count_params
    from moekit.vision.model import ViT, active_params
    from moekit.vision.train import train_vision

    config = task_config(VisionCompareConfig, args, shared_flags)
    variant = args.variant or "topk"
    check_variants([variant])
    data = load_data(args)
    vit = config.vit(VARIANTS[variant].moe(config))
    vit = replace(vit, num_classes=max(data.num_classes, vit.num_classes))
    torch.manual_seed(config.seed)
    model = ViT(vit)
    if not args.quiet:
        print(f"{data.describe()}\n{variant}: {VARIANTS[variant].description}; {count_params(model):,} "
              f"parameters ({active_params(model):,} active)")
    result = train_vision(model, data, config.train_config(), out_dir=args.out, progress=not args.quiet,
                          run_info={"variant": variant})
    print(f"trained {result.steps} steps; test accuracy {result.test_accuracy:.4f} (validation "
          f"{result.val_accuracy:.4f}); metrics in {result.metrics_path}")
    return 0


def compare(args: argparse.Namespace, shared_flags: list[str]) -> int:
    from moekit.train.compare import DEFAULT_VARIANTS as LM_DEFAULT

    config = task_config(VisionCompareConfig, args, shared_flags)
    variants = list(DEFAULT_VARIANTS) if args.variants == list(LM_DEFAULT) else args.variants
    check_variants(variants)
    data = load_data(args)
    if not args.quiet:
        print(data.describe())
    report = run_vision_compare(config, data, variants=variants, out_dir=args.out, progress=not args.quiet)
    print((report / "summary.md").read_text())
    print(f"report: {report / 'summary.md'} (plots beside it)")
    return 0
