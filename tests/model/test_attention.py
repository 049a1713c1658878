"""Attention pieces vs slow references: the masked softmax core, RoPE, RoPE scaling vs transformers,
latent attention vs its expanded form, cross-layer KV sharing."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.model import MLAConfig, ModelConfig, RopeConfig
from moekit.model.attention import Attention, additive_mask, attend
from moekit.model.mla import MLAttention
from moekit.model.rope import apply_rope, inv_freq, rope_cos_sin
from tests.reference.attention import reference_attention, reference_rope

torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("H,K,window,softcap,sinks,past,chunk", [
    pytest.param(4, 4, None, None, False, 0, None, id="mha"),
    pytest.param(4, 2, None, None, False, 0, None, id="gqa"),
    pytest.param(4, 1, 3, None, False, 0, None, id="mqa-window"),
    pytest.param(2, 2, None, 0.7, False, 0, None, id="softcap"),
    pytest.param(4, 2, 2, None, True, 0, None, id="sinks-window"),
    pytest.param(4, 2, None, None, True, 3, None, id="sinks-with-past-keys"),
    pytest.param(4, 2, None, None, False, 2, 3, id="chunked-with-past-keys"),
])
def test_attend_matches_reference(H, K, window, softcap, sinks, past, chunk) -> None:
    torch.manual_seed(0)
    B, S, d = 2, 5, 6
    T = past + S
    q = torch.randn(B, H, S, d, requires_grad=True)
    k = torch.randn(B, K, T, d, requires_grad=True)
    v = torch.randn(B, K, T, d, requires_grad=True)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, 1] = False  # a padding key in the middle (every query still sees key 0)
    sinks_H = torch.randn(H) if sinks else None
    q_pos = torch.arange(past, T)
    mask = additive_mask(q_pos, torch.arange(T), window=window, chunk=chunk, key_mask_BT=key_mask,
                         dtype=torch.float32)
    out = attend(q, k, v, mask, scale=0.4, softcap=softcap, sinks_H=sinks_H)
    ref = reference_attention(q.detach(), k.detach(), v.detach(), q_positions=q_pos.tolist(), scale=0.4,
                              window=window, chunk=chunk, key_mask_BT=key_mask, softcap=softcap,
                              sinks_H=sinks_H)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_attend_gradients_match_an_explicit_softmax() -> None:
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = additive_mask(torch.arange(4), torch.arange(4), window=None, key_mask_BT=None, dtype=torch.float64)
    for kwargs in ({}, {"softcap": 2.0}):
        (gq, gk, gv) = torch.autograd.grad(attend(q, k, v, mask, scale=0.5, **kwargs).sum(), (q, k, v))
        logits = q @ k.transpose(-1, -2) * 0.5
        if kwargs:
            logits = 2.0 * torch.tanh(logits / 2.0)
        causal = torch.ones(4, 4, dtype=torch.bool).tril()
        expected = (logits.masked_fill(~causal, -math.inf).softmax(-1) @ v).sum()
        for g, e in zip((gq, gk, gv), torch.autograd.grad(expected, (q, k, v))):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("interleaved,partial", [
    pytest.param(False, 1.0, id="half"), pytest.param(True, 1.0, id="interleaved"),
    pytest.param(False, 0.5, id="partial-half"),
])
def test_apply_rope_matches_reference(interleaved: bool, partial: float) -> None:
    torch.manual_seed(0)
    d = 8
    rot = int(d * partial)
    rope = RopeConfig(theta=100.0, partial_rotary=partial, interleaved=interleaved)
    x = torch.randn(2, 3, 5, d)
    positions = [3, 4, 5, 6, 7]
    cos, sin = rope_cos_sin(rope, rot, torch.tensor(positions), max_seq_len=64, dtype=torch.float32)
    freqs = [100.0 ** (-2 * j / rot) for j in range(rot // 2)]
    ref = reference_rope(x[..., :rot], positions, freqs, interleaved=interleaved)
    out = apply_rope(x, cos, sin, interleaved=interleaved)
    torch.testing.assert_close(out[..., :rot].double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[..., rot:], x[..., rot:])  # the non-rotary dims pass through


def test_interleaved_rope_preserves_q_dot_k_of_the_interleaved_layout() -> None:
    """Our interleaved output is de-interleaved; the per-pair rotation (and so q.k) is DeepSeek-V2's."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8)
    rope = RopeConfig(interleaved=True)
    cos, sin = rope_cos_sin(rope, 8, torch.arange(4), max_seq_len=16, dtype=torch.float32)
    q_rot, k_rot = apply_rope(q, cos, sin, interleaved=True), apply_rope(k, cos, sin, interleaved=True)
    ours = q_rot @ k_rot.transpose(-1, -2)
    # DeepSeek-V2: complex multiplication of (x0 + i x1) by e^{i theta}.
    def complex_rope(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        angles = torch.arange(4)[:, None].float() * (10000.0 ** (-torch.arange(0, 8, 2).float() / 8))
        return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    theirs = complex_rope(q) @ complex_rope(k).transpose(-1, -2)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


ROPE_CASES = [
    pytest.param(RopeConfig(theta=1e4), {"rope_type": "default"}, 64, id="default"),
    pytest.param(RopeConfig(theta=1e4, scaling="linear", factor=4.0), {"rope_type": "linear", "factor": 4.0},
                 64, id="linear"),
    pytest.param(RopeConfig(theta=1e4, scaling="dynamic", factor=2.0),
                 {"rope_type": "dynamic", "factor": 2.0}, 200, id="dynamic-past-context"),
    pytest.param(RopeConfig(theta=1e4, scaling="yarn", factor=40.0, original_max_position=16, mscale=0.707,
                            mscale_all_dim=0.707),
                 {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16,
                  "mscale": 0.707, "mscale_all_dim": 0.707}, 64, id="yarn-deepseek"),
    pytest.param(RopeConfig(theta=15e4, scaling="yarn", factor=32.0, original_max_position=16,
                            truncate=False),
                 {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 16,
                  "truncate": False, "beta_fast": 32.0, "beta_slow": 1.0}, 64, id="yarn-gpt-oss"),
    pytest.param(RopeConfig(theta=5e5, scaling="llama3", factor=8.0, original_max_position=32),
                 {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32,
                  "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 64, id="llama3"),
    pytest.param(RopeConfig(theta=1e4, scaling="longrope", original_max_position=16,
                            short_factor=(1.0, 1.5, 2.0, 3.0), long_factor=(2.0, 3.0, 4.0, 5.0)),
                 {"rope_type": "longrope", "original_max_position_embeddings": 16,
                  "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 4.0, 5.0]}, 10,
                 id="longrope-short"),
    pytest.param(RopeConfig(theta=1e4, scaling="longrope", original_max_position=16,
                            short_factor=(1.0, 1.5, 2.0, 3.0), long_factor=(2.0, 3.0, 4.0, 5.0)),
                 {"rope_type": "longrope", "original_max_position_embeddings": 16,
                  "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 4.0, 5.0]}, 40,
                 id="longrope-long"),
]


@pytest.mark.parametrize("rope,hf_params,seq_len", ROPE_CASES)
def test_inv_freq_matches_transformers(rope: RopeConfig, hf_params: dict, seq_len: int) -> None:
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    from transformers import LlamaConfig

    hf = LlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
                     rope_parameters={"rope_theta": rope.theta, **hf_params})
    if hf_params["rope_type"] == "default":
        expected = 1.0 / (rope.theta ** (torch.arange(0, 8, 2).float() / 8))
        expected_scale = 1.0
    else:
        fn = rope_utils.ROPE_INIT_FUNCTIONS[hf_params["rope_type"]]
        kwargs = {"seq_len": seq_len} if hf_params["rope_type"] in ("dynamic", "longrope") else {}
        expected, expected_scale = fn(hf, None, **kwargs)
    ours, scale = inv_freq(rope, 8, seq_len=seq_len, max_seq_len=64)
    torch.testing.assert_close(ours, expected.float())
    assert scale == pytest.approx(expected_scale)


def _model_cfg(**kw) -> ModelConfig:
    return ModelConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2, d_ff=16, moe_layers="none", **kw)


def test_latent_attention_equals_explicit_per_head_keys_and_values() -> None:
    """MLA: k_h = [W_uk,h c_kv ; rope(k_r)], v_h = W_uv,h c_kv (DeepSeek-V2 eqs. 9-17), then attention."""
    torch.manual_seed(0)
    m = MLAConfig(q_lora_rank=6, kv_lora_rank=5, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=3)
    cfg = _model_cfg(mla=m, rope=RopeConfig(interleaved=True))
    attn = MLAttention(cfg, 0)
    B, S, H = 1, 4, 2
    x = torch.randn(B, S, 16)
    cos, sin = rope_cos_sin(cfg.rope, 4, torch.arange(S), max_seq_len=64, dtype=torch.float32)
    mask = additive_mask(torch.arange(S), torch.arange(S), window=None, key_mask_BT=None, dtype=torch.float32)
    y, _ = attn(x, cos_sin=(cos, sin), mask_B1ST=mask)

    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    q = attn.q_b_proj(rms(attn.q_a_proj(x), attn.q_a_layernorm.weight)).view(B, S, H, 8).transpose(1, 2)
    ckv, kr = attn.kv_a_proj_with_mqa(x).split([5, 4], -1)
    ckv = rms(ckv, attn.kv_a_layernorm.weight)
    w_kv = attn.kv_b_proj.weight.view(H, 4 + 3, 5)
    k_nope = torch.einsum("bsc,hnc->bhsn", ckv, w_kv[:, :4])
    v = torch.einsum("bsc,hvc->bhsv", ckv, w_kv[:, 4:])
    q_rot = apply_rope(q[..., 4:], cos, sin, interleaved=True)
    k_rot = apply_rope(kr[:, None], cos, sin, interleaved=True).expand(B, H, S, 4)
    k = torch.cat((k_nope, k_rot), -1)
    ref = reference_attention(torch.cat((q[..., :4], q_rot), -1).detach(), k.detach(), v.detach(),
                              q_positions=list(range(S)), scale=8 ** -0.5)
    expected = attn.o_proj(ref.float().transpose(1, 2).reshape(B, S, H * 3))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_kv_sharing_layer_attends_over_the_source_layers_keys() -> None:
    torch.manual_seed(0)
    cfg = _model_cfg(kv_share_every=2, n_kv_heads=1)
    src, dst = Attention(cfg, 0), Attention(cfg, 1)
    assert not hasattr(dst, "k_proj") and not hasattr(dst, "v_proj")
    x0, x1 = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    cos, sin = rope_cos_sin(cfg.rope, 8, torch.arange(3), max_seq_len=64, dtype=torch.float32)
    mask = additive_mask(torch.arange(3), torch.arange(3), window=None, key_mask_BT=None, dtype=torch.float32)
    _, kv = src(x0, cos_sin=(cos, sin), mask_B1ST=mask)
    y, kv_used = dst(x1, cos_sin=(cos, sin), mask_B1ST=mask, shared_kv=kv)
    assert kv_used[0] is kv[0]
    q = apply_rope(dst.q_proj(x1).view(1, 3, 2, 8).transpose(1, 2), cos, sin)
    ref = reference_attention(q.detach(), kv[0].detach(), kv[1].detach(), q_positions=[0, 1, 2],
                              scale=8 ** -0.5)
    expected = dst.o_proj(ref.float().transpose(1, 2).reshape(1, 3, 16))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shares K/V"):
        dst(x1, cos_sin=(cos, sin), mask_B1ST=mask)


def _rms(t: torch.Tensor, w: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    out = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    return out if w is None else out * w


@pytest.mark.parametrize("opts", [
    pytest.param(dict(qk_norm="head"), id="qwen3-head-norm"),
    pytest.param(dict(qk_norm="full", clip_qkv=0.3), id="olmoe-full-norm-then-clip"),
    pytest.param(dict(qk_norm="head_after_rope", n_kv_heads=1), id="hunyuan-head-norm-after-rope"),
    pytest.param(dict(qk_norm="l2", n_kv_heads=1), id="llama4-l2-after-rope"),
    pytest.param(dict(clip_qkv=0.2, qkv_bias=True, o_bias=True), id="dbrx-clip-biases"),
    pytest.param(dict(rope=RopeConfig(partial_rotary=0.5), attn_scale=0.3), id="partial-rope-scale"),
])
def test_attention_module_matches_explicit_formulas(opts: dict) -> None:
    """q, k, v built by hand in each family's order (norm -> clip -> heads -> RoPE), then the reference."""
    torch.manual_seed(0)
    cfg = _model_cfg(**opts)
    attn = Attention(cfg, 0)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # norms away from 1, biases away from 0
    B, S, H, K, hd = 2, 4, 2, cfg.kv_heads, 8
    x = torch.randn(B, S, 16)
    rot = int(hd * cfg.rope.partial_rotary)
    cos, sin = rope_cos_sin(cfg.rope, rot, torch.arange(S), max_seq_len=64, dtype=torch.float32)
    mask = additive_mask(torch.arange(S), torch.arange(S), window=None, key_mask_BT=None, dtype=torch.float32)
    y, _ = attn(x, cos_sin=(cos, sin), mask_B1ST=mask)

    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if cfg.qk_norm == "full":
        q, k = _rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight)
    if cfg.clip_qkv:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q, k, v = (t.view(B, S, -1, hd).transpose(1, 2) for t in (q, k, v))
    if cfg.qk_norm == "head":
        q, k = _rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cfg.qk_norm == "head_after_rope":
        q, k = _rms(q, attn.q_norm.weight), _rms(k, attn.k_norm.weight)
    if cfg.qk_norm == "l2":
        q, k = _rms(q, None), _rms(k, None)
    scale = cfg.attn_scale if cfg.attn_scale is not None else hd ** -0.5
    ref = reference_attention(q.detach(), k.detach(), v.detach(), q_positions=list(range(S)), scale=scale)
    expected = attn.o_proj(ref.float().transpose(1, 2).reshape(B, S, H * hd))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_mixture_of_attention_matches_transformers_jetmoe() -> None:
    """JetMoE MoA vs transformers' JetMoeAttention with the same weights (our layout: E x D x A)."""
    jet = pytest.importorskip("transformers.models.jetmoe.modeling_jetmoe")
    from transformers import JetMoeConfig

    from moekit.config import MoEConfig
    from moekit.model.moa import MixtureOfAttention

    torch.manual_seed(0)
    hf_cfg = JetMoeConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, kv_channels=8,
                          num_local_experts=4, num_experts_per_tok=2, intermediate_size=16, vocab_size=16,
                          max_position_embeddings=64, attn_implementation="eager")
    hf_attn = jet.JetMoeAttention(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in hf_attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=16,
                      moe_layers="none", moa=MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2,
                                                       softmax_after_topk=True))
    ours = MixtureOfAttention(cfg, 0)
    with torch.no_grad():
        ours.router.gate.weight.copy_(hf_attn.experts.router.layer.weight)
        ours.kv_proj.weight.copy_(hf_attn.kv_proj.weight)
        ours.w_q_EDA.copy_(hf_attn.experts.input_linear.weight.transpose(1, 2))
        ours.w_o_EAD.copy_(hf_attn.experts.output_linear.weight.transpose(1, 2))
        ours.bias.copy_(hf_attn.experts.bias)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf_attn.parameters())

    B, S = 2, 5
    x = torch.randn(B, S, 32)
    cos, sin = jet.JetMoeRotaryEmbedding(hf_cfg)(x, torch.arange(S)[None])
    causal = torch.full((S, S), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        expected = hf_attn(x, attention_mask=causal, position_embeddings=(cos, sin))[0]
        our_cs = rope_cos_sin(cfg.rope, 8, torch.arange(S), max_seq_len=64, dtype=torch.float32)
        mask = additive_mask(torch.arange(S), torch.arange(S), window=None, key_mask_BT=None,
                             dtype=torch.float32)
        y, _, decision, aux = ours(x, cos_sin=our_cs, mask_B1ST=mask)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert decision.expert_ids_TK.shape == (B * S, 2) and aux["load_balance"] > 0


@pytest.mark.parametrize("family", ["dbrx", "phimoe"])
def test_attention_matches_transformers_module(family: str) -> None:
    """DBRX (fused Wqkv, clip_qkv, no biases) and Phi-3.5-MoE (q/k/v/o biases) attention vs transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    B, S = 2, 6
    if family == "dbrx":
        from transformers.models.dbrx import modeling_dbrx as m

        hf_cfg = transformers.DbrxConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=64, vocab_size=16,
                                         attn_config={"kv_n_heads": 2, "clip_qkv": 0.4, "rope_theta": 5e5},
                                         # transformers 5.23's DBRX rotary reads rope_parameters,
                                         # not attn_config.rope_theta: give both
                                         rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                         attn_implementation="eager")
        hf = m.DbrxAttention(hf_cfg, layer_idx=0).eval()
        rope_module = m.DbrxRotaryEmbedding(hf_cfg)
        cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=8,
                          moe_layers="none", clip_qkv=0.4, rope=RopeConfig(theta=5e5))
    else:
        from transformers.models.phimoe import modeling_phimoe as m

        hf_cfg = transformers.PhimoeConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                           num_hidden_layers=1, vocab_size=16, max_position_embeddings=64,
                                           rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                           attention_bias=True, attn_implementation="eager")
        hf = m.PhimoeAttention(hf_cfg, layer_idx=0).eval()
        rope_module = m.PhimoeRotaryEmbedding(hf_cfg)
        cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=8,
                          moe_layers="none", qkv_bias=True, o_bias=True, rope=RopeConfig(theta=1e4))
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = Attention(cfg, 0)
    with torch.no_grad():
        if family == "dbrx":
            q, k, v = hf.Wqkv.weight.split([32, 16, 16], dim=0)
            ours.q_proj.weight.copy_(q), ours.k_proj.weight.copy_(k), ours.v_proj.weight.copy_(v)
            ours.o_proj.weight.copy_(hf.out_proj.weight)
        else:
            ours.load_state_dict(hf.state_dict())
    x = torch.randn(B, S, 32)
    causal = torch.full((S, S), torch.finfo(torch.float32).min).triu(1)[None, None]
    with torch.no_grad():
        cos, sin = rope_module(x, torch.arange(S)[None])
        expected = hf(x, attention_mask=causal, position_embeddings=(cos, sin))[0]
        mask = additive_mask(torch.arange(S), torch.arange(S), window=None, key_mask_BT=None,
                             dtype=torch.float32)
        cos_sin = rope_cos_sin(cfg.rope, 8, torch.arange(S), max_seq_len=64, dtype=torch.float32)
        y, _ = ours(x, cos_sin=cos_sin, mask_B1ST=mask)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
