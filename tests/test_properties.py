"""Property tests over experts, top-k, tokens, dtype and router: invariants every decision keeps."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.analysis.stats import routing_stats
from moekit.config import MoEConfig
from moekit.dispatch.capacity import expert_capacity
from moekit.soft_layer import make_moe_layer
from moekit.routing import ROUTERS

VOCAB = 50


def config_for(router: str, E: int, K: int, capacity: float | None, sigmoid: bool) -> MoEConfig:
    extra: dict = {}
    if router == "topk":
        extra = dict(capacity_factor=capacity, score_func="sigmoid" if sigmoid else "softmax")
    elif router == "hash":
        extra = dict(hash_vocab_size=VOCAB)
    elif router == "sinkhorn":
        extra = dict(capacity_factor=capacity)
    return MoEConfig(d_model=8, d_ff=8, num_experts=E, top_k=K, router=router, **extra)


@settings(max_examples=60, deadline=None)
@given(
    router=st.sampled_from(sorted(ROUTERS)),
    E=st.integers(1, 12),
    K_frac=st.floats(0, 1),
    B=st.integers(1, 3),
    S=st.integers(1, 9),
    capacity=st.one_of(st.none(), st.floats(0.1, 2.0)),
    sigmoid=st.booleans(),
    bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_layer_invariants(router, E, K_frac, B, S, capacity, sigmoid, bf16, seed) -> None:
    K = 1 + int(K_frac * (E - 1))
    cfg = config_for(router, E, K, capacity, sigmoid)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    layer = make_moe_layer(cfg).to(dtype).eval()
    x = torch.randn(B, S, 8, dtype=dtype)
    token_ids = torch.randint(0, VOCAB, (B, S))
    with torch.no_grad():
        out = layer(x, token_ids=token_ids)
        again = layer(x, token_ids=token_ids)
    d = out.decision
    T = B * S

    assert out.y.shape == x.shape and out.y.dtype == dtype
    assert torch.isfinite(out.y).all()
    assert torch.equal(out.y, again.y) and torch.equal(d.expert_ids_TK, again.decision.expert_ids_TK)
    ids = d.expert_ids_TK
    assert ids.shape[0] == T and ids.min() >= -1 and ids.max() < E
    assert d.counts_E.sum() == (ids >= 0).sum()
    assert torch.all(d.weights_TK[ids < 0] == 0)
    assert d.logits_TE.dtype == torch.float32
    stats = routing_stats(d)
    assert 0.0 <= stats["dropped_fraction"] <= 1.0 and stats["max_vio"] >= 0
    if router == "topk":
        chosen = d.selection_TK
        # Each token picks K distinct experts.
        assert all(len(set(row)) == K for row in chosen.tolist())
        if cfg.capacity_factor is None:
            assert d.dropped_TK is None and (ids >= 0).all()
        else:
            cap = expert_capacity(T, K, E, cfg.capacity_factor)
            assert d.counts_E.max() <= cap
            assert (d.dropped_TK == ((chosen >= 0) & (ids < 0))).all()
        if cfg.score_func == "softmax" and cfg.capacity_factor is None:
            torch.testing.assert_close(d.weights_TK.sum(-1), torch.ones(T))
    for value in out.aux_losses.values():
        assert math.isfinite(value.item())
