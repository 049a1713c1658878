"""Fixed expert capacity with token dropping (GShard, Switch Transformer).

Each expert keeps at most C slots; the rest are dropped (expert id -1, weight 0) and the token
passes through the residual unchanged. Which slots are kept:
    "position": first-choice slots of all tokens before second choices, then token order
                (GShard / Switch);
    "score":    highest router weight first, slot by slot (a second choice of high weight can beat
                a first choice of low weight);
    "batch_priority": V-MoE's batch prioritized routing (Riquelme et al. 2021, sec. 4.1): first
                choices before second choices as in "position", but within each choice rank the
                tokens of the whole batch by their largest routing weight, so that low-score tokens
                (e.g. background patches) are the ones dropped.
The dropped decision is then dispatched by the same sort dispatcher as dropless routing.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.routing.base import counts_from_ids
from moekit.types import RoutingDecision


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * T * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def keep_within_capacity(expert_ids_TK: Tensor, priority_TK: Tensor, capacity: int) -> Tensor:
    """Bool (T, K): slots kept when each expert takes its `capacity` slots of lowest priority value.

    Slots with id -1 are never kept. Ties in priority keep the lower flat slot index (k-major).
    """
    T, K = expert_ids_TK.shape
    ids_S = expert_ids_TK.t().reshape(-1)  # k-major: all first choices, then second choices...
    prio_S = priority_TK.t().reshape(-1)
    by_prio_S = torch.sort(prio_S, stable=True).indices
    ids_by_prio_S = ids_S[by_prio_S]
    # Rank of each slot among the slots of its expert, in priority order.
    by_expert_S = torch.sort(ids_by_prio_S, stable=True).indices
    sorted_ids_S = ids_by_prio_S[by_expert_S]
    first_S = torch.searchsorted(sorted_ids_S, sorted_ids_S, side="left")
    rank_S = torch.arange(ids_S.numel(), device=ids_S.device) - first_S
    keep_sorted_S = (rank_S < capacity) & (sorted_ids_S >= 0)
    keep_S = torch.empty_like(keep_sorted_S)
    keep_S[by_prio_S[by_expert_S]] = keep_sorted_S
    return keep_S.view(K, T).t()


def batch_priority(weights_TK: Tensor) -> Tensor:
    """Priority (lower is kept first) of batch prioritized routing: k * T + the token's rank by its
    largest weight (descending; ties keep token order). Long (T, K)."""
    T, K = weights_TK.shape
    score_T = weights_TK.detach().float().max(dim=1).values
    order_T = torch.sort(-score_T, stable=True).indices
    rank_T = torch.empty_like(order_T)
    rank_T[order_T] = torch.arange(T, device=weights_TK.device)
    return torch.arange(K, device=weights_TK.device)[None, :] * T + rank_T[:, None]


def apply_capacity(
    decision: RoutingDecision, *, capacity: int, policy: str = "position", num_groups: int = 1
) -> RoutingDecision:
    """Drop the slots over each expert's capacity; the result records them in `dropped_TK`.

    num_groups: the T tokens form this many equal contiguous groups (e.g. sequences), and each
    expert has `capacity` slots in every group (GShard groups; Switch Transformers per sequence).
    """
    ids_TK = decision.expert_ids_TK
    T, K = ids_TK.shape
    if policy == "position":
        priority_TK = torch.zeros(T, K, device=ids_TK.device)  # stable sort keeps k-major token order
    elif policy == "score":
        priority_TK = -decision.weights_TK.detach().float()
    elif policy == "batch_priority":
        priority_TK = batch_priority(decision.weights_TK)
    else:
        raise ValueError(f"drop_policy={policy!r} is invalid: must be 'position', 'score' or "
                         f"'batch_priority'")
    if num_groups > 1:
        if T % num_groups:
            raise ValueError(f"{T} tokens do not split into num_groups={num_groups} equal groups")
        # Expert e of group g becomes the virtual expert g * E + e with its own capacity.
        group_T1 = torch.arange(T, device=ids_TK.device)[:, None] // (T // num_groups)
        grouped_TK = torch.where(ids_TK >= 0, ids_TK + group_T1 * decision.num_experts, ids_TK)
        keep_TK = keep_within_capacity(grouped_TK, priority_TK, capacity)
    else:
        keep_TK = keep_within_capacity(ids_TK, priority_TK, capacity)
    dropped_TK = (ids_TK >= 0) & ~keep_TK
    kept_ids_TK = ids_TK.masked_fill(~keep_TK, -1)
    return RoutingDecision(
        expert_ids_TK=kept_ids_TK,
        weights_TK=decision.weights_TK.masked_fill(~keep_TK, 0.0),
        logits_TE=decision.logits_TE,
        probs_TE=decision.probs_TE,
        counts_E=counts_from_ids(kept_ids_TK, decision.num_experts),
        dropped_TK=dropped_TK,
        selected_TK=decision.selection_TK,
    )
