"""Slow per-token reference of token-choice top-k routing and of capacity dropping."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reference_topk(
    logits_TE: Tensor,
    *,
    top_k: int,
    score_func: str = "softmax",
    softmax_after_topk: bool = False,
    normalize_topk: bool = True,
    routed_scaling_factor: float = 1.0,
    bias_E: Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str = "max",
) -> tuple[Tensor, Tensor]:
    """One token at a time, with Python lists: ids (T, K) long and weights (T, K) float32."""
    T, E = logits_TE.shape
    ids_rows, weight_rows = [], []
    for t in range(T):
        logits = [float(v) for v in logits_TE[t]]
        if score_func == "softmax":
            m = max(logits)
            ex = [math.exp(v - m) for v in logits]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        select = [s + (0.0 if bias_E is None else float(bias_E[e])) for e, s in enumerate(scores)]
        allowed = list(range(E))
        if num_groups is not None and topk_groups is not None and topk_groups < num_groups:
            size = E // num_groups
            group_vals = []
            for g in range(num_groups):
                members = sorted(select[g * size:(g + 1) * size], reverse=True)
                group_vals.append(members[0] if group_score == "max" else members[0] + members[1])
            best_groups = sorted(range(num_groups), key=lambda g: (-group_vals[g], g))[:topk_groups]
            allowed = [e for e in range(E) if e // size in best_groups]
        chosen = sorted(allowed, key=lambda e: (-select[e], e))[:top_k]
        if softmax_after_topk:
            m = max(logits[e] for e in chosen)
            ex = [math.exp(logits[e] - m) for e in chosen]
            w = [v / sum(ex) for v in ex]
        else:
            w = [scores[e] for e in chosen]
            if normalize_topk:
                w = [v / sum(w) for v in w]
        ids_rows.append(chosen)
        weight_rows.append([v * routed_scaling_factor for v in w])
    return torch.tensor(ids_rows, dtype=torch.long), torch.tensor(weight_rows, dtype=torch.float32)


def reference_capacity(ids_TK: Tensor, weights_TK: Tensor, capacity: int, policy: str) -> Tensor:
    """Kept-slot mask by walking the slots in priority order and counting per expert."""
    T, K = ids_TK.shape
    slots = [(k, t) for k in range(K) for t in range(T)]  # first choices of all tokens first
    if policy == "score":
        slots = sorted(slots, key=lambda s: -float(weights_TK[s[1], s[0]]))
    elif policy == "batch_priority":  # choice by choice; tokens by their largest weight (stable)
        slots = sorted(slots, key=lambda s: (s[0], -float(weights_TK[s[1]].max())))
    used: dict[int, int] = {}
    keep = torch.zeros(T, K, dtype=torch.bool)
    for k, t in slots:
        e = int(ids_TK[t, k])
        if e < 0:
            continue
        if used.get(e, 0) < capacity:
            used[e] = used.get(e, 0) + 1
            keep[t, k] = True
    return keep
