"""MoELayer end to end: against a dense all-experts reference, shared/dense parts, masks, dtypes."""

from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig
from moekit.experts.activations import glu, plain
from moekit.layer import MoELayer
from moekit.model.accounting import num_params
from moekit.soft_layer import make_moe_layer


def all_experts_reference(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Run every expert on every token, then mix with a dense (T, E) gate built from the decision."""
    cfg, ex = layer.config, layer.experts
    d = layer.route(x_TD)
    gate_TE = torch.zeros(x_TD.shape[0], cfg.num_experts)
    for k in range(d.expert_ids_TK.shape[1]):
        ids = d.expert_ids_TK[:, k]
        valid = ids >= 0
        gate_TE[valid.nonzero().squeeze(1), ids[valid]] += d.weights_TK[valid, k]
    y_TD = torch.zeros_like(x_TD, dtype=torch.float32)
    for e in range(cfg.num_experts):
        ins = [x_TD @ w[e] + (0 if b is None else b[e]) for w, b in ex.input_projections()]
        h = glu(ins[0], ins[1], cfg.activation) if cfg.gated else plain(ins[0], cfg.activation)
        w_out, b_out = ex.output_projection()
        out = h @ w_out[e] + (0 if b_out is None else b_out[e])
        y_TD += gate_TE[:, e:e + 1] * out
    return y_TD + layer.dense_parts(x_TD)


CONFIGS = [
    pytest.param(dict(), id="top2-swiglu"),
    pytest.param(dict(top_k=1, capacity_factor=0.5), id="switch-dropping"),
    pytest.param(dict(activation="gelu", expert_mlp_bias=True), id="gelu-bias"),
    pytest.param(dict(activation="geglu", top_k=3), id="geglu-top3"),
    pytest.param(dict(score_func="sigmoid", num_groups=4, topk_groups=2, routed_scaling_factor=2.0,
                      num_shared_experts=2), id="deepseek-v3-like"),
    pytest.param(dict(num_shared_experts=1, shared_expert_gate=True, normalize_topk=False), id="qwen2-like"),
    pytest.param(dict(dense_residual_d_ff=24, activation="relu"), id="arctic-like"),
    pytest.param(dict(num_experts=16, top_k=2), id="many-experts-some-idle"),
]


@pytest.mark.parametrize("kw", CONFIGS)
def test_layer_matches_all_experts_reference(kw: dict) -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(**{**dict(d_model=16, d_ff=24, num_experts=8, top_k=2), **kw})
    layer = MoELayer(cfg)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.3)
    x_TD = torch.randn(10, 16, requires_grad=True)
    out = layer(x_TD)
    ref = all_experts_reference(layer, x_TD)
    torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-5)
    # Gradients w.r.t. the input, every parameter (router included) agree as well.
    g = torch.randn_like(ref)
    params = [x_TD] + [p for p in layer.parameters()]
    grads = torch.autograd.grad((out.y * g).sum(), params, allow_unused=True)
    grads_ref = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for a, b in zip(grads, grads_ref):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_input_shapes_and_errors() -> None:
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4)
    layer = MoELayer(cfg)
    x = torch.randn(2, 3, 8)
    out = layer(x)
    assert out.y.shape == x.shape
    torch.testing.assert_close(layer(x.reshape(6, 8)).y, out.y.reshape(6, 8))
    with pytest.raises(ValueError, match="expects input"):
        layer(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="mask has shape"):
        layer(x, mask=torch.ones(3, 2, dtype=torch.bool))


def test_padded_tokens_change_nothing() -> None:
    torch.manual_seed(1)
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, capacity_factor=1.0, z_loss_coef=1e-3)
    layer = MoELayer(cfg)
    x = torch.randn(1, 6, 8)
    mask = torch.tensor([[True, True, True, True, False, False]])
    x_garbage = x.clone()
    x_garbage[0, 4:] = 50.0
    a, b = layer(x, mask=mask), layer(x_garbage, mask=mask)
    short = layer(x[:, :4])
    torch.testing.assert_close(a.y[:, :4], b.y[:, :4])
    torch.testing.assert_close(a.y[:, :4], short.y)
    for name in a.aux_losses:
        torch.testing.assert_close(a.aux_losses[name], b.aux_losses[name])
        torch.testing.assert_close(a.aux_losses[name], short.aux_losses[name])
    assert (a.decision.expert_ids_TK[4:] == -1).all()


def test_dropped_token_gets_zero_from_experts() -> None:
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=2, top_k=1, capacity_factor=0.5)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 10.0  # everything with x[0] > 0 goes to expert 0
    x = torch.ones(4, 8)
    out = layer(x)
    # capacity = ceil(0.5 * 4 / 2) = 1: one token kept, three dropped with zero output.
    assert out.decision.dropped_TK.sum() == 3
    dropped = out.decision.dropped_TK[:, 0]
    assert torch.all(out.y[dropped] == 0)
    assert torch.any(out.y[~dropped] != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_and_determinism(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=16, num_experts=8, top_k=2)
    layer = MoELayer(cfg).to(dtype)
    x = torch.randn(4, 8, 16, dtype=dtype)
    a, b = layer(x), layer(x)
    assert a.y.dtype == dtype
    assert a.decision.logits_TE.dtype == torch.float32
    assert torch.equal(a.y, b.y)
    assert torch.equal(a.decision.expert_ids_TK, b.decision.expert_ids_TK)


def test_bf16_close_to_fp32() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=2)
    layer = MoELayer(cfg)
    x = torch.randn(64, 32)
    y32 = layer(x).y
    layer16 = MoELayer(cfg)
    layer16.load_state_dict(layer.state_dict())
    layer16 = layer16.to(torch.bfloat16)
    y16 = layer16(x.bfloat16())
    same = (y16.decision.expert_ids_TK == layer(x).decision.expert_ids_TK).all(-1)
    torch.testing.assert_close(y16.y.float()[same], y32[same], rtol=0.05, atol=0.05)


def test_aux_losses_by_name_and_coefficients() -> None:
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, load_balance_coef=0.5, z_loss_coef=0.25)
    layer = MoELayer(cfg)
    out = layer(torch.randn(5, 8))
    assert set(out.aux_losses) == {"load_balance", "z"}
    expected = 0.5 * out.aux_losses["load_balance"] + 0.25 * out.aux_losses["z"]
    torch.testing.assert_close(layer.aux_loss(out.aux_losses), expected)
    none = MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4, load_balance_coef=0.0))
    assert none(torch.randn(5, 8)).aux_losses == {}


def test_aux_loss_free_bias_counts_and_updates() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=1, score_func="sigmoid", expert_bias=True,
                    bias_update_rate=0.01, load_balance_coef=0.0)
    layer = MoELayer(cfg).train()
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 1.0  # expert 0 wins for positive inputs
    x = torch.rand(32, 8)
    layer(x)
    assert layer.load_counts_E.tolist() == [32.0, 0.0, 0.0, 0.0]
    layer.update_expert_bias()
    torch.testing.assert_close(layer.router.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert layer.load_counts_E.sum() == 0
    # The bias is a saved buffer; the counter is not.
    assert "router.expert_bias" in layer.state_dict()
    assert "load_counts_E" not in layer.state_dict()
    # Repeated updates spread a skewed load over the experts.
    with torch.no_grad():
        layer.router.expert_bias.zero_()
        layer.router.gate.weight[1:] = torch.randn(3, 8)
        layer.router.gate.weight[0] = 0.5
    x = torch.randn(256, 8) + 0.5
    before = layer.route(x).counts_E
    max_vio = []  # max load / mean load - 1, mean load = 64
    for _ in range(200):
        with torch.no_grad():
            layer(x)
        layer.update_expert_bias()
        max_vio.append(float(layer.route(x).counts_E.max()) / 64 - 1)
    # The sign update ends in a small oscillation around balance: judge its average.
    late = sum(max_vio[-20:]) / 20
    assert float(before.max()) / 64 - 1 > 0.5 and late < 0.2, (before, max_vio[-20:])


def test_update_bias_requires_bias() -> None:
    with pytest.raises(ValueError, match="expert_bias=True"):
        MoELayer(MoEConfig(d_model=8, d_ff=8, num_experts=4)).update_expert_bias()


def test_param_count_matches_built_layer() -> None:
    for kw in [dict(), dict(activation="gelu", expert_mlp_bias=True), dict(num_shared_experts=2,
               shared_expert_gate=True, router_bias=True), dict(dense_residual_d_ff=12, noisy_gating=True)]:
        cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, **kw)
        layer = MoELayer(cfg)
        assert num_params(cfg) == sum(p.numel() for p in layer.parameters()), kw


@pytest.mark.parametrize("router,expected", [
    pytest.param("topk", {"load_balance", "z"}, id="topk"),
    pytest.param("sinkhorn", {"load_balance", "z"}, id="sinkhorn"),
    pytest.param("expert_choice", {"z"}, id="expert-choice-balanced-by-construction"),
    pytest.param("soft", {"z"}, id="soft-balanced-by-construction"),
    pytest.param("hash", set(), id="hash-has-no-gate"),
])
def test_which_aux_losses_each_router_returns(router: str, expected: set) -> None:
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=4, router=router, z_loss_coef=1e-3,
                    hash_vocab_size=10 if router == "hash" else None)
    out = make_moe_layer(cfg)(torch.randn(2, 5, 8), token_ids=torch.randint(0, 10, (2, 5)))
    assert set(out.aux_losses) == expected
