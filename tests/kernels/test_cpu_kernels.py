"""The CPU kernels (`moekit.kernels.cpu`) against plain fp64 maths: few-row products with (out, in)
weights, every routed slot's expert output (gated and plain activations, biases, experts with no
rows, unrouted slots, one expert at a time), the MoE layer's decode path against its dispatch path,
and the fallback when the kernels cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.experts.activations import glu, plain
from moekit.kernels import cpu
from moekit.layer import MoELayer

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ compiler: the kernels are not built")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("K", [8, 13, 48, 70])  # multiples of the vector width and tails
def test_linear_rows_equals_fp64_linear(dtype, rows, K):
    N = 37
    big = torch.randn(N, K + 5, generator=_gen(0)).to(dtype)
    w = big[:, 3:3 + K]  # rows K + 5 apart: the row stride is honoured
    b = torch.randn(N, generator=_gen(1)).to(dtype)
    x = torch.randn(rows, K, generator=_gen(2)).to(dtype)
    with torch.no_grad():
        got = cpu.linear_rows(x, w, b)
        got_nobias = cpu.linear_rows(x[None], w)  # leading dims kept
    assert got.dtype == dtype and got.shape == (rows, N) and got_nobias.shape == (1, rows, N)
    want = F.linear(x.double(), w.double(), b.double())
    # fp32 accumulation, one rounding to the dtype at the end
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 1e-2}
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(got_nobias[0].double(), F.linear(x.double(), w.double()), **tol)


def test_linear_rows_refuses_a_column_major_weight():
    w = torch.randn(8, 16).t().contiguous().t()
    with torch.no_grad(), pytest.raises(ValueError, match="unit stride"):
        cpu.linear_rows(torch.randn(1, 16), w)


def _experts(E: int, D: int, F_: int, gated: bool, bias: bool, dtype: torch.dtype):
    """(projections in Experts' logical shapes, stored (out, in) per expert, as fp64 copies too)."""
    g = _gen(3)
    n_in = 2 if gated else 1
    ws = [torch.randn(E, F_, D, generator=g).mul(0.3).to(dtype).transpose(1, 2) for _ in range(n_in)]
    ws.append(torch.randn(E, D, F_, generator=g).mul(0.3).to(dtype).transpose(1, 2))
    bs = [torch.randn(E, F_, generator=g).to(dtype) if bias else None for _ in range(n_in)]
    bs.append(torch.randn(E, D, generator=g).to(dtype) if bias else None)
    return list(zip(ws, bs))


def _reference_slots(x_TD, ids_TK, projections, activation, gated):
    """o[t, k] = expert ids[t, k](x[t]) in fp64, a plain loop; zeros for id -1."""
    T, K = ids_TK.shape
    D = x_TD.shape[1]
    o = torch.zeros(T, K, D, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            e = int(ids_TK[t, k])
            if e < 0:
                continue
            hs = [x_TD[t].double() @ w[e].double() + (0 if b is None else b[e].double())
                  for w, b in projections[:-1]]
            h = glu(hs[0], hs[1], activation) if gated else plain(hs[0], activation)
            w, b = projections[-1]
            o[t, k] = h @ w[e].double() + (0 if b is None else b[e].double())
    return o


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["swiglu", "geglu", "clamped_swiglu", "gelu", "relu", "silu"])
@pytest.mark.parametrize("bias", [False, True])
def test_expert_rows_equals_reference(dtype, activation, bias):
    E, D, F_, T, K = 6, 24, 20, 5, 3
    gated = activation in ("swiglu", "geglu", "clamped_swiglu")
    projections = _experts(E, D, F_, gated, bias, dtype)
    x = torch.randn(T, D, generator=_gen(4)).to(dtype)
    # experts 2 and 5 get no rows; two slots are unrouted (-1); expert 1 gets 5 rows (more than 4)
    ids = torch.tensor([[0, 1, -1], [1, 3, 4], [1, 0, 3], [4, 1, -1], [1, 3, 0]])
    pointers = cpu.expert_pointers(projections, activation)
    assert pointers is not None
    with torch.no_grad():
        got = cpu.expert_rows(x, ids, pointers)
    want = _reference_slots(x, ids, projections, activation, gated)
    assert got.dtype == torch.float32 and got.shape == (T, K, D)
    assert torch.all(got[ids < 0] == 0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # one expert at a time, as offloaded experts run, fills the same values bit for bit
    one_by_one = torch.zeros(T, K, D)
    for e in (4, 0, 3, 1, 2, 5):  # any order, experts without rows included
        single = cpu.expert_pointers([(w[e], None if b is None else b[e]) for w, b in projections], activation,
                                     expert=e, num_experts=E)
        with torch.no_grad():
            cpu.expert_rows(x, ids, single, only=e, out_TKD=one_by_one)
    assert torch.equal(one_by_one, got)


def test_expert_pointers_refuse_row_major_expert_weights():
    w = torch.randn(4, 8, 6)  # (E, in, out) contiguous: not stored (out, in)
    assert cpu.expert_pointers([(w, None), (w, None), (torch.randn(4, 6, 8), None)], "swiglu") is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared", [False, True])
def test_moe_layer_decode_kernel_equals_dispatch_path(dtype, shared):
    cfg = MoEConfig(d_model=32, d_ff=24, num_experts=8, top_k=2, num_shared_experts=int(shared))
    torch.manual_seed(0)
    layer = MoELayer(cfg).to(dtype).eval()
    x = torch.randn(3, 32).to(dtype)
    with torch.no_grad():
        decision = layer.route(x)
        fast = layer.few_rows(x, decision)
        x_RD, counts_E, plan = layer.dispatcher.dispatch(x, decision)
        slow = layer.dispatcher.combine(layer.experts(x_RD, counts_E), plan)
        via_forward = layer(x).y
    assert fast is not None and fast.dtype == dtype
    # the kernel keeps fp32 between the projections, the dispatch path rounds each to the dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}
    torch.testing.assert_close(fast.float(), slow.float(), **tol)
    dense = 0 if layer.shared_experts is None else layer.shared_experts(x)
    torch.testing.assert_close(via_forward.float(), (fast + dense).float(), rtol=1e-6, atol=1e-6)
    with torch.enable_grad():
        assert layer.few_rows(x, decision) is None  # training keeps the differentiable path


def test_without_a_compiler_the_kernels_are_unavailable_and_layers_fall_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "/bin/false")  # `--version` fails: no usable compiler
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="unavailable"):
        assert cpu._library.__wrapped__() is None
    monkeypatch.setattr(cpu, "available", lambda: False)
    layer = MoELayer(MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2)).eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert layer.few_rows(x, layer.route(x)) is None
        assert layer(x).y.shape == (2, 16)


def test_build_failure_is_reported_and_nothing_is_left_behind(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu, "_SOURCES", (broken,))
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="failed on broken.cpp"):
        assert cpu._library.__wrapped__() is None
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # no half-written library


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MOEKIT_KERNELS", "0")
    assert cpu._library.__wrapped__() is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 37), (2, 4, 8)])
def test_rmsnorm_kernel_equals_torch_norm(dtype, shape):
    from moekit.model.norm import RMSNorm

    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=_gen(5)))
    norm = norm.to(dtype)
    x = (torch.randn(*shape, generator=_gen(6)) * 3).to(dtype)
    with torch.no_grad():
        got = norm(x)  # the kernel
    with torch.enable_grad():
        want = norm(x)  # the torch ops (autograd on: no kernel)
    assert got.dtype == want.dtype == dtype and got.shape == x.shape
    # fp32: summation order only; bf16: at most one bf16 step where the two round differently
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 8e-3, "atol": 8e-3}
    torch.testing.assert_close(got.float(), want.detach().float(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("partial", [False, True])
def test_rope_kernel_equals_torch_rope(dtype, interleaved, partial):
    from moekit.model.rope import apply_rope

    B, H, S, d = 1, 3, 2, 16
    R = 4 if partial else d // 2  # partial rotary: the last d - 2R dims pass through
    x = torch.randn(B, S, H, d, generator=_gen(7)).to(dtype).transpose(1, 2)  # the attention's view
    angles = torch.rand(S, R, generator=_gen(8)) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    with torch.no_grad():
        got = cpu.rope(x, cos, sin, interleaved=interleaved)
        routed = apply_rope(x, cos, sin, interleaved=interleaved)
    with torch.enable_grad():
        want = apply_rope(x, cos, sin, interleaved=interleaved)  # the torch ops
    # the same products and sums, each rounded to the dtype as torch rounds them: equal bits
    assert torch.equal(got, want.detach()) and torch.equal(routed, got)
    # per-row positions (the batching engine's rows): (B, 1, S, R) tables
    xb = torch.randn(2, S, H, d, generator=_gen(14)).to(dtype).transpose(1, 2)
    angles_b = torch.rand(2, 1, S, R, generator=_gen(15)) * 6
    cos_b, sin_b = angles_b.cos().to(dtype), angles_b.sin().to(dtype)
    with torch.no_grad():
        got_b = apply_rope(xb, cos_b, sin_b, interleaved=interleaved)
    with torch.enable_grad():
        want_b = apply_rope(xb, cos_b, sin_b, interleaved=interleaved)
    assert torch.equal(got_b, want_b.detach())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_attend_one_kernel_equals_reference(dtype, heads, kv_heads):
    from moekit.model.attention import additive_mask
    from tests.reference.attention import reference_attention

    T, d = 11, 16
    q = torch.randn(1, heads, 1, d, generator=_gen(9)).to(dtype)
    # the cache's layout: rows of a larger buffer, positions beyond T unused
    k = torch.randn(1, kv_heads, T + 5, d, generator=_gen(10)).to(dtype)[:, :, :T]
    v = torch.randn(1, kv_heads, T + 5, d, generator=_gen(11)).to(dtype)[:, :, :T]
    mask = additive_mask(torch.tensor([8]), torch.arange(T), window=None, key_mask_BT=None, dtype=dtype)
    with torch.no_grad():
        got = cpu.attend_one(q, k, v, mask, 0.25)
    want = reference_attention(q.double(), k.double(), v.double(), q_positions=[8], scale=0.25, window=None)
    assert got.dtype == dtype and got.shape == (1, heads, 1, d)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shared_mask", [pytest.param(False, id="mask-per-row"), pytest.param(True, id="one-mask")])
def test_attend_one_kernel_takes_a_batch_of_sequences_at_their_own_positions(dtype, shared_mask):
    from moekit.model.attention import additive_mask
    from tests.reference.attention import reference_attention

    B, H, K, T, d = 3, 4, 2, 9, 8
    q = torch.randn(B, H, 1, d, generator=_gen(12)).to(dtype)
    # every second slot of a larger cache buffer: a batch stride that is not B-contiguous
    k = torch.randn(2 * B, K, T + 4, d, generator=_gen(13)).to(dtype)[::2, :, :T]
    v = torch.randn(2 * B, K, T + 4, d, generator=_gen(14)).to(dtype)[::2, :, :T]
    positions = [8, 8, 8] if shared_mask else [8, 3, 5]  # rows behind the batch see fewer keys
    q_pos = torch.tensor([positions[0]]) if shared_mask else torch.tensor(positions)[:, None]
    mask = additive_mask(q_pos, torch.arange(T), window=None, key_mask_BT=None, dtype=dtype)
    assert mask.shape[0] == (1 if shared_mask else B)
    with torch.no_grad():
        got = cpu.attend_one(q, k, v, mask, 0.3)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    for b, pos in enumerate(positions):
        want = reference_attention(q[b:b + 1].double(), k[b:b + 1].double(), v[b:b + 1].double(),
                                   q_positions=[pos], scale=0.3, window=None)
        torch.testing.assert_close(got[b:b + 1].double(), want, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", [
    pytest.param({}, id="softmax-renormalised"),
    pytest.param({"softmax_after_topk": True}, id="mixtral"),
    pytest.param({"normalize_topk": False, "router_bias": True}, id="no-renorm-bias"),
    pytest.param({"score_func": "sigmoid", "expert_bias": True, "routed_scaling_factor": 2.5}, id="deepseek-v3"),
])
def test_topk_route_kernel_equals_torch_router(dtype, variant):
    from moekit.routing.topk import TopKRouter

    cfg = MoEConfig(d_model=24, d_ff=8, num_experts=10, top_k=3, **variant)
    torch.manual_seed(0)
    router = TopKRouter(cfg).to(dtype).eval()
    if router.expert_bias is not None:
        router.expert_bias.copy_(torch.randn(10, generator=_gen(12)) * 0.1)
    x = torch.randn(5, 24, generator=_gen(13)).to(dtype)
    x[4] = 0  # every logit equal (the gate's bias aside): ties go to the lower expert index
    with torch.no_grad():
        fast = router(x)
    with torch.enable_grad():
        slow = router(x)
    assert torch.equal(fast.expert_ids_TK, slow.expert_ids_TK)
    assert torch.equal(fast.counts_E, slow.counts_E)
    for name in ("weights_TK", "logits_TE", "probs_TE"):
        got, want = getattr(fast, name), getattr(slow, name).detach()
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
