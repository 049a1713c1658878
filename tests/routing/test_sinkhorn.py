"""Sinkhorn router vs Megatron-style loop reference; balance on a skewed gate; eval = plain top-k."""

from __future__ import annotations

import pytest
import torch

from moekit.analysis.stats import routing_stats
from moekit.config import MoEConfig
from moekit.routing.balanced import SinkhornRouter, sinkhorn_log
from moekit.routing.topk import topk_route
from tests.reference.routers import reference_sinkhorn, reference_sinkhorn_matrix

CASES = [
    pytest.param(dict(T=1, E=2, top_k=1), id="T1-E2-k1"),
    pytest.param(dict(T=3, E=8, top_k=1), id="T3-E8-idle-experts"),
    pytest.param(dict(T=16, E=4, top_k=2), id="T16-E4-k2"),
    pytest.param(dict(T=12, E=4, top_k=1, score_func="sigmoid", normalize_topk=False), id="megatron-k1-sigmoid"),
    pytest.param(dict(T=10, E=6, top_k=3, normalize_topk=False, routed_scaling_factor=2.0), id="k3-scaled"),
    pytest.param(dict(T=9, E=4, top_k=2, iters=7, mask=[1, 1, 0, 1, 1, 0, 1, 1, 1]), id="padding-7-iters"),
]


def make_router(T: int, E: int, top_k: int, iters: int = 3, mask: list | None = None, **kw):
    torch.manual_seed(T * 10 + E)
    cfg = MoEConfig(d_model=6, d_ff=8, num_experts=E, top_k=top_k, router="sinkhorn", sinkhorn_iters=iters, **kw)
    router = SinkhornRouter(cfg)
    mask_T = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    return router, torch.randn(T, 6), mask_T


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("training", [pytest.param(True, id="train"), pytest.param(False, id="eval")])
def test_matches_reference_ids_weights_and_gradients(case: dict, training: bool) -> None:
    router, x_TD, mask_T = make_router(**case)
    router.train(training)
    cfg = router.config
    d = router(x_TD, mask_T=mask_T)
    ref_ids, ref_w = reference_sinkhorn(
        router.logits(x_TD), top_k=cfg.top_k, iters=cfg.sinkhorn_iters, balanced=training,
        score_func=cfg.score_func, normalize_topk=cfg.normalize_topk,
        routed_scaling_factor=cfg.routed_scaling_factor, mask_T=mask_T,
    )
    real = slice(None) if mask_T is None else mask_T
    assert torch.equal(d.expert_ids_TK[real], ref_ids[real])
    torch.testing.assert_close(d.weights_TK[real], ref_w[real], rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref_w)
    if mask_T is not None:
        g[~mask_T] = 0
    (grad,) = torch.autograd.grad((d.weights_TK * g).sum(), router.gate.weight)
    (ref_grad,) = torch.autograd.grad((ref_w * g).sum(), router.gate.weight)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_balanced_matrix_matches_megatron_formula() -> None:
    torch.manual_seed(0)
    logits_TE = torch.randn(7, 3) * 3
    fast_TE = sinkhorn_log(logits_TE, iters=4).exp()
    ref_TE = torch.tensor(reference_sinkhorn_matrix(logits_TE, iters=4))
    # Equal up to a positive factor per row (row scaling does not change a row's ranking).
    torch.testing.assert_close(fast_TE / fast_TE.sum(1, keepdim=True), ref_TE / ref_TE.sum(1, keepdim=True))
    # After the final column step every expert holds the same total mass.
    col_E = fast_TE.sum(0)
    torch.testing.assert_close(col_E, torch.full_like(col_E, 1.0))


def skewed_logits(T: int, E: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    logits_TE = torch.randn(T, E)
    logits_TE[:, 0] += 2.0  # a gate biased towards expert 0
    return logits_TE


@pytest.mark.parametrize("top_k", [1, 2])
def test_training_selection_is_more_balanced_than_top_k_on_a_skewed_gate(top_k: int) -> None:
    logits_TE = skewed_logits(64, 4)
    plain_ids, _, _ = topk_route(logits_TE, top_k=top_k)
    plain_counts = torch.bincount(plain_ids.reshape(-1), minlength=4)
    # Feed the same logits through the router: x = logits, gate = identity.
    cfg = MoEConfig(d_model=4, d_ff=4, num_experts=4, top_k=top_k, router="sinkhorn")
    router = SinkhornRouter(cfg).train()
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4))
    d = router(logits_TE)
    vio_sinkhorn = routing_stats(d)["max_vio"]
    vio_plain = float(plain_counts.max() / plain_counts.float().mean() - 1)
    assert plain_counts[0] == plain_counts.max() and vio_plain > 0.5  # the skew is real
    assert vio_sinkhorn < min(0.25, vio_plain / 4)
    # In eval the router is plain top-k and shows the skew again.
    d_eval = router.eval()(logits_TE)
    assert torch.equal(d_eval.expert_ids_TK, plain_ids)


def test_deterministic_and_replay() -> None:
    router, x_TD, _ = make_router(16, 4, 2)
    router.train()
    router.recording = []
    first = router(x_TD)
    again = router(x_TD)
    assert torch.equal(first.expert_ids_TK, again.expert_ids_TK) and torch.equal(first.weights_TK, again.weights_TK)
    router.recording, router.replay = None, [first]
    replayed = router.eval()(x_TD)  # replay keeps the recorded (training) choice even in eval
    assert torch.equal(replayed.expert_ids_TK, first.expert_ids_TK)
    torch.testing.assert_close(replayed.weights_TK, first.weights_TK, rtol=0, atol=0)
