"""`moekit compare`: dense vs MoE variants at equal active compute on one corpus; writes a report."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moekit.train.compare import CompareConfig

from moekit.tasks import add_task_arguments, run_task, set_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.train.compare import DEFAULT_VARIANTS, TRAIN_FLAGS, VARIANTS, CompareConfig

    p.add_argument("--out", type=Path, default=Path("runs/compare"),
                   help="output folder (default runs/compare); rerunning resumes unfinished variants")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="NAME",
                   help=f"variants to train (default {' '.join(DEFAULT_VARIANTS)}); any of "
                        f"{', '.join(VARIANTS)}")
    from moekit.train.data import SPLIT_HELP

    p.add_argument("--corpus", type=Path, default=None,
                   help="folder or file of UTF-8 text (default: Shakespeare, fetched on demand); "
                        + SPLIT_HELP.replace("%", "%%"))
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="train every variant at each of these seeds and report means and spreads "
                        "(default: --seed alone); runs/NAME holds --seed's run, runs/NAME.seedN the others")
    p.add_argument("--cache-dir", type=Path, default=None, help="Shakespeare cache folder")
    p.add_argument("--expert-parallel", type=int, default=None, metavar="EP",
                   help="under torchrun: shard each MoE variant's experts over EP ranks "
                        "(data over all ranks)")
    defaults = CompareConfig()
    for f in fields(CompareConfig):
        if f.name not in ("train", "variant_lr", "load_balance_granularity"):
            _flag(p, f.name, getattr(defaults, f.name))
    p.add_argument("--load-balance-granularity", choices=("micro_batch", "sequence", "global"), default=None,
                   help="the balance loss per micro-batch, per sequence (DeepSeek-V3) or over the global "
                        f"batch (default {defaults.load_balance_granularity})")
    p.add_argument("--variant-lr", nargs="+", default=None, metavar="NAME=LR",
                   help="peak learning rate of these variants (the others train at --lr; a variant's "
                        "default here is kept unless named), e.g. --variant-lr dense=0.006 topk_lb=0.006" + (
                            "; default " + " ".join(f"{n}={lr:g}" for n, lr in defaults.variant_lr)
                            if defaults.variant_lr else ""))
    for name in TRAIN_FLAGS:
        _flag(p, name, getattr(defaults.train, name))
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_task_arguments(p, "compare")


HELP = {"eval_sequences": "validation sequences, a fixed sample evenly spaced over the held-out set; "
                         "0: the whole held-out set",
        "router_lr_mult": "the MoE routers' weight matrices train at the peak lr x this",
        "bias_update_schedule": "the aux-loss-free bias step: constant (the bias update rate every step) "
                                "or lr (that rate x the step's lr / the peak lr)",
        "aux_free_balance_coef": "aux-loss-free variants' complementary sequence-wise balance loss "
                                 "(DeepSeek-V3's alpha, 1e-4 there; 0: none)",
        "z_loss_coef": "ST-MoE router z-loss on every MoE variant",
        "routed_scaling_factor": "multiplies the combine weights of the variants whose router weights its "
                                 "experts (DeepSeek-V3's routed scaling; top-k: k x each weight)",
        "load_balance_coef": "the load-balancing loss of the variants that use one"}


def _flag(p: argparse.ArgumentParser, name: str, default: object) -> None:
    what = f"{HELP[name]} " if name in HELP else ""
    p.add_argument("--" + name.replace("_", "-"), type=type(default), default=None, help=f"{what}(default {default})")


def compare_config(args: argparse.Namespace) -> CompareConfig:
    """The CompareConfig the flags describe: the defaults with each given flag applied."""
    from moekit.train.compare import TRAIN_FLAGS, CompareConfig

    shape = {f.name: getattr(args, f.name) for f in fields(CompareConfig)
             if f.name not in ("train", "variant_lr") and getattr(args, f.name) is not None}
    defaults = CompareConfig()
    given = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    train = replace(defaults.train, **given)
    config = replace(defaults, **shape, train=train)
    return config.with_variant_lr(parse_variant_lr(args.variant_lr)) if args.variant_lr is not None else config


def parse_variant_lr(items: list[str]) -> tuple[tuple[str, float], ...]:
    """`NAME=LR` items as (name, lr) pairs; a ValueError names an item that is not of that form."""
    pairs = []
    for item in items:
        name, sep, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = None
        if not sep or lr is None:
            raise ValueError(f"--variant-lr {item!r} is invalid: write NAME=LR, e.g. dense=0.006")
        pairs.append((name, lr))
    return tuple(pairs)


def run(args: argparse.Namespace) -> int:
    from moekit.hf.io import check_not_a_file
    from moekit.parallel import check_launch, init_from_environment, shutdown
    from moekit.train.compare import TRAIN_FLAGS, CompareConfig, check_variants, model_config, run_compare
    from moekit.train.data import ensure_default_corpus
    from moekit.train.runfolder import StorageError
    from moekit.train.series import check_seeds
    from moekit.train.tokenizer import check_vocab_size
    from moekit.train.trainer import NonFiniteLossError

    if args.task != "lm":
        shared = [f.name for f in fields(CompareConfig) if f.name != "train"] + list(TRAIN_FLAGS)
        return run_task(args, "compare", shared)
    set_threads(args.threads)
    check_variants(args.variants)
    if args.seeds is not None:
        check_seeds(args.seeds)
    if args.vocab_size is not None:
        check_vocab_size(args.vocab_size, "--vocab-size")
    check_not_a_file(args.out, "--out")
    config = compare_config(args)
    configs = [model_config(name, config) for name in args.variants]
    moe = [mc.moe.num_experts for mc in configs if mc.moe is not None]
    for num_experts in sorted(set(moe)) or [None]:
        check_launch(expert_parallel=args.expert_parallel, num_experts=num_experts,
                     batch_size=config.train.batch_size)
    parallel, _ = init_from_environment(expert_parallel=args.expert_parallel, device="cpu")
    say = print if parallel.is_writer else (lambda *a, **k: None)
    try:
        parallel.on_writer(lambda: ensure_default_corpus(args.corpus, args.cache_dir))
        try:
            report = run_compare(config, variants=args.variants, out_dir=args.out, corpus=args.corpus,
                                 cache_dir=args.cache_dir, progress=not args.quiet, parallel=parallel,
                                 seeds=args.seeds)
        except (NonFiniteLossError, StorageError) as err:
            raise ValueError(str(err)) from err
        except KeyboardInterrupt as stop:
            say(f"\n{stop or 'interrupted'}")
            return 130
    finally:
        shutdown()
    say((report / "summary.md").read_text())
    say(f"report: {report / 'summary.md'} (plots beside it)")
    return 0
