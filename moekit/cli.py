"""The `moekit` command line: parse arguments, build a config, call the library.

Each subcommand lives in `moekit/commands/<name>.py` with `add_arguments(parser)` and `run(args)`;
command modules import torch and the library inside those functions, so `moekit --help` loads
neither. Only the chosen subcommand's arguments are built.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from moekit.commands import (
    analyze,
    cache_sim,
    catalog,
    compare,
    convert,
    data,
    demo,
    generate,
    inspect,
    prune,
    serve,
    sweep,
    train,
)

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "demo": (demo, "route a random batch with every router and print routing statistics"),
    "data": (data, "fetch a data set (Shakespeare, Fashion-MNIST, Census-Income), sha256-pinned"),
    "train": (train, "train a preset MoE language model on a corpus (resumable)"),
    "compare": (compare, "train dense vs MoE variants at equal active compute; write a report"),
    "sweep": (sweep, "validation loss vs number of experts at equal active compute, over seeds"),
    "convert": (convert, "convert a checkpoint between Hugging Face and moekit layouts, dtypes"),
    "catalog": (catalog, "list the famous MoE architectures: parameters, experts, FLOPs, memory"),
    "inspect": (inspect, "show one catalog architecture layer by layer, or a checkpoint directory"),
    "generate": (generate, "generate text from a model directory, streamed, with tokens/s"),
    "serve": (serve, "serve a model over an OpenAI-compatible HTTP API (continuous batching)"),
    "analyze": (analyze, "what do the experts do? specialization, locality, knock-out; pictures"),
    "prune": (prune, "remove the least-used experts (optionally merging them); report the loss"),
    "cache-sim": (cache_sim, "replay a routing trace against the expert-cache policies: hit rate, bytes per token"),
}
# What a user can get wrong and the CLI reports in one line (exit 2). Anything else is a defect and
# keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
               IsADirectoryError, PermissionError)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser. With `only`, just that subcommand gets its arguments (the others keep their
    one-line help), so parsing imports no more than the command that runs."""
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(only=chosen).parse_args(argv)
    module = COMMANDS[args.command][0]
    try:
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
