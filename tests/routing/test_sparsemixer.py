"""SparseMixer (PhiMoE) routing: hand-derived weights, and equality with transformers' sparsemixer."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.config import MoEConfig
from moekit.routing.sparsemixer import SparseMixerRouter, sparsemixer_route


def test_hand_derived():
    # slot 1: best is expert 0 (2.0); experts within relative distance 2*eps = 0.2 of it: (2 - s) / 2 <= 0.2,
    # i.e. s >= 1.6: experts 0 and 1, so w = e^2 / (e^2 + e^1.9). Slot 2: best remaining is expert 1 (1.9);
    # experts 2 and 3 are too far ((1.9 - 0) / 1.9 > 0.2) and expert 0 is taken: w = 1.
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    ids, weights = sparsemixer_route(logits, top_k=2, eps=0.1)
    assert ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.tensor([[1 / (1 + math.exp(-0.1)), 1.0]]))


def test_clear_winner_gets_all_weight():
    ids, weights = sparsemixer_route(torch.tensor([[5.0, 0.0, -3.0, 1.0]]), eps=0.01)
    assert ids.tolist() == [[0, 3]] and weights.tolist() == [[1.0, 1.0]]


@pytest.mark.parametrize("eps", [pytest.param(0.01, id="eps0.01"), pytest.param(0.3, id="eps0.3")])
def test_matches_transformers(eps):
    sparsemixer = pytest.importorskip("transformers.models.phimoe.modeling_phimoe").sparsemixer
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 2
    want_w, want_ids = sparsemixer(logits, jitter_eps=eps, training=False, top_k=2)
    ids, weights = sparsemixer_route(logits, top_k=2, eps=eps)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w)


def test_router_and_config():
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, router="sparsemixer", sparsemixer_eps=0.2)
    router = SparseMixerRouter(cfg).eval()
    x = torch.randn(10, 8)
    d = router(x)
    assert d.expert_ids_TK.shape == (10, 2) and int(d.counts_E.sum()) == 20
    replayed = router.weights_for(x, d.expert_ids_TK)
    torch.testing.assert_close(replayed.weights_TK, d.weights_TK)
    # k slots generalise the k=2 of PhiMoE: each slot takes the best remaining expert
    cfg3 = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=3, router="sparsemixer")
    ids = SparseMixerRouter(cfg3)(x).expert_ids_TK
    assert all(len(set(row)) == 3 for row in ids.tolist())
    with pytest.raises(ValueError, match="sparsemixer_eps=-1"):
        MoEConfig(d_model=8, d_ff=16, num_experts=4, router="sparsemixer", sparsemixer_eps=-1)


def test_input_jitter_applies_in_training_only():
    """PhiMoE's input_jitter_noise is the sparsemixer router's jitter_eps (Phi-3.5-MoE sets 0.01)."""
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, router="sparsemixer", jitter_eps=0.01)
    router = SparseMixerRouter(cfg)
    x = torch.randn(10, 8)
    torch.testing.assert_close(router.eval()(x).logits_TE, router.logits(x), rtol=0, atol=0)
    torch.manual_seed(0)
    jittered = router.train()(x).logits_TE
    plain = torch.nn.functional.linear(x, router.gate.weight)
    assert not torch.equal(jittered, plain)
    assert (jittered - plain).abs().max() < 0.01 * 8 * x.abs().max() * router.gate.weight.abs().max()
