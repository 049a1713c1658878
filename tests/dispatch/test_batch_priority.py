"""Batch prioritized routing (V-MoE): hand-worked tables and the slot-walking reference."""

from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig
from moekit.dispatch.capacity import apply_capacity
from moekit.layer import MoELayer
from moekit.types import RoutingDecision
from tests.reference.topk import reference_capacity


def decision(ids: list[list[int]], weights: list[list[float]], E: int) -> RoutingDecision:
    ids_TK = torch.tensor(ids)
    T = ids_TK.shape[0]
    return RoutingDecision(ids_TK, torch.tensor(weights), torch.zeros(T, E), torch.full((T, E), 1 / E),
                           torch.bincount(ids_TK.flatten(), minlength=E))


def test_lowest_scores_drop_first_top1() -> None:
    # Five patches all routed to expert 0 (capacity 2) except token 3. Position order would keep
    # tokens 0 and 1; BPR keeps the two highest scores, tokens 4 (0.95) and 0 (0.9).
    d = decision([[0], [0], [0], [1], [0]], [[0.9], [0.2], [0.7], [0.6], [0.95]], E=2)
    out = apply_capacity(d, capacity=2, policy="batch_priority")
    assert out.expert_ids_TK.flatten().tolist() == [0, -1, -1, 1, 0]
    assert out.dropped_TK.flatten().tolist() == [False, True, True, False, False]
    assert out.weights_TK.flatten().tolist() == pytest.approx([0.9, 0.0, 0.0, 0.6, 0.95])
    assert out.counts_E.tolist() == [2, 1]


def test_first_choices_still_before_second_choices() -> None:
    # Expert 1, capacity 2. Token 0 sends its SECOND choice there, and its top weight (0.55) is the
    # batch's highest; tokens 1, 2, 3 send their FIRST choices there (0.5, 0.52, 0.51).
    ids = [[0, 1], [1, 0], [1, 2], [1, 2]]
    weights = [[0.55, 0.45], [0.5, 0.3], [0.52, 0.4], [0.51, 0.49]]
    out = apply_capacity(decision(ids, weights, E=3), capacity=2, policy="batch_priority")
    # Priorities: token 0 (0.55) > 2 (0.52) > 3 (0.51) > 1 (0.5). First choices on expert 1: tokens
    # 2 and 3 are kept, token 1 is dropped; token 0's second choice on expert 1 comes too late.
    assert out.expert_ids_TK.tolist() == [[0, -1], [-1, 0], [1, 2], [1, 2]]
    position = apply_capacity(decision(ids, weights, E=3), capacity=2, policy="position")
    assert position.expert_ids_TK.tolist() == [[0, -1], [1, 0], [1, 2], [-1, 2]]


@pytest.mark.parametrize("T,K,E,cap", [(1, 1, 4, 1), (17, 2, 4, 3), (40, 3, 8, 5), (9, 2, 16, 1)])
def test_matches_reference(T: int, K: int, E: int, cap: int) -> None:
    g = torch.Generator().manual_seed(T * 100 + E + 7)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w_TK = torch.rand(T, K, generator=g)
    out = apply_capacity(decision(ids_TK.tolist(), w_TK.tolist(), E), capacity=cap, policy="batch_priority")
    assert torch.equal(out.expert_ids_TK >= 0, reference_capacity(ids_TK, w_TK, cap, "batch_priority"))


def test_layer_drops_low_score_tokens_across_the_batch() -> None:
    # A layer with BPR: across a batch of 2 sequences, the kept tokens of an overflowing expert are
    # exactly those with the highest routing weight, wherever they sit in the batch.
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=2, top_k=1, capacity_factor=0.5,
                    drop_policy="batch_priority", activation="gelu")
    layer = MoELayer(cfg)
    x = torch.randn(2, 6, 8)
    d = layer(x).decision
    selected, kept, w = d.selection_TK[:, 0], d.expert_ids_TK[:, 0], d.weights_TK[:, 0]
    full = layer.router(x.reshape(-1, 8)).weights_TK[:, 0]
    for e in range(2):
        mine = selected == e
        if mine.sum() > int((kept == e).sum()):
            kept_scores, dropped = full[mine & (kept == e)], full[mine & (kept < 0)]
            assert kept_scores.min() >= dropped.max()
    assert torch.equal(w[kept >= 0], full[kept >= 0])


def test_config_accepts_batch_priority_and_rejects_others() -> None:
    MoEConfig(d_model=4, d_ff=4, num_experts=2, capacity_factor=1.0, drop_policy="batch_priority")
    with pytest.raises(ValueError, match="drop_policy"):
        MoEConfig(d_model=4, d_ff=4, num_experts=2, drop_policy="bpr")
