"""`moekit inspect NAME`: one catalog architecture layer by layer, with parameter counts.

The argument is a catalog name or alias; an existing directory is treated as a checkpoint (handled
by `inspect_checkpoint`, which the checkpoint loader extends).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moekit.model.catalog import Preset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a catalog name or alias (see `moekit catalog`), or a checkpoint directory")


def run(args: argparse.Namespace) -> int:
    from moekit.model import catalog

    if Path(args.target).is_dir():
        return inspect_checkpoint(Path(args.target))
    return inspect_preset(catalog.get(args.target))


def inspect_checkpoint(path: Path) -> int:
    """Print a checkpoint directory's model_type, config summary, shards and tensors (headers only)."""
    from rich.console import Console
    from rich.table import Table

    from moekit.hf.inspect import checkpoint_summary
    from moekit.model.accounting import human

    s = checkpoint_summary(path)
    console = Console() if Console().is_terminal else Console(width=220)
    console.print(f"{s['path']}: {s['format']} checkpoint, model_type={s['model_type']}, "
                  f"experts {s['expert_layout']}")
    if isinstance(s["config"], dict):
        console.print("config: " + ", ".join(f"{k}={human(v) if k.endswith('params') else v}"
                                              for k, v in s["config"].items()))
    else:
        console.print(f"config: {s['config']}")
    shards = Table(title=f"{s['tensors']} tensors in {len(s['shards'])} file(s), {human(s['total_bytes'], 'B')}, "
                         + ", ".join(f"{n} {d}" for d, n in s["dtypes"].items()))
    for col in ("file", "tensors", "size"):
        shards.add_column(col, justify="left" if col == "file" else "right")
    for sh in s["shards"]:
        shards.add_row(sh["file"], str(sh["tensors"]), human(sh["bytes"], "B"))
    console.print(shards)
    sample = Table(title=f"first {len(s['sample'])} tensors by name")
    for col in ("tensor", "shape", "dtype"):
        sample.add_column(col)
    for name, shape, dtype in s["sample"]:
        sample.add_row(name, str(tuple(shape)), dtype)
    console.print(sample)
    return 0


def inspect_preset(preset: Preset) -> int:
    from rich.console import Console
    from rich.table import Table

    from moekit.model.accounting import human

    model = preset.build()
    info = preset.info(model)
    table = Table(title=f"{preset.name}" + (f"  ({preset.hf_id})" if preset.hf_id else ""))
    for col in ("module", "kind", "params", "active", "mixer", "feed-forward"):
        table.add_column(col, justify="left" if col in ("module", "kind") else "right")

    def fmt(n: int | None) -> str:
        return "" if n is None else f"{n:,}"

    for row in preset.layer_table(model):
        table.add_row(row["name"], row["kind"], fmt(row["params"]), fmt(row["active"]),
                      fmt(row.get("mixer_params")), fmt(row.get("ffn_params")))
    table.add_row("total", "", fmt(info["total_params"]), fmt(info["active_params"]), "", "", style="bold")
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
