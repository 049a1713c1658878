"""Top-k router vs the per-token reference, ties, groups, bias, noise and replay."""

from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig
from moekit.routing.topk import TopKRouter, stable_topk, topk_route
from tests.reference.topk import reference_topk

CASES = [
    pytest.param(dict(top_k=2), id="softmax-top2-renorm"),
    pytest.param(dict(top_k=1), id="switch-top1"),
    pytest.param(dict(top_k=2, normalize_topk=False), id="softmax-top2-raw"),
    pytest.param(dict(top_k=2, softmax_after_topk=True), id="mixtral-softmax-after"),
    pytest.param(dict(top_k=3, score_func="sigmoid"), id="sigmoid-top3"),
    pytest.param(dict(top_k=2, routed_scaling_factor=2.5), id="scaled"),
    pytest.param(dict(top_k=2, num_groups=4, topk_groups=2), id="group-max"),
    pytest.param(dict(top_k=4, score_func="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum",
                      routed_scaling_factor=2.5), id="deepseek-v3"),
    pytest.param(dict(top_k=2, expert_bias=True), id="bias"),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("T", [1, 7, 33])
def test_topk_route_matches_reference(kw: dict, T: int) -> None:
    torch.manual_seed(T)
    E = 8
    logits_TE = torch.randn(T, E) * 2
    bias_E = torch.randn(E) * 0.3 if kw.get("expert_bias") else None
    route_kw = {k: v for k, v in kw.items() if k != "expert_bias"}
    ids, w, _ = topk_route(logits_TE, selection_bias_E=bias_E, **route_kw)
    ref_ids, ref_w = reference_topk(logits_TE, bias_E=bias_E, **route_kw)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)


def test_ties_go_to_lower_expert_id() -> None:
    logits_TE = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    ids, _, _ = topk_route(logits_TE, top_k=2)
    assert ids.tolist() == [[1, 2], [0, 1]]
    ids1, _, _ = topk_route(logits_TE, top_k=1)
    assert ids1.tolist() == [[1], [0]]


def test_bias_changes_selection_not_weights() -> None:
    logits_TE = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias_E = torch.tensor([0.0, 0.0, 5.0, 0.0])
    ids, w, _ = topk_route(logits_TE, top_k=2, selection_bias_E=bias_E, normalize_topk=False)
    assert ids.tolist() == [[2, 0]]
    probs = logits_TE.softmax(-1)[0]
    torch.testing.assert_close(w[0], torch.stack([probs[2], probs[0]]))


def test_group_limit_excludes_other_groups() -> None:
    # Group 0 = experts 0,1 has the single best expert; group 1 = experts 2,3 is better on top-2 sum.
    logits_TE = torch.tensor([[5.0, -5.0, 4.0, 4.0]])
    kw = dict(top_k=2, num_groups=2, topk_groups=1, score_func="sigmoid")
    ids_max, _, _ = topk_route(logits_TE, group_score="max", **kw)
    ids_sum, _, _ = topk_route(logits_TE, group_score="top2_sum", **kw)
    assert sorted(ids_max[0].tolist()) == [0, 1]
    assert sorted(ids_sum[0].tolist()) == [2, 3]


def test_router_gradients_match_reference_autograd() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=6, top_k=2)
    router = TopKRouter(cfg)
    x_TD = torch.randn(11, 16)
    d = router(x_TD)
    upstream = torch.randn_like(d.weights_TK)
    (d.weights_TK * upstream).sum().backward()
    grad = router.gate.weight.grad.clone()
    # Same function written densely: softmax, gather the chosen ids, renormalise.
    w_ref = torch.nn.Parameter(router.gate.weight.detach().clone())
    probs = (x_TD @ w_ref.t()).softmax(-1).gather(1, d.expert_ids_TK)
    ((probs / probs.sum(-1, keepdim=True)) * upstream).sum().backward()
    torch.testing.assert_close(grad, w_ref.grad)


def test_noise_and_jitter_only_in_training() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=8, top_k=2, noisy_gating=True, jitter_eps=0.1)
    router = TopKRouter(cfg)
    torch.nn.init.normal_(router.noise_gate.weight)
    x_TD = torch.randn(64, 16)
    router.eval()
    a, b = router(x_TD), router(x_TD)
    assert torch.equal(a.logits_TE, b.logits_TE)
    router.train()
    c = router(x_TD)
    assert not torch.equal(a.logits_TE, c.logits_TE)


def test_update_bias_moves_towards_balance() -> None:
    cfg = MoEConfig(d_model=4, d_ff=4, num_experts=4, top_k=1, expert_bias=True, bias_update_rate=0.1)
    router = TopKRouter(cfg)
    router.update_bias(torch.tensor([10, 0, 5, 5]))
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert "expert_bias" in router.state_dict()


def test_update_bias_without_bias_raises() -> None:
    router = TopKRouter(MoEConfig(d_model=4, d_ff=4, num_experts=4))
    with pytest.raises(ValueError, match="expert_bias=True"):
        router.update_bias(torch.ones(4))


def test_record_and_replay_reproduce_routing() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=8, num_experts=8, top_k=2)
    router = TopKRouter(cfg)
    x_TD = torch.randn(20, 16)
    router.recording = []
    first = router(x_TD)
    recorded = router.recording
    router.recording = None
    with torch.no_grad():
        router.gate.weight.add_(torch.randn_like(router.gate.weight))  # the router has moved on
    assert not torch.equal(router(x_TD).expert_ids_TK, first.expert_ids_TK)
    router.replay = list(recorded)
    replayed = router(x_TD)
    assert torch.equal(replayed.expert_ids_TK, first.expert_ids_TK)
    assert replayed.weights_TK.requires_grad  # weights come from the current gate
    with pytest.raises(ValueError, match="covers 20 tokens"):
        router.replay = list(recorded)
        router(x_TD[:5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("E,k", [(8, 2), (64, 6), (300, 8)])
@pytest.mark.parametrize("T", [pytest.param(4, id="sorted"), pytest.param(600, id="keys")])  # both paths
def test_stable_topk_equals_stable_sort(dtype: torch.dtype, E: int, k: int, T: int) -> None:
    g = torch.Generator().manual_seed(E)
    scores_TE = torch.randn(T, E, generator=g).to(dtype)
    scores_TE[:, : E // 2] = scores_TE[:, :1]  # many exact ties, including negative values
    scores_TE[0, 3] = float("-inf")
    scores_TE[1, :] = 0.0
    scores_TE[1, 5] = -0.0
    values, ids = stable_topk(scores_TE, k)
    ref_values, ref_ids = torch.sort(scores_TE, dim=-1, descending=True, stable=True)
    assert torch.equal(ids, ref_ids[:, :k])
    assert torch.equal(values, ref_values[:, :k])
