"""MoELayer with the expert-choice, hash, Sinkhorn and soft routers, end to end.

The sparse routers' layer output (and every gradient) equals the per-token reference MoE applied to
the layer's own decision; forwards are deterministic; record/replay reproduces the output.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit.analysis.stats import routing_stats
from moekit.config import MoEConfig
from moekit.layer import MoELayer
from moekit.model.accounting import num_params
from moekit.soft_layer import make_moe_layer
from tests.reference.moe import reference_moe

VOCAB = 12

SPARSE = [
    pytest.param(dict(router="expert_choice"), 2, 5, True, id="expert-choice"),
    pytest.param(dict(router="expert_choice", top_k=1, num_experts=8, activation="gelu", expert_mlp_bias=True),
                 1, 3, True, id="expert-choice-E8-T3"),
    pytest.param(dict(router="expert_choice", router_bias=True), 2, 6, [[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0]],
                 id="expert-choice-padding"),
    pytest.param(dict(router="hash"), 2, 5, True, id="hash-random-k2"),
    pytest.param(dict(router="hash", top_k=1, num_experts=8), 1, 3, True, id="hash-E8-T3-idle-experts"),
    pytest.param(dict(router="hash", hash_table="balanced", capacity_factor=0.5), 2, 6, True,
                 id="hash-round-robin-capacity"),
    pytest.param(dict(router="sinkhorn"), 2, 5, True, id="sinkhorn-train"),
    pytest.param(dict(router="sinkhorn"), 2, 5, False, id="sinkhorn-eval"),
    pytest.param(dict(router="sinkhorn", top_k=1, num_experts=8, score_func="sigmoid", normalize_topk=False),
                 1, 3, True, id="sinkhorn-megatron-k1-E8-T3"),
    pytest.param(dict(router="sinkhorn", activation="geglu", routed_scaling_factor=2.0), 3, 4,
                 [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], id="sinkhorn-padding"),
]


def build(kw: dict, B: int, S: int, seed: int = 0) -> tuple[MoELayer, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = MoEConfig(**{**dict(d_model=8, d_ff=12, num_experts=4, top_k=2, hash_vocab_size=VOCAB), **kw})
    layer = make_moe_layer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer, torch.randn(B, S, 8, requires_grad=True), torch.randint(0, VOCAB, (B, S))


@pytest.mark.parametrize("kw,B,S,mode", SPARSE)
def test_layer_equals_reference_moe_outputs_and_gradients(kw, B, S, mode) -> None:
    layer, x_BSD, token_ids = build(kw, B, S)
    layer.train(mode is not False)
    mask = None if isinstance(mode, bool) else torch.tensor(mode, dtype=torch.bool)
    out = layer(x_BSD, token_ids=token_ids, mask=mask)
    d = out.decision
    ref = reference_moe(x_BSD.reshape(-1, 8), d.expert_ids_TK, d.weights_TK, layer.experts).reshape(B, S, 8)
    torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-5)
    if mask is not None:
        assert (d.expert_ids_TK[~mask.reshape(-1)] == -1).all()
    assert d.counts_E.sum() == (d.expert_ids_TK >= 0).sum()
    g = torch.randn_like(ref)
    params = [x_BSD] + [p for p in layer.parameters()]
    # The reference reuses the decision's weights (and so the router's graph): keep that graph.
    grads = torch.autograd.grad((out.y * g).sum(), params, allow_unused=True, retain_graph=True)
    ref_grads = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for p, a, b in zip(params, grads, ref_grads):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {tuple(p.shape)}")


@pytest.mark.parametrize("kw,B,S,mode", SPARSE)
def test_two_forwards_are_bit_identical_and_replay_reproduces(kw, B, S, mode) -> None:
    layer, x_BSD, token_ids = build(kw, B, S, seed=1)
    layer.train(mode is not False)
    mask = None if isinstance(mode, bool) else torch.tensor(mode, dtype=torch.bool)
    layer.router.recording = []
    with torch.no_grad():
        a = layer(x_BSD, token_ids=token_ids, mask=mask)
        b = layer(x_BSD, token_ids=token_ids, mask=mask)
        assert torch.equal(a.y, b.y) and torch.equal(a.decision.expert_ids_TK, b.decision.expert_ids_TK)
        layer.router.replay, layer.router.recording = [layer.router.recording[0]], None
        replayed = layer(x_BSD, token_ids=token_ids, mask=mask)
    assert torch.equal(replayed.decision.expert_ids_TK, a.decision.expert_ids_TK)
    torch.testing.assert_close(replayed.y, a.y, rtol=0, atol=0)


ALL = [
    pytest.param(dict(router="expert_choice", router_bias=True), id="expert-choice"),
    pytest.param(dict(router="hash"), id="hash"),
    pytest.param(dict(router="sinkhorn", router_bias=True), id="sinkhorn"),
    pytest.param(dict(router="soft", soft_slots=3), id="soft"),
]


@pytest.mark.parametrize("kw", ALL)
def test_parameter_count_matches_config(kw: dict) -> None:
    layer, _, _ = build(kw, 1, 1)
    assert sum(p.numel() for p in layer.parameters()) == num_params(layer.config)


@pytest.mark.parametrize("kw", ALL)
def test_losses_and_statistics_digest_the_decision(kw: dict) -> None:
    layer, x_BSD, token_ids = build({**kw, "z_loss_coef": 1e-3}, 2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = layer(x_BSD, token_ids=token_ids, mask=mask)
    for value in out.aux_losses.values():
        assert math.isfinite(float(value.detach()))
    stats = routing_stats(out.decision, mask_T=mask.reshape(-1))
    assert len(stats["tokens_per_expert"]) == 4 and stats["max_vio"] >= 0
    assert math.isfinite(stats["router_entropy"])


BAD_CONFIGS = [
    pytest.param(dict(router="sinkhorn", jitter_eps=0.1), "jitter_eps", id="jitter-needs-topk"),
    pytest.param(dict(router="expert_choice", score_func="sigmoid"), "score_func", id="expert-choice-sigmoid"),
    pytest.param(dict(router="soft", router_bias=True), "router_bias", id="soft-has-no-gate-bias"),
    pytest.param(dict(router="hash", hash_vocab_size=8, routed_scaling_factor=2.0), "routed_scaling_factor",
                 id="hash-scaling"),
    pytest.param(dict(router="expert_choice", routed_scaling_factor=2.0), "routed_scaling_factor",
                 id="expert-choice-scaling"),
    pytest.param(dict(router="soft", capacity_factor=1.0), "capacity_factor", id="soft-capacity"),
    pytest.param(dict(router="soft", soft_slots=0), "soft_slots", id="soft-zero-slots"),
    pytest.param(dict(router="sinkhorn", sinkhorn_iters=0), "sinkhorn_iters", id="sinkhorn-zero-iters"),
]


@pytest.mark.parametrize("kw,field", BAD_CONFIGS)
def test_bad_router_configs_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}="):
        MoEConfig(**{**dict(d_model=8, d_ff=8, num_experts=4), **kw})
