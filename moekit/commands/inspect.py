"""`moekit inspect NAME`: one catalog architecture layer by layer, with parameter counts.

The argument is a catalog name or alias; an existing directory is treated as a checkpoint (handled
by `inspect_checkpoint`, which the checkpoint loader extends).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.model import catalog
from moekit.model.accounting import human


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a catalog name or alias (see `moekit catalog`), or a checkpoint directory")


def run(args: argparse.Namespace) -> int:
    if Path(args.target).is_dir():
        return inspect_checkpoint(Path(args.target))
    return inspect_preset(catalog.get(args.target))


def inspect_checkpoint(path: Path) -> int:
    raise ValueError(f"{path} is a directory; inspecting checkpoint directories is not supported yet. "
                     "Give a catalog name (see `moekit catalog`).")


def inspect_preset(preset: catalog.Preset) -> int:
    from rich.console import Console
    from rich.table import Table

    model = preset.build()
    info = preset.info(model)
    table = Table(title=f"{preset.name}" + (f"  ({preset.hf_id})" if preset.hf_id else ""))
    for col in ("module", "kind", "params", "active"):
        table.add_column(col, justify="right" if col in ("params", "active") else "left")
    for row in preset.layer_table(model):
        table.add_row(row["name"], row["kind"], f"{row['params']:,}", f"{row['active']:,}")
    table.add_row("total", "", f"{info['total_params']:,}", f"{info['active_params']:,}", style="bold")
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # piped output: do not squeeze the table into 80 columns
    console.print(table)
    ex, mem = info["experts"], info["weight_bytes"]
    console.print(
        f"total {human(info['total_params'])}, active {human(info['active_params'])} per token "
        f"({human(info['active_params_no_embedding'])} without embedding and LM head); experts: "
        f"{ex['routed']} routed, top-{ex['top_k']}, {ex['shared']} shared; context {info['context']:,}; "
        f"{info['flops_per_token'] / 1e9:.1f} GFLOP/token; weights {human(mem['bf16'], 'B')} bf16, "
        f"{human(mem['int8'], 'B')} int8, {human(mem['int4'], 'B')} 4-bit")
    if preset.notes:
        console.print(f"notes: {preset.notes}")
    return 0
