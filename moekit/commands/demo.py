"""`moekit demo`: route one random batch through an MoE layer with each router, print statistics.

Every router of moekit/traits.py's table gets a row (plus two token-choice variants), so a new
router shows up here by its table row alone. Imports torch only when it runs.
"""

from __future__ import annotations

import argparse

from moekit.traits import ROUTER_TRAITS

# Named token-choice variants shown beside the plain routers.
VARIANTS: dict[str, dict] = {
    "topk sigmoid+bias": dict(router="topk", score_func="sigmoid", expert_bias=True),
    "switch (cap 1.0)": dict(router="topk", top_k=1, capacity_factor=1.0, normalize_topk=False),
}


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: must be >= 1")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=_at_least_one, default=512, help="tokens in the batch (>= 1, default 512)")
    p.add_argument("--d-model", type=_at_least_one, default=64)
    p.add_argument("--experts", type=_at_least_one, default=8)
    p.add_argument("--top-k", type=_at_least_one, default=2, help="experts per token (<= --experts)")
    p.add_argument("--seed", type=int, default=0)


def demo_configs(args: argparse.Namespace) -> dict:
    """Row name -> MoEConfig: one row per router in ROUTER_TRAITS, then the named variants."""
    from moekit.config import MoEConfig

    if args.top_k > args.experts:
        raise ValueError(f"--top-k {args.top_k} is invalid: must be <= --experts ({args.experts})")
    base = dict(d_model=args.d_model, d_ff=2 * args.d_model, num_experts=args.experts, top_k=args.top_k,
                z_loss_coef=1e-3)
    rows = {name: dict(router=name, **traits.demo) for name, traits in ROUTER_TRAITS.items()}
    rows.update(VARIANTS)
    return {name: MoEConfig(**{**base, **v}) for name, v in rows.items()}


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from moekit.analysis.stats import routing_stats
    from moekit.soft_layer import make_moe_layer

    configs = demo_configs(args)
    torch.manual_seed(args.seed)
    # Tokens from a few clusters, so that an untrained gate routes unevenly and the routers differ.
    centers_CD = 2.0 * torch.randn(4, args.d_model)
    x_TD = torch.randn(args.tokens, args.d_model) + centers_CD[torch.randint(0, 4, (args.tokens,))]
    token_ids_T = torch.randint(0, 1000, (args.tokens,))
    table = Table(title=f"{args.tokens} clustered random tokens, {args.experts} experts, top-{args.top_k}")
    for col in ("router", "load min/mean/max", "dropped", "MaxVio", "entropy", "balance", "z"):
        table.add_column(col, justify="left" if col == "router" else "right", no_wrap=True)
    for name, cfg in configs.items():
        layer = make_moe_layer(cfg).train()  # training mode: Sinkhorn balances only when training
        with torch.no_grad():
            out = layer(x_TD, token_ids=token_ids_T)
        s = routing_stats(out.decision)
        load = s["tokens_per_expert"]
        losses = [f"{float(out.aux_losses[k]):.3f}" if k in out.aux_losses else "-" for k in ("load_balance", "z")]
        table.add_row(name, f"{min(load)}/{sum(load) / len(load):.0f}/{max(load)}",
                      f"{s['dropped_fraction']:.1%}", f"{s['max_vio']:.2f}",
                      f"{s['router_entropy_normalized']:.2f}", *losses)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # a pipe or a file: do not squeeze the table into 80 columns
    console.print(table)
    print("load: token slots per expert; MaxVio: max load / mean load - 1; entropy: router entropy / log(E);\n"
          "balance: Switch load-balancing loss (1 = uniform); z: router z-loss")
    return 0
