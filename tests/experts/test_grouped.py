"""Fast grouped-GEMM experts against the per-expert loop reference: outputs and every gradient.

Also: the full MoELayer (router gradients included), a 1-expert top-1 layer against a dense FFN,
the decode path ignoring unselected experts, the unaligned fallback, and torch.compile vs eager.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts.dense import DenseMLP
from moekit.experts.grouped import Experts, grouped_matmul, grouped_mm_supported
from moekit.layer import MoELayer
from tests.reference.experts import reference_experts
from tests.reference.moe import reference_moe


class ReferenceExperts(nn.Module):
    """Wraps an Experts module (same parameters) but runs the slow loop reference."""

    def __init__(self, fast: Experts) -> None:
        super().__init__()
        self.inner = fast
        self.config = fast.config

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        return reference_experts(self.inner, x_RD, counts_E)


def make_experts(E: int, D: int, F: int, activation: str, bias: bool, dtype: torch.dtype,
                 fuse: bool = False, seed: int = 0, decode_max_rows: int = 0) -> Experts:
    """decode_max_rows=0 sends every input through the grouped-GEMM path."""
    torch.manual_seed(seed)
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=1, activation=activation,
                    expert_mlp_bias=bias)
    ex = Experts(cfg, fuse_gate_up=fuse, decode_max_rows=decode_max_rows)
    with torch.no_grad():
        for name, p in ex.named_parameters():
            if name.startswith("b_"):
                p.normal_(0, 0.5)  # non-zero biases, so a bias applied to the wrong rows shows
    return ex.to(dtype)


def assert_close_scaled(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    """fp32: tight. bf16: error relative to the tensor's scale (8 bits of mantissa, sums of ~F terms)."""
    actual, expected = actual.float(), expected.float()
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=what)
        return
    scale = expected.abs().max().clamp_min(1e-3)
    err = (actual - expected).abs().max()
    assert err <= 3e-2 * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


CASES = [
    pytest.param(4, 16, 32, [3, 5, 2, 6], "swiglu", False, torch.float32, False, id="swiglu-fp32"),
    pytest.param(4, 16, 32, [0, 5, 0, 3], "swiglu", True, torch.float32, False, id="zero-token-experts-bias"),
    pytest.param(4, 16, 32, [0, 0, 9, 0], "geglu", False, torch.float32, False, id="all-on-one-expert"),
    pytest.param(4, 16, 32, [0, 1, 0, 0], "swiglu", True, torch.float32, False, id="one-row-T1"),
    pytest.param(4, 16, 32, [0, 0, 0, 0], "swiglu", False, torch.float32, False, id="no-rows"),
    pytest.param(1, 16, 32, [7], "swiglu", False, torch.float32, False, id="one-expert"),
    pytest.param(5, 16, 24, [2, 0, 4, 1, 3], "gelu", True, torch.float32, False, id="plain-gelu-bias"),
    pytest.param(3, 8, 16, [4, 0, 2], "relu", False, torch.float32, False, id="plain-relu"),
    pytest.param(4, 16, 32, [3, 0, 2, 6], "swiglu", True, torch.float32, True, id="fused-gate-up-bias"),
    pytest.param(4, 16, 32, [3, 5, 0, 6], "swiglu", False, torch.bfloat16, False, id="swiglu-bf16"),
    pytest.param(4, 16, 32, [0, 7, 0, 1], "gelu", True, torch.bfloat16, False, id="gelu-bias-bf16"),
    pytest.param(4, 16, 32, [2, 2, 0, 5], "geglu", True, torch.bfloat16, True, id="fused-bf16"),
    pytest.param(3, 6, 10, [2, 0, 3], "swiglu", True, torch.float32, False, id="unaligned-fallback"),
]


@pytest.mark.parametrize("path", [pytest.param(0, id="grouped"), pytest.param(64, id="decode")])
@pytest.mark.parametrize("E,D,F,counts,activation,bias,dtype,fuse", CASES)
def test_fast_matches_reference(E, D, F, counts, activation, bias, dtype, fuse, path) -> None:
    ex = make_experts(E, D, F, activation, bias, dtype, fuse, decode_max_rows=path)
    counts_E = torch.tensor(counts)
    x_RD = torch.randn(sum(counts), D).to(dtype).requires_grad_()
    y_RD = ex(x_RD, counts_E)
    assert y_RD.dtype == dtype and y_RD.shape == (sum(counts), D)
    # The reference runs in fp32 on the same (rounded) weights, so bf16 is judged against exact maths.
    ref = make_experts(E, D, F, activation, bias, torch.float32, fuse)
    ref.load_state_dict({k: v.float() for k, v in ex.state_dict().items()})
    x_ref = x_RD.detach().float().requires_grad_()
    y_ref = reference_experts(ref, x_ref, counts_E)
    assert_close_scaled(y_RD, y_ref, dtype, "output")

    g_RD = torch.randn_like(y_ref)
    (y_RD.float() * g_RD).sum().backward()
    (y_ref * g_RD).sum().backward()
    assert_close_scaled(x_RD.grad, x_ref.grad, dtype, "grad x")
    for (name, p), p_ref in zip(ex.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        assert_close_scaled(p.grad, p_ref.grad, dtype, f"grad {name}")
        # Experts that received no rows get exactly zero gradient.
        for e, c in enumerate(counts):
            if c == 0:
                assert p.grad[e].abs().max() == 0, f"{name}[{e}] has gradient but no rows"


@pytest.mark.parametrize(
    "D,F,dtype,expected",
    [
        pytest.param(16, 32, torch.float32, True, id="fp32-aligned"),
        pytest.param(16, 32, torch.bfloat16, True, id="bf16-aligned"),
        pytest.param(6, 10, torch.float32, False, id="fp32-24-byte-rows"),
        pytest.param(12, 16, torch.bfloat16, False, id="bf16-24-byte-rows"),
    ],
)
def test_grouped_kernel_used_only_when_aligned(D, F, dtype, expected) -> None:
    assert grouped_mm_supported(torch.randn(5, D).to(dtype), torch.randn(3, D, F).to(dtype)) is expected


def test_misaligned_input_view_is_copied_not_miscomputed() -> None:
    w_EDF = torch.randn(3, 16, 8)
    x_RD = torch.randn(39 * 16 + 1)[1:].view(39, 16)  # base pointer 4 bytes past an aligned one
    counts_E = torch.tensor([10, 0, 29])
    assert not grouped_mm_supported(x_RD, w_EDF)
    y_RD = grouped_matmul(x_RD, w_EDF, counts_E)
    torch.testing.assert_close(y_RD, torch.cat([x_RD[:10] @ w_EDF[0], x_RD[10:] @ w_EDF[2]]))


def test_bad_counts_raise() -> None:
    ex = make_experts(4, 16, 32, "swiglu", False, torch.float32)
    with pytest.raises(ValueError, match="counts_E has shape"):
        ex(torch.randn(4, 16), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="sum"):
        ex(torch.randn(5, 16), torch.tensor([2, 2, 0, 0]))


@pytest.mark.parametrize("fuse,decode_max_rows", [pytest.param(False, 0, id="grouped"),
                                                  pytest.param(True, 0, id="grouped-fused"),
                                                  pytest.param(False, 64, id="decode-path")])
def test_few_rows_ignore_unselected_experts(fuse: bool, decode_max_rows: int) -> None:
    """A decode step (few rows) uses only its experts: NaN in every other expert changes nothing."""
    ex = make_experts(8, 16, 32, "swiglu", True, torch.float32, fuse, decode_max_rows=decode_max_rows)
    counts_E = torch.tensor([0, 2, 0, 0, 0, 1, 0, 0])
    x_RD = torch.randn(3, 16)
    y_RD = ex(x_RD, counts_E)
    with torch.no_grad():
        for p in ex.parameters():
            p[counts_E == 0] = float("nan")
    torch.testing.assert_close(ex(x_RD, counts_E), y_RD)


LAYER_CASES = [
    pytest.param(dict(), torch.float32, id="top2-fp32"),
    pytest.param(dict(num_experts=16, top_k=4, activation="gelu", expert_mlp_bias=True),
                 torch.float32, id="top4-some-idle-gelu-bias"),
    pytest.param(dict(top_k=1, capacity_factor=0.5), torch.float32, id="capacity-dropping"),
    pytest.param(dict(num_shared_experts=1), torch.bfloat16, id="shared-bf16"),
]


@pytest.mark.parametrize("path", [pytest.param(0, id="grouped"), pytest.param(64, id="decode")])
@pytest.mark.parametrize("kw,dtype", LAYER_CASES)
def test_layer_fast_matches_reference_with_router_grads(kw: dict, dtype: torch.dtype, path: int) -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(**{**dict(d_model=16, d_ff=32, num_experts=8, top_k=2), **kw})
    fast = MoELayer(cfg, experts=Experts(cfg, decode_max_rows=path)).to(dtype)
    slow = MoELayer(cfg, router=fast.router, experts=ReferenceExperts(fast.experts))
    slow.shared_experts = fast.shared_experts
    x_TD = torch.randn(12, 16).to(dtype)
    g_TD = torch.randn(12, 16)
    params = [p for _, p in fast.named_parameters()]
    grads = {}
    for which, layer in (("fast", fast), ("slow", slow)):
        x = x_TD.clone().requires_grad_()
        y = layer(x).y
        grads[which] = torch.autograd.grad((y.float() * g_TD).sum(), [x] + params, allow_unused=True)
        grads[which + "_y"] = y
    assert_close_scaled(grads["fast_y"], grads["slow_y"], dtype, "layer output")
    names = ["x"] + [n for n, _ in fast.named_parameters()]
    assert "router.gate.weight" in names
    for name, a, b in zip(names, grads["fast"], grads["slow"]):
        assert (a is None) == (b is None), name
        if a is not None:
            assert_close_scaled(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_layer_matches_per_token_reference(dtype: torch.dtype) -> None:
    """Router + dispatch + grouped experts + combine against a loop over tokens and their slots,
    outputs and gradients (input, expert weights, router), rows enough for the grouped path."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=6, top_k=3, expert_mlp_bias=True)
    layer = MoELayer(cfg).to(dtype)
    with torch.no_grad():
        for p in layer.experts.parameters():
            p.normal_(0, 0.3)
    x_TD = torch.randn(40, 16).to(dtype)
    g_TD = torch.randn(40, 16)
    params = [p for _, p in layer.named_parameters()]
    x = x_TD.clone().requires_grad_()
    y = layer(x).y
    decision = layer.route(x)
    y_ref = reference_moe(x, decision.expert_ids_TK, decision.weights_TK, layer.experts)
    assert_close_scaled(y, y_ref, dtype, "output")
    grads = torch.autograd.grad((y.float() * g_TD).sum(), [x] + params)
    grads_ref = torch.autograd.grad((y_ref.float() * g_TD).sum(), [x] + params)
    for name, a, b in zip(["x"] + [n for n, _ in layer.named_parameters()], grads, grads_ref):
        assert_close_scaled(a, b, dtype, f"grad {name}")


@pytest.mark.parametrize("path", [pytest.param(0, id="grouped"), pytest.param(64, id="decode")])
@pytest.mark.parametrize("activation", [pytest.param("swiglu", id="swiglu"), pytest.param("gelu", id="gelu")])
def test_one_expert_top1_layer_equals_dense_ffn(activation: str, path: int) -> None:
    """MegaBlocks' check: an MoE with one expert and top-1 routing is exactly a dense FFN."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=1, top_k=1, activation=activation)
    moe = MoELayer(cfg, experts=Experts(cfg, decode_max_rows=path))
    dense = DenseMLP(16, 32, activation)
    ex = moe.experts
    with torch.no_grad():
        if cfg.gated:
            dense.gate_proj.weight.copy_(ex.w_gate_EDF[0].t())
            dense.up_proj.weight.copy_(ex.w_up_EDF[0].t())
            dense.down_proj.weight.copy_(ex.w_down_EFD[0].t())
        else:
            dense.up_proj.weight.copy_(ex.w_in_EDF[0].t())
            dense.down_proj.weight.copy_(ex.w_out_EFD[0].t())
    x_TD = torch.randn(10, 16)
    y_moe, y_dense = moe(x_TD).y, dense(x_TD)
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-5, atol=1e-6)
    g_TD = torch.randn(10, 16)
    (y_moe * g_TD).sum().backward()
    (y_dense * g_TD).sum().backward()
    pairs = [(ex.w_down_EFD if cfg.gated else ex.w_out_EFD, dense.down_proj.weight),
             (ex.w_up_EDF if cfg.gated else ex.w_in_EDF, dense.up_proj.weight)]
    if cfg.gated:
        pairs.append((ex.w_gate_EDF, dense.gate_proj.weight))
    for w_moe, w_dense in pairs:
        torch.testing.assert_close(w_moe.grad[0], w_dense.grad.t(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32-loop-under-compile"),
                                   pytest.param(torch.bfloat16, id="bf16-grouped-mm-under-compile")])
def test_compiled_layer_equals_eager(dtype: torch.dtype) -> None:
    """torch.compile (graph breaks allowed) gives eager's outputs and gradients. Kept tiny: compiling is slow."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2)
    layer = MoELayer(cfg).to(dtype)
    compiled = torch.compile(layer)
    x_TD = torch.randn(8, 16).to(dtype)
    outs = []
    for module in (layer, compiled):
        x = x_TD.clone().requires_grad_()
        y = module(x).y
        grads = torch.autograd.grad(y.float().square().sum(),
                                    [x, layer.experts.w_gate_EDF, layer.router.gate.weight])
        outs.append((y, *grads))
    for what, a, b in zip(("y", "grad x", "grad w_gate", "grad router"), *outs):
        # bf16: inductor fuses silu(gate) * up in fp32 where eager rounds in between.
        assert_close_scaled(a, b, dtype, what)
