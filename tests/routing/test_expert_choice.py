"""Expert-choice router vs the per-expert reference; exact capacity, padding, ties, replay."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.config import MoEConfig
from moekit.routing.expert_choice import ExpertChoiceRouter, expert_choice_capacity
from tests.reference.routers import reference_expert_choice

SHAPES = [
    pytest.param(1, 2, 1, None, id="T1-E2-k1"),
    pytest.param(7, 4, 1, None, id="T7-E4-k1"),
    pytest.param(12, 4, 2, None, id="T12-E4-k2"),
    pytest.param(5, 8, 1, None, id="T5-E8-k1-fewer-tokens-than-experts"),
    pytest.param(10, 3, 3, None, id="T10-E3-k3-every-expert-takes-all"),
    pytest.param(9, 4, 2, [1, 1, 0, 1, 0, 1, 1, 1, 0], id="T9-E4-k2-padding"),
    pytest.param(4, 4, 2, [0, 0, 0, 0], id="T4-all-padding-zero-tokens-per-expert"),
]


def make_router(T: int, E: int, k: int, seed: int = 0) -> tuple[ExpertChoiceRouter, torch.Tensor]:
    torch.manual_seed(seed)
    router = ExpertChoiceRouter(MoEConfig(d_model=6, d_ff=8, num_experts=E, top_k=k, router="expert_choice"))
    return router, torch.randn(T, 6)


@pytest.mark.parametrize("T,E,k,mask", SHAPES)
def test_matches_reference_ids_weights_and_gradients(T, E, k, mask) -> None:
    router, x_TD = make_router(T, E, k)
    mask_T = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    d = router(x_TD, mask_T=mask_T)
    ref_ids, ref_w = reference_expert_choice(router.logits(x_TD), top_k=k, mask_T=mask_T)
    assert torch.equal(d.expert_ids_TK, ref_ids)
    torch.testing.assert_close(d.weights_TK, ref_w, rtol=1e-6, atol=1e-7)
    assert torch.equal(d.counts_E, (ref_ids >= 0).sum(0))
    if not ref_w.requires_grad:  # nothing chosen (all padding): no gradient to compare
        return
    g = torch.randn(T, E)
    (grad,) = torch.autograd.grad((d.weights_TK * g).sum(), router.gate.weight)
    (ref_grad,) = torch.autograd.grad((ref_w * g).sum(), router.gate.weight)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,E,k", [(8, 4, 1), (13, 4, 2), (6, 5, 3), (3, 4, 1)])
def test_every_expert_takes_exactly_C_tokens(T, E, k) -> None:
    router, x_TD = make_router(T, E, k, seed=T)
    d = router(x_TD)
    C = math.ceil(T * k / E)
    assert expert_choice_capacity(T, k, E) == C
    assert d.counts_E.tolist() == [C] * E
    assert ((d.expert_ids_TK >= 0).sum(0) == C).all()
    assert d.expert_ids_TK.shape == (T, E)
    # Column e holds e or -1, and the weight is the token's softmax score exactly where chosen.
    chosen = d.expert_ids_TK >= 0
    assert torch.equal(d.expert_ids_TK[chosen], torch.arange(E).expand(T, E)[chosen])
    assert torch.equal(d.weights_TK[chosen], d.probs_TE[chosen])
    assert (d.weights_TK[~chosen] == 0).all()


def test_padding_never_chosen_and_capacity_counts_real_tokens() -> None:
    router, x_TD = make_router(10, 4, 2)
    mask_T = torch.tensor([1, 0, 1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)  # 6 real tokens
    x_TD[~mask_T] = 100.0 * x_TD[~mask_T]  # padding with extreme scores must still be ignored
    d = router(x_TD, mask_T=mask_T)
    assert (d.expert_ids_TK[~mask_T] == -1).all() and (d.weights_TK[~mask_T] == 0).all()
    assert d.counts_E.tolist() == [math.ceil(6 * 2 / 4)] * 4


def test_ties_go_to_the_lower_token_index() -> None:
    router, _ = make_router(6, 3, 1)
    x_TD = torch.randn(1, 6).expand(6, 6).contiguous()  # six identical tokens: all scores tie
    d = router(x_TD)
    # C = ceil(6 * 1 / 3) = 2: every expert takes tokens 0 and 1.
    assert d.expert_ids_TK[:2].tolist() == [[0, 1, 2]] * 2
    assert (d.expert_ids_TK[2:] == -1).all()


def test_deterministic_and_replay_reproduces_weights() -> None:
    router, x_TD = make_router(11, 4, 2)
    router.recording = []
    first = router(x_TD)
    again = router(x_TD)
    assert torch.equal(first.expert_ids_TK, again.expert_ids_TK)
    assert torch.equal(first.weights_TK, again.weights_TK)
    router.recording, router.replay = None, [first]
    replayed = router(x_TD)
    assert torch.equal(replayed.expert_ids_TK, first.expert_ids_TK)
    torch.testing.assert_close(replayed.weights_TK, first.weights_TK, rtol=0, atol=0)
    assert replayed.weights_TK.requires_grad  # replayed weights still train the gate


def test_replay_rejects_a_top_k_shaped_decision() -> None:
    router, x_TD = make_router(5, 4, 2)
    router.replay = [type(router(x_TD))(torch.zeros(5, 2, dtype=torch.long), torch.zeros(5, 2),
                                        torch.zeros(5, 4), torch.zeros(5, 4), torch.zeros(4))]
    with pytest.raises(ValueError, match="K = num_experts"):
        router(x_TD)


def test_config_rejects_capacity_factor() -> None:
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEConfig(d_model=4, d_ff=4, num_experts=4, router="expert_choice", capacity_factor=1.0)
