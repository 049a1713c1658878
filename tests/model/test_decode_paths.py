"""The inference-only fast paths of a decode step agree with their references: `attend_one` (one
query, no gradients) with the loop reference attention, `linear` with F.linear in fp32, and an LM
head stored transposed (`lm_head_layout`) with the model as built, including after a save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.experts.layout import linear, slow_reduced_matmul
from moekit.model.attention import additive_mask, attend
from moekit.model.linear import lm_head_layout
from tests.reference.attention import reference_attention


@pytest.mark.parametrize("heads,kv_heads", [pytest.param(4, 4, id="mha"), pytest.param(4, 2, id="gqa"),
                                            pytest.param(6, 1, id="mqa")])
@pytest.mark.parametrize("window", [pytest.param(None, id="causal"), pytest.param(3, id="window3")])
def test_one_query_attention_equals_reference(heads, kv_heads, window):
    g = torch.Generator().manual_seed(0)
    T, d = 9, 8
    q = torch.randn(1, heads, 1, d, generator=g)
    k, v = torch.randn(1, kv_heads, T, d, generator=g), torch.randn(1, kv_heads, T, d, generator=g)
    pos = 6  # keys 7 and 8 lie in the future of the query: the mask must hide them
    mask = additive_mask(torch.tensor([pos]), torch.arange(T), window=window, key_mask_BT=None,
                         dtype=torch.float32)
    with torch.no_grad():
        fast = attend(q, k, v, mask, scale=0.3)
    want = reference_attention(q, k, v, q_positions=[pos], scale=0.3, window=window)
    torch.testing.assert_close(fast.double(), want, rtol=1e-5, atol=1e-6)
    with torch.enable_grad():  # the fused kernel path (gradients on) agrees too
        torch.testing.assert_close(attend(q, k, v, mask, scale=0.3), fast, rtol=1e-5, atol=1e-6)


def _weights(out: int, inp: int, dtype: torch.dtype, transposed: bool) -> torch.Tensor:
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(1)).to(dtype)
    return w.t().contiguous().t() if transposed else w


@pytest.mark.parametrize("rows", [pytest.param(1, id="one-row"), pytest.param(5, id="five-rows")])
@pytest.mark.parametrize("transposed", [pytest.param(False, id="row-major"), pytest.param(True, id="col-major")])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
def test_linear_equals_fp32_reference(rows, transposed, dtype):
    w = _weights(24, 16, dtype, transposed)
    b = torch.randn(24).to(dtype)
    x = torch.randn(rows, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = F.linear(x.double(), w.double(), b.double())
    with torch.no_grad():
        got = linear(x, w, b)
    assert got.dtype == dtype and got.shape == (rows, 24)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 2e-2}
    torch.testing.assert_close(got.double(), want, **tol)
    # with gradients: the same values, and the gradient reaches the weight
    w.requires_grad_()
    y = linear(x, w, b)
    torch.testing.assert_close(y.double(), want, **tol)
    y.float().sum().backward()
    torch.testing.assert_close(w.grad.double(), x.double().sum(0).expand(24, 16), **tol)


def test_slow_reduced_matmul_only_for_reduced_cpu_tensors():
    assert not slow_reduced_matmul(torch.zeros(2, dtype=torch.float32))
    expected = not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert slow_reduced_matmul(torch.zeros(2, dtype=torch.bfloat16)) == expected


@pytest.mark.parametrize("tied", [pytest.param(False, id="untied"), pytest.param(True, id="tied")])
def test_lm_head_layout_keeps_logits_and_checkpoints(tmp_path, tied):
    from moekit.load import from_pretrained
    from tests.inference.tiny import save_tiny_with_tokenizer

    save_tiny_with_tokenizer("qwen3_moe", tmp_path / "hf", tie_word_embeddings=tied)
    model = from_pretrained(tmp_path / "hf").eval()
    tokens = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        before = model(tokens).logits
        changed = lm_head_layout(model)
        after = model(tokens).logits
    assert changed is (not tied)
    assert model.lm_head.weight.shape == (model.config.vocab_size, model.config.d_model)
    assert (model.lm_head.weight.stride(0) == 1) is (not tied)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(str(tmp_path / "m"))
    reloaded = from_pretrained(tmp_path / "m").eval()
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
