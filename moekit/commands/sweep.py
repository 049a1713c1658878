"""`moekit sweep`: validation loss against the number of experts at identical active compute."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moekit.train.sweep import SweepConfig

AXES = ("experts", "top_k", "granularity", "shared", "seeds")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from moekit.train.data import SPLIT_HELP
    from moekit.train.sweep import SWEEP_TRAIN_FLAGS, SweepConfig

    defaults = SweepConfig()
    p.add_argument("--out", type=Path, default=Path("runs/sweep"),
                   help="output folder (default runs/sweep); rerunning resumes unfinished runs")
    p.add_argument("--experts", type=int, nargs="+", default=None, metavar="E",
                   help=f"experts per MoE layer at each point; 1 is the dense model (default "
                        f"{' '.join(map(str, defaults.experts))})")
    p.add_argument("--top-k", type=int, nargs="+", default=None, metavar="K",
                   help="experts per token, each active_d_ff / K wide, so the active width stays "
                        f"active_d_ff (default {' '.join(map(str, defaults.top_k))}); points with K >= E are skipped")
    p.add_argument("--granularity", type=int, nargs="+", default=None, metavar="G",
                   help="split each expert into G experts G x narrower, routing to G x top-k "
                        f"(DeepSeekMoE fine-grained experts; default {' '.join(map(str, defaults.granularity))})")
    p.add_argument("--shared", type=int, nargs="+", default=None, choices=(0, 1), metavar="S",
                   help="1: one of each point's top-k x granularity active experts is a shared expert every "
                        "token uses, the others routed (DeepSeekMoE); 0 1 runs both (default 0); needs "
                        "top-k x granularity >= 2")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help=f"every point trains once per seed (default {' '.join(map(str, defaults.seeds))})")
    p.add_argument("--balance", choices=("topk_lb", "aux_free"), default=None,
                   help="topk_lb: softmax top-k + load-balancing loss (default); aux_free: sigmoid scores "
                        "+ aux-loss-free expert bias (DeepSeek-V3)")
    p.add_argument("--corpus", type=Path, default=None,
                   help="folder or file of UTF-8 text (default: Shakespeare, fetched on demand); "
                        + SPLIT_HELP.replace("%", "%%"))
    p.add_argument("--cache-dir", type=Path, default=None, help="Shakespeare cache folder")
    for f in fields(SweepConfig):
        if f.name not in (*AXES, "train", "balance"):
            _flag(p, f.name, getattr(defaults, f.name))
    for name in SWEEP_TRAIN_FLAGS:
        _flag(p, name, getattr(defaults.train, name))
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own, all cores)")


HELP = {"eval_sequences": "validation sequences, a fixed sample evenly spaced over the held-out set; "
                         "0: the whole held-out set",
        "router_lr_mult": "the MoE routers' weight matrices train at the peak lr x this",
        "bias_update_schedule": "the aux-loss-free bias step: constant (the bias update rate every step) "
                                "or lr (that rate x the step's lr / the peak lr)",
        "lr": "peak learning rate of every MoE point (compare's tuned MoE rate)",
        "dense_lr": "peak learning rate of the dense point, E = 1 (compare's tuned dense rate)"}


def _flag(p: argparse.ArgumentParser, name: str, default: object) -> None:
    what = f"{HELP[name]} " if name in HELP else ""
    p.add_argument("--" + name.replace("_", "-"), type=type(default), default=None, help=f"{what}(default {default})")


def sweep_config(args: argparse.Namespace) -> SweepConfig:
    """The SweepConfig the flags describe: the defaults with each given flag applied."""
    from moekit.train.sweep import SWEEP_TRAIN_FLAGS, SweepConfig

    defaults = SweepConfig()
    shape = {f.name: getattr(args, f.name) for f in fields(SweepConfig)
             if f.name not in (*AXES, "train") and getattr(args, f.name) is not None}
    axes = {name: tuple(getattr(args, name)) for name in AXES if getattr(args, name) is not None}
    train = replace(defaults.train, **{k: getattr(args, k) for k in SWEEP_TRAIN_FLAGS
                                       if getattr(args, k) is not None})
    return replace(defaults, **shape, **axes, train=train)


def run(args: argparse.Namespace) -> int:
    from moekit.hf.io import check_not_a_file
    from moekit.tasks import set_threads
    from moekit.train.data import ensure_default_corpus
    from moekit.train.runfolder import StorageError
    from moekit.train.sweep import run_sweep
    from moekit.train.tokenizer import check_vocab_size
    from moekit.train.trainer import NonFiniteLossError

    set_threads(args.threads)
    if args.vocab_size is not None:
        check_vocab_size(args.vocab_size, "--vocab-size")
    check_not_a_file(args.out, "--out")
    config = sweep_config(args)
    ensure_default_corpus(args.corpus, args.cache_dir)
    try:
        report = run_sweep(config, out_dir=args.out, corpus=args.corpus, cache_dir=args.cache_dir,
                           progress=not args.quiet)
    except (NonFiniteLossError, StorageError) as err:
        raise ValueError(str(err)) from err
    except KeyboardInterrupt as stop:
        print(f"\n{stop or 'interrupted'}")
        return 130
    print((report / "summary.md").read_text())
    print(f"report: {report / 'summary.md'} (sweep.png beside it)")
    return 0
