"""`moekit catalog`: every preset architecture with its parameters, experts, layers, FLOPs and memory."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("names", nargs="*", help="presets to show (names or aliases; default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON list of objects instead of a table")


def run(args: argparse.Namespace) -> int:
    from moekit.model import catalog
    from moekit.model.accounting import human

    presets = [catalog.get(n) for n in args.names] if args.names else list(catalog.PRESETS.values())
    infos = [p.info() for p in presets]
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="moekit catalog (parameter counts from the meta-device build)")
    columns = ("name", "total", "active", "active w/o emb", "experts", "layers", "context", "GFLOP/tok",
               "bf16", "int8", "4-bit")
    for col in columns:
        table.add_column(col, justify="left" if col in ("name", "experts", "layers") else "right")
    for info in infos:
        ex, ly = info["experts"], info["layers"]
        experts = f"{ex['routed']} top-{ex['top_k']}" + (f" +{ex['shared']} shared" if ex["shared"] else "")
        layers = f"{ly['moe']} MoE / {ly['dense']} dense"
        if ly["mamba"]:
            layers += f", {ly['attention']} attn / {ly['mamba']} Mamba"
        mem = info["weight_bytes"]
        table.add_row(info["name"], human(info["total_params"]), human(info["active_params"]),
                      human(info["active_params_no_embedding"]), experts, layers, f"{info['context']:,}",
                      f"{info['flops_per_token'] / 1e9:.1f}",
                      *(human(mem[k], "B") for k in ("bf16", "int8", "int4")))
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)  # piped output: do not squeeze the table into 80 columns
    console.print(table)
    console.print("active = parameters one token uses, counting the embedding and LM head; 'w/o emb' "
                  "leaves both out. GFLOP/tok = forward, 2 x active matmul weights + LM head + attention "
                  f"over min(window, {catalog.FLOPS_CONTEXT}) keys. Memory = weights only.")
    return 0
