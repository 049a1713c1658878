"""moekit's CPU grouped GEMM (`moekit.kernels.cpu.grouped_mm`) against a loop of plain matmuls in
float64: both of torch._grouped_mm's cases, fp32 and bf16, empty groups, odd sizes on both sides of
the register tile and of the depth block, any strides; the same bits at any thread count."""

from __future__ import annotations

import pytest
import torch

from moekit.kernels import cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason="moekit's CPU kernels are not built here")


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    ends = torch.tensor(counts).cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends))


def _tol(dtype: torch.dtype, depth: int) -> float:
    return 1e-5 * depth ** 0.5 if dtype == torch.float32 else 1e-2


# (rows per group, D, F): few rows (read in place), many rows (packed), depth past one block (256),
# sizes off the 6 x 16 tile, empty groups first, in the middle and last.
SHAPES = [([3, 0, 5, 1], 24, 40), ([40, 0, 70, 0], 37, 50), ([0, 9, 300], 300, 33), ([17, 16, 2], 8, 129)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts,D,F", SHAPES)
def test_rows_grouped_equals_per_expert_matmuls(counts, D, F, dtype):
    g = torch.Generator().manual_seed(0)
    E, R = len(counts), sum(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(R, D, generator=g).to(dtype)
    for w in (torch.randn(E, F, D, generator=g).to(dtype).transpose(1, 2),  # stored (out, in): forward
              torch.randn(E, D, F, generator=g).to(dtype)):                 # stored (in, out): input grad
        ref = torch.cat([x[lo:hi].double() @ w[e].double() for e, (lo, hi) in enumerate(_bounds(counts))])
        out = cpu.grouped_mm(x, w, offs)
        assert out.dtype == dtype and out.shape == (R, F)
        torch.testing.assert_close(out.double(), ref, atol=_tol(dtype, D) * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts,D,F", SHAPES)
def test_depth_grouped_is_each_experts_weight_gradient(counts, D, F, dtype):
    g = torch.Generator().manual_seed(1)
    R = sum(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(R, D, generator=g).to(dtype)
    grad = torch.randn(R, F, generator=g).to(dtype)
    out = cpu.grouped_mm(grad.t(), x, offs)  # (E, F, D): the layout the weights are stored in
    ref = torch.stack([grad[lo:hi].double().t() @ x[lo:hi].double() for lo, hi in _bounds(counts)])
    assert out.shape == (len(counts), F, D)
    scale = max(ref.abs().max().item(), 1.0)
    torch.testing.assert_close(out.double(), ref, atol=_tol(dtype, max(counts)) * scale, rtol=0)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.count_nonzero(out[e]) == 0  # an expert without rows gets exactly zero


def test_bf16_is_the_fp32_product_rounded_once():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 64, generator=g).bfloat16()
    w = torch.randn(2, 64, 48, generator=g).bfloat16()
    offs = torch.tensor([20, 50], dtype=torch.int32)
    bf = cpu.grouped_mm(x, w, offs)
    fp = cpu.grouped_mm(x.float(), w.float(), offs)
    assert torch.equal(bf, fp.bfloat16())


def test_same_bits_at_any_thread_count_and_row_grouping():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 96, generator=g)
    w = torch.randn(4, 80, 96, generator=g).transpose(1, 2)
    offs = torch.tensor([100, 200, 300, 400], dtype=torch.int32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.grouped_mm(x, w, offs)
        torch.set_num_threads(2)
        two = cpu.grouped_mm(x, w, offs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    # Expert 1's rows alone give the same bits as inside the full call.
    alone = cpu.grouped_mm(x[100:200], w[1:2], torch.tensor([100], dtype=torch.int32))
    assert torch.equal(alone, one[100:200])


def test_rows_past_the_last_group_are_zero_and_bad_offsets_are_refused():
    x = torch.randn(10, 8)
    w = torch.randn(2, 8, 4)
    out = cpu.grouped_mm(x, w, torch.tensor([3, 7], dtype=torch.int32))
    assert torch.count_nonzero(out[7:]) == 0
    with pytest.raises(ValueError, match="non-decreasing"):
        cpu.grouped_mm(x, w, torch.tensor([5, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="at most 10"):
        cpu.grouped_mm(x, w, torch.tensor([3, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match="needs b"):
        cpu.grouped_mm(x, torch.randn(3, 8, 4), torch.tensor([3, 7], dtype=torch.int32))


def test_the_experts_run_their_fp32_forward_products_here_and_their_gradients_on_torch(monkeypatch):
    """`Experts` take moekit's kernel for every fp32 forward product (weights stored (out, in)),
    however many rows each expert gets, and torch's for the fp32 input and weight gradients."""
    from moekit.config import MoEConfig
    from moekit.experts import grouped

    calls = []
    real = cpu.grouped_mm
    monkeypatch.setattr(grouped.cpu_kernels, "grouped_mm",
                        lambda a, b, offs: calls.append((tuple(a.shape), tuple(b.shape))) or real(a, b, offs))
    cfg = MoEConfig(d_model=16, d_ff=24, num_experts=4, top_k=1)
    experts = grouped.Experts(cfg)
    counts = torch.tensor([100, 0, 60, 40])  # 50 rows per expert on average: far past a decode step
    x = torch.randn(200, 16, requires_grad=True)
    y = experts(x, counts)
    assert calls == [((200, 16), (4, 16, 24))] * 2 + [((200, 24), (4, 24, 16))]
    y.square().sum().backward()
    assert len(calls) == 3
