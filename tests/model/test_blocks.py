"""Block-level variants against explicit compositions: multipliers and sandwich norms (Granite,
Grok-1), Mamba/attention interleaving, dense vs MoE feed-forward, and gpt-oss's clamped SwiGLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.experts.activations import glu
from moekit.layer import MoELayer
from moekit.model import ModelConfig, MoETransformer, RopeConfig
from moekit.model.accounting import num_params
from moekit.model.attention import additive_mask
from moekit.model.mamba import MambaConfig, MambaMixer
from moekit.model.rope import rope_cos_sin

D = 16


def _perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norm weights away from 1 so a misplaced norm shows


@pytest.mark.parametrize("opts", [
    pytest.param(dict(embedding_multiplier=12.0, residual_multiplier=0.22, logits_scaling=6.0, attn_scale=0.3,
                      tie_embeddings=True), id="granite-multipliers"),
    pytest.param(dict(post_norms=True, attn_logit_softcap=1.0, embedding_multiplier=4.0,
                      logits_scaling=1.7), id="grok-sandwich-norms"),
    pytest.param(dict(norm="layernorm", norm_bias=True, lm_head_bias=True), id="phimoe-layernorm-bias"),
])
def test_model_forward_equals_explicit_composition(opts: dict) -> None:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=D, d_ff=8, num_experts=4, top_k=2)
    cfg = ModelConfig(vocab_size=32, d_model=D, n_layers=2, n_heads=2, d_ff=24, moe=moe, moe_layers=(1,),
                      **opts)
    model = MoETransformer(cfg).eval()
    _perturb(model)
    tokens = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        out = model(tokens).logits
        x = model.model.embed_tokens(tokens) * cfg.embedding_multiplier
        cos_sin = rope_cos_sin(cfg.rope, 8, torch.arange(5), max_seq_len=cfg.max_seq_len, dtype=torch.float32)
        mask = additive_mask(torch.arange(5), torch.arange(5), window=None, key_mask_BT=None,
                             dtype=torch.float32)
        for layer in model.model.layers:
            h, _ = layer.self_attn(layer.input_layernorm(x), cos_sin=cos_sin, mask_B1ST=mask)
            if cfg.post_norms:
                h = layer.attn_out_norm(h)
            x = x + cfg.residual_multiplier * h
            h = layer.post_attention_layernorm(x)
            h = layer.mlp(h).y if isinstance(layer.mlp, MoELayer) else layer.mlp(h)
            if cfg.post_norms:
                h = layer.ffn_out_norm(h)
            x = x + cfg.residual_multiplier * h
        expected = model.lm_head(model.model.norm(x)) / cfg.logits_scaling
    torch.testing.assert_close(out, expected)
    assert isinstance(model.model.layers[1].mlp, MoELayer)
    assert not isinstance(model.model.layers[0].mlp, MoELayer)


def test_arctic_parallel_moe_block_equals_its_formula() -> None:
    """Arctic: y = h + residual_mlp(residual_layernorm(h)) + moe(post_attention_layernorm(x)),
    h = x + attn(input_layernorm(x)): the MoE reads the block input, not h."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=D, n_layers=1, n_heads=2, d_ff=24, moe_parallel=True,
                      moe=MoEConfig(d_model=D, d_ff=8, num_experts=4, top_k=2))
    model = MoETransformer(cfg).eval()
    _perturb(model)
    layer = model.model.layers[0]
    x = torch.randn(2, 5, D)
    cos_sin = rope_cos_sin(cfg.rope, 8, torch.arange(5), max_seq_len=cfg.max_seq_len, dtype=torch.float32)
    mask = additive_mask(torch.arange(5), torch.arange(5), window=None, key_mask_BT=None, dtype=torch.float32)
    with torch.no_grad():
        out = layer(x, cos_sin=cos_sin, mask_B1ST=mask)
        y, decision, aux = out.x, out.decision, out.aux_loss
        h = x + layer.self_attn(layer.input_layernorm(x), cos_sin=cos_sin, mask_B1ST=mask)[0]
        moe_out = layer.mlp(layer.post_attention_layernorm(x)).y
        expected = h + layer.residual_mlp(layer.residual_layernorm(h)) + moe_out
    torch.testing.assert_close(y, expected)
    assert decision is not None and aux is not None
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)


def test_jamba_style_stack_places_mamba_and_attention_layers() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=D, n_layers=4, n_heads=2, d_ff=24, rope=None,
                      moe=MoEConfig(d_model=D, d_ff=8, num_experts=4, top_k=2), moe_layers="every:2:1",
                      attention_layers="every:4:2", mamba=MambaConfig(d_model=D, d_state=4))
    model = MoETransformer(cfg)
    kinds = [(hasattr(layer, "self_attn"), isinstance(layer.mlp, MoELayer)) for layer in model.model.layers]
    assert kinds == [(False, False), (False, True), (True, False), (False, True)]
    assert all(isinstance(layer.mamba, MambaMixer) for i, layer in enumerate(model.model.layers) if i != 2)
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)


def test_mamba_layer_ignores_padding_tokens() -> None:
    """A padded (masked) prefix must not leak into the recurrent state of later real tokens."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=D, n_layers=1, n_heads=2, d_ff=24, rope=None, moe=None,
                      moe_layers="none", attention_layers="none", mamba=MambaConfig(d_model=D, d_state=4))
    model = MoETransformer(cfg).eval()
    tokens = torch.randint(1, 32, (1, 6))
    mask = torch.tensor([[False, False, True, True, True, True]])
    with torch.no_grad():
        padded = model(tokens, mask_BS=mask).logits[:, 2:]
        alone = model(tokens[:, 2:]).logits
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_clamped_swiglu_matches_gpt_oss() -> None:
    """transformers' GptOssExperts._apply_gate on interleaved gate/up columns vs our glu."""
    torch.manual_seed(0)
    gate, up = torch.randn(5, 7) * 6, torch.randn(5, 7) * 6  # well past the clamp limit of 7 in places
    g, u = gate.clamp(max=7.0), up.clamp(-7.0, 7.0)
    expected = (u + 1) * (g * torch.sigmoid(1.702 * g))
    torch.testing.assert_close(glu(gate, up, "clamped_swiglu"), expected)
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from transformers import GptOssConfig

    experts = gpt_oss.GptOssExperts(GptOssConfig(hidden_size=4, intermediate_size=7, num_local_experts=1))
    interleaved = torch.stack((gate, up), dim=-1).reshape(5, 14)  # columns g0, u0, g1, u1, ...
    torch.testing.assert_close(glu(gate, up, "clamped_swiglu"), experts._apply_gate(interleaved))
    assert not torch.allclose(glu(gate, up, "clamped_swiglu"), F.silu(gate) * up)


def test_rope_none_and_nope_layers_have_no_position_signal() -> None:
    """Without RoPE, one attention layer is permutation-invariant over the visible prefix: the last
    token's output is the same for any order of the earlier tokens (with RoPE it is not)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=D, n_layers=1, n_heads=2, d_ff=24, moe=None, moe_layers="none",
                      rope=RopeConfig(), nope_layers="all")
    model = MoETransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20.0)  # peaky attention, so a position signal would show
    tokens = torch.tensor([[3, 5, 7, 9]])
    shuffled = torch.tensor([[7, 3, 5, 9]])
    with torch.no_grad():
        a, b = model(tokens).logits[:, -1], model(shuffled).logits[:, -1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        roped = MoETransformer(cfg.replace(nope_layers="none")).eval()
        roped.load_state_dict(model.state_dict())
        assert not torch.allclose(roped(tokens).logits[:, -1], roped(shuffled).logits[:, -1], atol=1e-4)


def test_model_init_keeps_the_mamba_dt_initialisation() -> None:
    """The model's GPT-2 style reset must not zero dt_proj's bias (softplus(bias) = dt in [1e-3, 0.1])."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=D, n_layers=1, n_heads=2, d_ff=24, rope=None, moe=None,
                      moe_layers="none", attention_layers="none", mamba=MambaConfig(d_model=D, d_state=4))
    dt_I = F.softplus(MoETransformer(cfg).model.layers[0].mamba.dt_proj.bias)
    assert dt_I.min() >= 1e-3 * 0.99 and dt_I.max() <= 0.1 * 1.01
