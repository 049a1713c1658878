"""Routing statistics on hand-built decisions."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.analysis.stats import routing_stats
from moekit.types import RoutingDecision


def test_balanced_uniform_decision() -> None:
    ids_TK = torch.tensor([[0], [1], [2], [3]])
    d = RoutingDecision(ids_TK, torch.ones(4, 1), torch.zeros(4, 4), torch.full((4, 4), 0.25),
                        torch.tensor([1, 1, 1, 1]))
    s = routing_stats(d)
    assert s["tokens_per_expert"] == [1, 1, 1, 1]
    assert s["max_vio"] == pytest.approx(0.0)
    assert s["dropped_fraction"] == 0.0
    assert s["router_entropy"] == pytest.approx(math.log(4))
    assert s["router_entropy_normalized"] == pytest.approx(1.0)


def test_skewed_decision_with_drops_and_padding() -> None:
    ids_TK = torch.tensor([[0], [0], [-1], [1]])
    selected = torch.tensor([[0], [0], [0], [1]])
    dropped = torch.tensor([[False], [False], [True], [False]])
    probs = torch.tensor([[1.0, 0.0]] * 3 + [[0.5, 0.5]])
    d = RoutingDecision(ids_TK, torch.ones(4, 1), torch.zeros(4, 2), probs, torch.tensor([2, 1]),
                        dropped_TK=dropped, selected_TK=selected)
    s = routing_stats(d)
    assert s["dropped_fraction"] == pytest.approx(0.25)
    assert s["max_vio"] == pytest.approx(2 / 1.5 - 1)
    assert s["max_over_mean"] == pytest.approx(2 / 1.5)
    assert s["router_entropy"] == pytest.approx(math.log(2) / 4)
    masked = routing_stats(d, mask_T=torch.tensor([True, True, False, True]))
    assert masked["dropped_fraction"] == 0.0
    assert masked["router_entropy"] == pytest.approx(math.log(2) / 3)
