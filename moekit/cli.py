"""The `moekit` command line: parse arguments, build a config, call the library.

Each subcommand lives in `moekit/commands/<name>.py` with `add_arguments(parser)` and `run(args)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("moekit.commands.demo", "route a random batch with every router and print routing statistics"),
    "data": ("moekit.commands.data", "fetch the built-in Shakespeare training corpus (sha256-pinned)"),
    "train": ("moekit.commands.train", "train a preset MoE language model on a corpus (resumable)"),
    "compare": ("moekit.commands.compare", "train dense vs MoE variants at equal active compute; write a report"),
    "convert": ("moekit.commands.convert", "convert a checkpoint between Hugging Face and moekit layouts, dtypes"),
    "catalog": ("moekit.commands.catalog", "list the famous MoE architectures: parameters, experts, FLOPs, memory"),
    "inspect": ("moekit.commands.inspect", "show one catalog architecture layer by layer with parameter counts"),
    "analyze": ("moekit.commands.analyze", "what do the experts do? specialization, locality, knock-out; pictures"),
    "prune": ("moekit.commands.prune", "remove the least-used experts (optionally merging them); report the loss"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Mixture-of-Experts toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
