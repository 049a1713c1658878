"""Balancing losses against hand-computed values, and padding invariance."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import losses


def test_uniform_routing_gives_one() -> None:
    E, T = 4, 8
    probs_TE = torch.full((T, E), 1 / E)
    selected_TK = torch.arange(T).remainder(E)[:, None]
    assert float(losses.load_balance_loss(probs_TE=probs_TE, selected_TK=selected_TK)) == pytest.approx(1.0)


def test_collapse_gives_num_experts() -> None:
    E, T = 8, 5
    probs_TE = torch.zeros(T, E)
    probs_TE[:, 3] = 1.0
    selected_TK = torch.full((T, 1), 3)
    assert float(losses.load_balance_loss(probs_TE=probs_TE, selected_TK=selected_TK)) == pytest.approx(E)


def test_hand_worked_top2() -> None:
    # E=2, T=2, K=2: every token picks both experts -> f = [0.5, 0.5]; P = mean of [0.8,0.2],[0.4,0.6].
    probs_TE = torch.tensor([[0.8, 0.2], [0.4, 0.6]])
    selected_TK = torch.tensor([[0, 1], [1, 0]])
    expected = 2 * (0.5 * 0.6 + 0.5 * 0.4)
    got = losses.load_balance_loss(probs_TE=probs_TE, selected_TK=selected_TK)
    assert float(got) == pytest.approx(expected)


def test_padding_changes_nothing() -> None:
    torch.manual_seed(0)
    T, E = 10, 4
    logits_TE = torch.randn(T, E)
    probs_TE = logits_TE.softmax(-1)
    selected_TK = torch.randint(0, E, (T, 2))
    mask_T = torch.tensor([True] * 6 + [False] * 4)
    # Garbage in the padded rows must not matter.
    probs2 = probs_TE.clone()
    probs2[6:] = torch.tensor([1.0, 0, 0, 0])
    sel2 = selected_TK.clone()
    sel2[6:] = 0
    logits2 = logits_TE.clone()
    logits2[6:] = 100.0
    a = losses.load_balance_loss(probs_TE=probs_TE, selected_TK=selected_TK, mask_T=mask_T)
    b = losses.load_balance_loss(probs_TE=probs2, selected_TK=sel2, mask_T=mask_T)
    c = losses.load_balance_loss(probs_TE=probs_TE[:6], selected_TK=selected_TK[:6])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    za = losses.z_loss(logits_TE=logits_TE, mask_T=mask_T)
    zb = losses.z_loss(logits_TE=logits2, mask_T=mask_T)
    torch.testing.assert_close(za, zb)
    torch.testing.assert_close(za, losses.z_loss(logits_TE=logits_TE[:6]))


def test_sequence_granularity_averages_per_sequence_losses() -> None:
    # Sequence 0 is perfectly balanced (loss 1), sequence 1 collapsed onto expert 0 (loss E=2).
    probs_TE = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0]])
    selected_TK = torch.tensor([[0], [1], [0], [0]])
    seq = losses.load_balance_loss(probs_TE=probs_TE, selected_TK=selected_TK, num_sequences=2,
                                   granularity="sequence")
    assert float(seq) == pytest.approx(1.5)
    micro = losses.load_balance_loss(probs_TE=probs_TE, selected_TK=selected_TK)
    assert float(micro) == pytest.approx(2 * (0.75 * 0.75 + 0.25 * 0.25))


def test_sequence_granularity_checks_layout() -> None:
    with pytest.raises(ValueError, match="num_sequences"):
        losses.load_balance_loss(probs_TE=torch.rand(5, 2), selected_TK=torch.zeros(5, 1, dtype=torch.long),
                                 num_sequences=2, granularity="sequence")


def test_z_loss_hand_computed() -> None:
    logits_TE = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert float(losses.z_loss(logits_TE=logits_TE)) == pytest.approx(expected)


def test_balance_loss_gradient_reaches_probs_only() -> None:
    probs_TE = torch.full((4, 2), 0.5, requires_grad=True)
    selected_TK = torch.tensor([[0], [0], [0], [1]])
    losses.load_balance_loss(probs_TE=probs_TE, selected_TK=selected_TK).backward()
    # dL/dP_e = E * f_e / T: f = [0.75, 0.25]
    torch.testing.assert_close(probs_TE.grad, torch.tensor([[0.375, 0.125]] * 4))


def test_expert_bias_update_sign() -> None:
    new = losses.expert_bias_update(torch.zeros(3), torch.tensor([1, 2, 6]), rate=0.5)
    assert new.tolist() == [0.5, 0.5, -0.5]
