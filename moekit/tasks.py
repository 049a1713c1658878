"""`--task vision|multitask` of `moekit train` and `moekit compare`: flags, parsing, routing.

The language model stays the default task (`--task lm`). Other tasks take their settings from the
flags they share with the language-model commands (--steps, --lr, --seed, --num-experts, ...), by
name, and from `--set FIELD=VALUE` for fields of their own config (e.g. `--set patch_size=4`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TASKS = ("lm", "vision", "multitask")


def add_task_arguments(p: argparse.ArgumentParser, command: str) -> None:
    """The flags `--task`, `--data`, `--set` (and for `train`, `--variant`)."""
    p.add_argument("--task", choices=TASKS, default="lm",
                   help="lm (default: a language model), vision (ViT-MoE on IDX images) or multitask "
                        "(multi-gate MoE on Census-Income)")
    p.add_argument("--data", type=Path, default=None,
                   help="vision: a folder with the four IDX files (default: fetched Fashion-MNIST); "
                        "multitask: a folder with the Census-Income CSVs (default: fetched census-income)")
    p.add_argument("--set", dest="task_set", action="append", default=[], metavar="FIELD=VALUE",
                   help="vision/multitask: set a field of the task's config (repeatable)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: vision/multitask 1, since these small models run "
                        "several times faster on one thread than on threads that share busy cores; "
                        "language models torch's own default)")
    if command == "train":
        p.add_argument("--variant", default=None,
                       help="vision/multitask: which model to train (default topk / mmoe)")


def check_threads(threads: int) -> None:
    """Refuse a `--threads` count below 1."""
    if threads < 1:
        raise ValueError(f"--threads {threads}: must be >= 1")


def set_threads(threads: int | None) -> None:
    """Set torch's CPU threads from `--threads` (None: leave them); a count below 1 is refused."""
    if threads is None:
        return
    check_threads(threads)
    import torch

    torch.set_num_threads(threads)


def run_task(args: argparse.Namespace, command: str, shared_flags: list[str]) -> int:
    """Run `moekit <command> --task vision|multitask`."""
    if command == "train" and args.resume:
        raise ValueError(f"--resume is for language-model runs; a --task {args.task} run is short: rerun "
                         f"it into a new --out")
    wanted = 1 if args.threads is None else args.threads
    check_threads(wanted)
    world = os.environ.get("WORLD_SIZE", "1")
    if getattr(args, "expert_parallel", None) is not None or world != "1":
        raise ValueError(f"--task {args.task} runs in one process (got --expert-parallel "
                         f"{getattr(args, 'expert_parallel', None)}, WORLD_SIZE={world}); expert parallelism "
                         f"and torchrun are for --task lm")
    import torch

    if args.task == "vision":
        from moekit.vision import cli
    else:
        from moekit.multitask import cli  # type: ignore[no-redef]
    if command == "compare" and args.out == Path("runs/compare"):  # never mix with the LM comparison
        args.out = Path(f"runs/compare-{args.task}")
    run = cli.train if command == "train" else cli.compare
    threads = torch.get_num_threads()
    torch.set_num_threads(wanted)
    try:
        return run(args, shared_flags)
    finally:
        torch.set_num_threads(threads)
