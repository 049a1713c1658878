"""Sort dispatcher: rows grouped by expert, dispatch-then-combine with weight 1 is the identity."""

from __future__ import annotations

import pytest
import torch

from moekit.dispatch.sort import SortDispatcher
from moekit.types import RoutingDecision


def make_decision(ids_TK: torch.Tensor, weights_TK: torch.Tensor, E: int) -> RoutingDecision:
    T = ids_TK.shape[0]
    return RoutingDecision(ids_TK, weights_TK, torch.zeros(T, E), torch.zeros(T, E),
                           torch.bincount(ids_TK[ids_TK >= 0], minlength=E))


@pytest.mark.parametrize("T,K,E", [(1, 1, 1), (5, 2, 8), (64, 4, 16), (3, 3, 3)])
def test_rows_sorted_by_expert_and_counted(T: int, K: int, E: int) -> None:
    g = torch.Generator().manual_seed(T + K + E)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    x_TD = torch.randn(T, 6, generator=g)
    x_RD, counts_E, plan = SortDispatcher().dispatch(x_TD, make_decision(ids_TK, torch.ones(T, K), E))
    assert counts_E.tolist() == torch.bincount(ids_TK.flatten(), minlength=E).tolist()
    row_expert_R = torch.repeat_interleave(torch.arange(E), counts_E)
    # Each row is the token it claims to be, and that token did pick the row's expert.
    assert torch.equal(x_RD, x_TD[plan.token_index_R])
    for r in range(x_RD.shape[0]):
        assert int(row_expert_R[r]) in ids_TK[plan.token_index_R[r]].tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_then_combine_is_identity(dtype: torch.dtype) -> None:
    T, K, E = 13, 2, 5
    g = torch.Generator().manual_seed(0)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    x_TD = torch.randn(T, 8, generator=g).to(dtype)
    d = SortDispatcher()
    x_RD, _, plan = d.dispatch(x_TD, make_decision(ids_TK, torch.full((T, K), 1.0 / K), E))
    y_TD = d.combine(x_RD, plan)
    assert y_TD.dtype == dtype
    torch.testing.assert_close(y_TD, x_TD)


def test_unrouted_slots_contribute_nothing() -> None:
    ids_TK = torch.tensor([[0, -1], [-1, -1], [1, 0]])
    w_TK = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.25, 0.75]])
    x_TD = torch.arange(6.0).view(3, 2)
    d = SortDispatcher()
    x_RD, counts_E, plan = d.dispatch(x_TD, make_decision(ids_TK, w_TK, 2))
    assert counts_E.tolist() == [2, 1]
    assert x_RD.shape[0] == 3
    y_TD = d.combine(x_RD, plan)
    torch.testing.assert_close(y_TD, torch.tensor([[0.0, 1.0], [0.0, 0.0], [4.0, 5.0]]))
