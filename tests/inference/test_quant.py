"""Quantized experts: the kernels against dequantize-then-matmul, next-token agreement with the
fp32 model on held-out text of a small trained model, offloaded == in memory, the stored layout."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.inference.offload import load_quantized
from moekit.inference.quant import (
    QuantFormat,
    dequantize,
    quant_matmul,
    quantize_int4,
    quantize_int8,
    quantize_model,
    reference_matmul,
    save_quantized,
)
from tests.inference.offload_helpers import greedy_logits
from tests.train.helpers import fixture_data, make_trainer, tiny_model_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer MoE (4 experts, top-2) trained for a few seconds on the committed fixture corpus."""
    config = tiny_model_config(noisy_gating=False)
    config = replace(config, moe=replace(config.moe, d_ff=64))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model: thread hand-offs cost more than the matmuls
    try:
        trainer = make_trainer(tmp_path_factory.mktemp("run"), model_config=config, steps=60, checkpoint_every=0,
                               eval_every=1000, batch_size=8, grad_accum=1)
        trainer.fit()
    finally:
        torch.set_num_threads(before)
    return trainer.model.eval()


def held_out(n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    val = fixture_data().val
    return val.batch(torch.arange(min(n, val.num_sequences)))


def agreement_and_ppl(model, ref) -> tuple[float, float, float]:
    inputs, targets = held_out()
    with torch.no_grad():
        a, b = model(inputs, targets_BS=targets), ref(inputs, targets_BS=targets)
    agree = (a.logits.argmax(-1) == b.logits.argmax(-1)).float().mean().item()
    return agree, a.loss.exp().item(), b.loss.exp().item()


@pytest.mark.parametrize("method, floor", [("int8", 0.99), ("int4", 0.90)])
def test_next_token_agreement_on_held_out_text(trained, method, floor, tmp_path):
    import copy

    quantized = quantize_model(copy.deepcopy(trained), method)
    agree, ppl_q, ppl = agreement_and_ppl(quantized, trained)
    print(f"{method}: next-token agreement {agree:.4f}, perplexity {ppl:.3f} -> {ppl_q:.3f}")
    assert ppl < 200, "the fixture model did not train; agreement on noise would mean little"
    assert agree >= floor
    assert abs(ppl_q / ppl - 1) < (0.02 if method == "int8" else 0.10)


def test_int8_attention_too(trained):
    import copy

    quantized = quantize_model(copy.deepcopy(trained), "int8", attention=True)
    agree, _, _ = agreement_and_ppl(quantized, trained)
    assert agree >= 0.98
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_saved_quantized_loads_in_memory_and_offloaded_bit_for_bit(trained, method, tmp_path):
    import copy

    quantized = quantize_model(copy.deepcopy(trained), method, attention=method == "int8")
    save_quantized(quantized, tmp_path)
    loaded = load_quantized(tmp_path)
    fmt = QuantFormat(trained.moe_layers()[0].config, torch.float32, method)
    offloaded = load_quantized(tmp_path, offload_experts=True, expert_cache=3 * fmt.spec().nbytes, prefetch=True)
    prompt = held_out(3)[0][:, :6]
    want = greedy_logits(quantized, prompt, 5)
    for other in (loaded, offloaded):
        for w, g in zip(want, greedy_logits(other, prompt, 5)):
            assert torch.equal(w, g)
    stats = offloaded.expert_cache.stats
    offloaded.expert_cache.close()
    assert stats.misses > 0 and stats.bytes_read <= (stats.misses + stats.prefetch_reads) * fmt.spec().nbytes
    meta = json.loads((tmp_path / "moekit_config.json").read_text())
    assert meta["quantize"]["method"] == method
    stored = load_file(tmp_path / "model.safetensors")
    q = stored["model.layers.0.mlp.experts.w_up_EDF_qweight"]
    assert q.dtype == (torch.int8 if method == "int8" else torch.uint8)
    assert "model.layers.0.mlp.experts.w_up_EDF" not in stored


def test_quantize_on_load_offloaded_equals_in_memory(tmp_path):
    from tests.hf.tiny import VOCAB, save_tiny

    save_tiny("mixtral", tmp_path, overrides=dict(intermediate_size=64))
    for method in ("int8", "int4"):
        mem = moekit.from_pretrained(tmp_path, quantize=method)
        fmt = QuantFormat(mem.moe_layers()[0].config, torch.float32, method)
        off = moekit.from_pretrained(tmp_path, quantize=method, offload_experts=True,
                                     expert_cache=fmt.spec().nbytes)
        prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
        for w, g in zip(greedy_logits(mem, prompt, 4), greedy_logits(off, prompt, 4)):
            assert torch.equal(w, g)


def test_scales_that_do_not_match_the_weights(trained, tmp_path):
    import copy

    save_quantized(quantize_model(copy.deepcopy(trained), "int4"), tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    key = "model.layers.1.mlp.experts.w_down_EFD_scales"
    tensors[key] = tensors[key][..., :-1].contiguous() if tensors[key].shape[-1] > 1 else tensors[key][:, :-1]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="scales do not match the weights"):
        load_quantized(tmp_path)


# ---- the maths against dequantize-then-matmul ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("M", [0, 1, 5])
def test_int8_matmul_matches_dequantized(dtype, M):
    """The int8 kernel path (bf16 activations, fp32 scales after) against dequantize-then-matmul: its
    extra error is below int8's own rounding of the weights."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 64, generator=g), torch.randn(M, 64, generator=g).to(dtype)
    q, s = quantize_int8(w)
    assert (dequantize(q, s, None, torch.float32) - w).abs().max() <= s.max() / 2 + 1e-6
    ref = x.float() @ dequantize(q, s, None, torch.float32).T
    assert torch.equal(reference_matmul(x.float(), q, s, None), ref)
    got = quant_matmul(x, q, s, None)
    assert got.dtype == dtype and got.shape == (M, 48)
    if M == 0:
        return
    exact = x.float() @ w.T
    assert (got.float() - ref).abs().max() < (ref - exact).abs().max()
    torch.testing.assert_close(got.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)
    strided = torch.empty(48, 128, dtype=torch.int8)[:, ::2]  # not contiguous: the reference path
    strided.copy_(q)
    torch.testing.assert_close(quant_matmul(x.float(), strided, s, None), ref, atol=1e-5, rtol=1e-5)


def test_int4_round_trip_error_is_within_half_a_step():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(1))
    q, s, z = quantize_int4(w, 32)
    err = (dequantize(q, s, z, torch.float32) - w).abs().view(16, 4, 32)
    assert (err <= s[..., None] / 2 + 1e-5).all()
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(torch.randn(4, 40), 32)
