"""Fast-layout matmuls (moekit.experts.layout) against plain torch maths: values, gradients, the
layouts they choose, and the expert weights' (out, in) storage surviving casts and loading."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from moekit.config import MoEConfig
from moekit.experts.grouped import Experts, grouped_matmul
from moekit.experts.layout import (
    compute_dtype,
    is_transposed,
    linear,
    linear_layout,
    matmul,
    slow_reduced_matmul,
)

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def layouts(rows: int, cols: int, dtype: torch.dtype) -> dict[str, Tensor]:
    t = torch.randn(rows, cols).to(dtype)
    return {"row": t, "col": t.t().contiguous().t()}


def test_compute_dtype_is_fp32_for_several_rows_only_where_bf16_is_slow() -> None:
    x = torch.randn(4, 8).to(torch.bfloat16)
    expected = torch.float32 if slow_reduced_matmul(x) else torch.bfloat16
    assert compute_dtype(x, 4) == expected
    assert compute_dtype(x, 1) == torch.bfloat16  # one row per weight: bandwidth-bound, stays bf16
    assert compute_dtype(torch.randn(4, 8), 4) == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("la", ["row", "col"])
@pytest.mark.parametrize("lb", ["row", "col"])
def test_matmul_equals_torch_mm_with_gradients(dtype: torch.dtype, la: str, lb: str) -> None:
    a = layouts(9, 16, dtype)[la].requires_grad_()
    b = layouts(16, 11, dtype)[lb].requires_grad_()
    a_ref = a.detach().float().requires_grad_()
    b_ref = b.detach().float().requires_grad_()
    g = torch.randn(9, 11)
    y = matmul(a, b)
    y_ref = a_ref @ b_ref
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    (y.float() * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(a.grad.float(), a_ref.grad, **tol)
    torch.testing.assert_close(b.grad.float(), b_ref.grad, **tol)
    assert a.grad.dtype == dtype and b.grad.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_equals_functional_linear(dtype: torch.dtype) -> None:
    x = torch.randn(2, 5, 16).to(dtype).requires_grad_()
    w = torch.randn(8, 16).to(dtype).requires_grad_()
    b = torch.randn(8).to(dtype).requires_grad_()
    y = linear(x, w, b)
    ref = [t.detach().float().requires_grad_() for t in (x, w, b)]
    y_ref = torch.nn.functional.linear(*ref)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    g = torch.randn_like(y_ref)
    (y.float() * g).sum().backward()
    (y_ref * g).sum().backward()
    for t, r in zip((x, w, b), ref):
        torch.testing.assert_close(t.grad.float(), r.grad, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("w_layout", ["row", "col"])
def test_grouped_matmul_either_weight_layout_with_empty_experts(dtype: torch.dtype, w_layout: str) -> None:
    """Both weight layouts give the loop's values and gradients; experts without rows get exactly
    zero gradient; the weight gradient comes back in the weight's own layout."""
    E, D, F = 5, 16, 24
    counts_E = torch.tensor([3, 0, 9, 0, 4])
    w_row = torch.randn(E, D, F).to(dtype)
    w = (w_row if w_layout == "row" else w_row.transpose(1, 2).contiguous().transpose(1, 2)).requires_grad_()
    x = torch.randn(int(counts_E.sum()), D).to(dtype).requires_grad_()
    y = grouped_matmul(x, w, counts_E)
    x_ref, w_ref = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ends = counts_E.cumsum(0).tolist()
    y_ref = torch.cat([x_ref[end - n:end] @ w_ref[e] for e, (n, end) in enumerate(zip(counts_E.tolist(), ends))])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-1)
    torch.testing.assert_close(y.float(), y_ref, **tol)
    g = torch.randn_like(y_ref)
    (y.float() * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad.float(), x_ref.grad, **tol)
    torch.testing.assert_close(w.grad.float(), w_ref.grad, **tol)
    assert w.grad[1].abs().max() == 0 and w.grad[3].abs().max() == 0
    assert w.grad.stride() == w.stride() and w.grad.dtype == dtype


def test_expert_weights_are_stored_out_by_in_through_cast_and_load() -> None:
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2)
    ex = Experts(cfg)
    other = Experts(cfg).to(torch.bfloat16)
    other.load_state_dict({k: v.to(torch.bfloat16).contiguous() for k, v in ex.state_dict().items()})
    for m in (ex, other):
        assert m.w_gate_EDF.shape == (4, 16, 32) and m.w_down_EFD.shape == (4, 32, 16)
        for p in m.parameters():
            assert is_transposed(p), "expert weights are (out, in) per expert"
    assert torch.equal(other.w_up_EDF.float(), ex.w_up_EDF.to(torch.bfloat16).float())


def test_linear_layout_shape_and_strides() -> None:
    t = linear_layout(3, n_in=4, n_out=6)
    assert t.shape == (3, 4, 6) and t.stride() == (24, 1, 4)


@pytest.mark.skipif(not slow_reduced_matmul(torch.zeros(1, dtype=torch.bfloat16)),
                    reason="this CPU has bf16 matrix instructions: bf16 products stay bf16")
def test_bf16_grouped_product_is_the_fp32_product_rounded_once() -> None:
    counts_E = torch.tensor([5, 0, 11, 3])
    x = torch.randn(19, 16).to(torch.bfloat16)
    w = linear_layout(4, n_in=16, n_out=24).copy_(torch.randn(4, 16, 24)).to(torch.bfloat16)
    want = torch.cat([x[lo:hi].float() @ w[e].float() for e, lo, hi in
                      [(0, 0, 5), (2, 5, 16), (3, 16, 19)]]).to(torch.bfloat16)
    assert torch.equal(grouped_matmul(x, w, counts_E), want)
