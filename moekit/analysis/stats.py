"""Routing statistics of one decision: load per expert, drops, imbalance, entropy."""

from __future__ import annotations

import math

from torch import Tensor

from moekit.types import RoutingDecision


def routing_stats(decision: RoutingDecision, *, mask_T: Tensor | None = None) -> dict[str, object]:
    """Summary statistics of a routing decision (padded tokens excluded).

    Returns a dict with
        tokens_per_expert: list[int], slots each expert processed (after dropping);
        dropped_fraction: dropped slots / selected slots;
        max_vio: max load / mean load - 1 (MaxVio, Wang et al. 2024; 0 is perfect balance);
        max_over_mean: max load / mean load;
        router_entropy: mean per-token entropy of the router distribution, in nats;
        router_entropy_normalized: the same divided by log(E) (1 = uniform).
    """
    counts_E = decision.counts_E.float()
    E = counts_E.numel()
    mean = counts_E.mean().clamp_min(1e-9)
    selected = (decision.selection_TK >= 0)
    dropped = decision.dropped_TK
    probs_TE = decision.probs_TE.detach().float()
    if mask_T is not None:
        m_T = mask_T.reshape(-1).bool()
        selected = selected[m_T]
        dropped = None if dropped is None else dropped[m_T]
        probs_TE = probs_TE[m_T]
    n_selected = int(selected.sum())
    n_dropped = 0 if dropped is None else int(dropped.sum())
    p = probs_TE / probs_TE.sum(-1, keepdim=True).clamp_min(1e-20)
    entropy = float(-(p * p.clamp_min(1e-20).log()).sum(-1).mean()) if p.shape[0] else 0.0
    return {
        "tokens_per_expert": [int(c) for c in decision.counts_E.tolist()],
        "dropped_fraction": n_dropped / max(n_selected, 1),
        "max_vio": float(counts_E.max() / mean - 1),
        "max_over_mean": float(counts_E.max() / mean),
        "router_entropy": entropy,
        "router_entropy_normalized": entropy / math.log(E) if E > 1 else 0.0,
    }
