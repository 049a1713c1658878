"""`moekit demo`: route one random batch through an MoE layer with each router, print statistics."""

from __future__ import annotations

import argparse

import torch

from moekit.analysis.stats import routing_stats
from moekit.config import MoEConfig
from moekit.layer import MoELayer
from moekit.routing import ROUTERS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=512, help="tokens in the batch (default 512)")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)


def demo_configs(args: argparse.Namespace) -> dict[str, MoEConfig]:
    base = dict(d_model=args.d_model, d_ff=2 * args.d_model, num_experts=args.experts, top_k=args.top_k)
    variants = {
        "topk (softmax)": dict(router="topk"),
        "topk (sigmoid, DeepSeek-V3)": dict(router="topk", score_func="sigmoid", expert_bias=True),
        "switch top-1, capacity 1.0": dict(router="topk", top_k=1, capacity_factor=1.0),
        "expert_choice": dict(router="expert_choice"),
        "hash": dict(router="hash", hash_vocab_size=1000),
        "sinkhorn": dict(router="sinkhorn"),
        "soft": dict(router="soft"),
    }
    return {name: MoEConfig(**{**base, **v}) for name, v in variants.items() if v["router"] in ROUTERS}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    torch.manual_seed(args.seed)
    x_TD = torch.randn(args.tokens, args.d_model)
    token_ids_T = torch.randint(0, 1000, (args.tokens,))
    table = Table(title=f"{args.tokens} random tokens, {args.experts} experts")
    for col in ("router", "tokens per expert", "dropped", "MaxVio", "entropy", "aux losses"):
        table.add_column(col)
    for name, cfg in demo_configs(args).items():
        layer = MoELayer(cfg).eval()
        with torch.no_grad():
            out = layer(x_TD, token_ids=token_ids_T)
        s = routing_stats(out.decision)
        losses = ", ".join(f"{k}={float(v):.3f}" for k, v in out.aux_losses.items())
        table.add_row(name, " ".join(map(str, s["tokens_per_expert"])), f"{s['dropped_fraction']:.1%}",
                      f"{s['max_vio']:.2f}", f"{s['router_entropy_normalized']:.2f}", losses)
    Console().print(table)
    return 0
