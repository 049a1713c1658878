"""Capacity dropping on hand-worked tables and against the slot-walking reference."""

from __future__ import annotations

import pytest
import torch

from moekit.dispatch.capacity import apply_capacity, expert_capacity, keep_within_capacity
from moekit.types import RoutingDecision
from tests.reference.topk import reference_capacity


def decision(ids: list[list[int]], weights: list[list[float]], E: int) -> RoutingDecision:
    ids_TK = torch.tensor(ids)
    T = ids_TK.shape[0]
    return RoutingDecision(ids_TK, torch.tensor(weights), torch.zeros(T, E), torch.full((T, E), 1 / E),
                           torch.bincount(ids_TK.flatten(), minlength=E))


def test_capacity_formula() -> None:
    assert expert_capacity(10, 2, 4, 1.0) == 5
    assert expert_capacity(10, 1, 4, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(3, 1, 64, 0.1) == 1  # never zero


def test_switch_top1_drops_late_tokens() -> None:
    # Tokens 0..4 all want expert 0 (capacity 2): tokens 2, 3, 4 are dropped; expert 1 keeps its token.
    d = decision([[0], [0], [0], [1], [0]], [[0.9], [0.8], [0.7], [0.6], [0.95]], E=2)
    out = apply_capacity(d, capacity=2, policy="position")
    assert out.expert_ids_TK.flatten().tolist() == [0, 0, -1, 1, -1]
    assert out.dropped_TK.flatten().tolist() == [False, False, True, False, True]
    assert out.weights_TK.flatten().tolist() == pytest.approx([0.9, 0.8, 0.0, 0.6, 0.0])
    assert out.counts_E.tolist() == [2, 1]
    assert out.selection_TK.flatten().tolist() == [0, 0, 0, 1, 0]


def test_score_policy_keeps_highest_weights() -> None:
    d = decision([[0], [0], [0], [1], [0]], [[0.9], [0.8], [0.7], [0.6], [0.95]], E=2)
    out = apply_capacity(d, capacity=2, policy="score")
    assert out.expert_ids_TK.flatten().tolist() == [0, -1, -1, 1, 0]


def test_first_choices_have_priority_over_second_choices() -> None:
    # Token 0's second choice is expert 1; tokens 1 and 2 pick expert 1 first. Capacity 2:
    # expert 1 keeps the first choices of tokens 1 and 2 and drops token 0's second choice.
    d = decision([[0, 1], [1, 0], [1, 2]], [[0.5, 0.5]] * 3, E=3)
    out = apply_capacity(d, capacity=2, policy="position")
    assert out.expert_ids_TK.tolist() == [[0, -1], [1, 0], [1, 2]]


@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("T,K,E,cap", [(1, 1, 4, 1), (17, 2, 4, 3), (40, 3, 8, 5), (9, 2, 16, 1)])
def test_matches_reference(policy: str, T: int, K: int, E: int, cap: int) -> None:
    g = torch.Generator().manual_seed(T * 100 + E)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w_TK = torch.rand(T, K, generator=g)
    prio = torch.zeros(T, K) if policy == "position" else -w_TK
    keep = keep_within_capacity(ids_TK, prio, cap)
    assert torch.equal(keep, reference_capacity(ids_TK, w_TK, cap, policy))


def test_unrouted_slots_are_never_kept() -> None:
    ids_TK = torch.tensor([[-1, 0], [0, -1]])
    keep = keep_within_capacity(ids_TK, torch.zeros(2, 2), 5)
    assert keep.tolist() == [[False, True], [True, False]]


def test_unknown_policy() -> None:
    d = decision([[0]], [[1.0]], E=2)
    with pytest.raises(ValueError, match="drop_policy"):
        apply_capacity(d, capacity=1, policy="random")
