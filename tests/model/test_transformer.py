"""MoETransformer: parameter counts, KV-cache decode vs full forward per attention type, loss, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.config import MoEConfig
from moekit.model import MLAConfig, ModelConfig, MoETransformer, RopeConfig
from moekit.model.accounting import num_params
from moekit.model.mamba import MambaConfig

D = 32
MOE = MoEConfig(d_model=D, d_ff=16, num_experts=4, top_k=2)


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=61, d_model=D, n_layers=2, n_heads=4, d_ff=48, moe=MOE, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


VARIANTS = [
    pytest.param(tiny(), id="mha"),
    pytest.param(tiny(n_kv_heads=2), id="gqa"),
    pytest.param(tiny(n_kv_heads=1, moe_layers="from:1"), id="mqa-first-dense"),
    pytest.param(tiny(mla=MLAConfig(q_lora_rank=12, kv_lora_rank=10, qk_nope_head_dim=6,
                                    qk_rope_head_dim=4, v_head_dim=5),
                      rope=RopeConfig(interleaved=True)), id="mla"),
    pytest.param(tiny(mla=MLAConfig(kv_lora_rank=10, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5),
                      rope=RopeConfig(scaling="yarn", factor=4.0, original_max_position=8,
                                      mscale=1.0, mscale_all_dim=1.0)), id="mla-no-qlora-yarn"),
    pytest.param(tiny(sliding_window=3, sliding_layers="every:2:0", n_kv_heads=2), id="sliding-window"),
    pytest.param(tiny(attn_sinks=True, qkv_bias=True, o_bias=True, sliding_window=4), id="sinks"),
    pytest.param(tiny(n_layers=4, kv_share_every=2, qk_norm="head_after_rope"), id="kv-sharing"),
    pytest.param(tiny(qk_norm="full", clip_qkv=0.05), id="qk-norm-full-clip"),
    pytest.param(tiny(qk_norm="l2", nope_layers="every:2", attention_chunk=3), id="llama4-l2-nope-chunked"),
    pytest.param(tiny(rope=RopeConfig(partial_rotary=0.5, scaling="linear", factor=2.0)), id="partial-rope"),
    pytest.param(tiny(attn_logit_softcap=0.5, post_norms=True, embedding_multiplier=3.0,
                      residual_multiplier=0.5, logits_scaling=2.0, attn_scale=0.1), id="softcap-multipliers"),
    pytest.param(tiny(norm="layernorm", norm_bias=True, lm_head_bias=True, tie_embeddings=True,
                      mlp_bias=True, moe_layers="none", moe=None), id="layernorm-dense-tied"),
    pytest.param(tiny(n_heads=4, n_kv_heads=2, head_dim=6,
                      moa=MoEConfig(d_model=D, d_ff=12, num_experts=3, top_k=2, softmax_after_topk=True)),
                 id="mixture-of-attention"),
    pytest.param(tiny(n_layers=3, moe_layers=(0, 2), moe_parallel=True), id="arctic-parallel-moe"),
    pytest.param(tiny(n_layers=3, attention_layers=(1,), rope=None, moe_layers="every:2:1",
                      mamba=MambaConfig(d_model=D, d_state=4, expand=2, chunk_size=4)), id="mamba-hybrid"),
]


@pytest.mark.parametrize("cfg", VARIANTS)
def test_param_count_matches_built_module(cfg: ModelConfig) -> None:
    model = MoETransformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == num_params(cfg)


@pytest.mark.parametrize("cfg", VARIANTS)
def test_cache_decode_equals_full_forward(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    tokens_BS = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(tokens_BS).logits
        cache = model.new_cache()
        pieces = [model(tokens_BS[:, :4], cache=cache).logits]
        for t in range(4, 9):
            pieces.append(model(tokens_BS[:, t:t + 1], cache=cache).logits)
    assert cache.position == 9
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [pytest.param(1, id="window-1"), pytest.param(3, id="window-3")])
def test_sliding_window_cache_is_bounded_and_exact(window: int) -> None:
    torch.manual_seed(0)
    model = MoETransformer(tiny(sliding_window=window, sliding_layers=(0,), n_kv_heads=2)).eval()
    tokens_BS = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        full = model(tokens_BS).logits
        cache = model.new_cache()
        pieces = [model(tokens_BS[:, :5], cache=cache).logits]
        pieces += [model(tokens_BS[:, t:t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.layers[0][0].shape[2] == window - 1  # only the keys later queries can still see
    assert cache.layers[1][0].shape[2] == 12  # the full-attention layer keeps everything


def test_padding_mask_with_cache_equals_full_forward() -> None:
    torch.manual_seed(0)
    model = MoETransformer(tiny(n_kv_heads=2)).eval()
    tokens_BS = torch.randint(0, 61, (2, 6))
    mask_BS = torch.ones(2, 6, dtype=torch.bool)
    mask_BS[1, :2] = False  # left padding in the second sequence
    with torch.no_grad():
        full = model(tokens_BS, mask_BS=mask_BS).logits
        cache = model.new_cache()
        a = model(tokens_BS[:, :3], cache=cache, mask_BS=mask_BS[:, :3]).logits
        b = model(tokens_BS[:, 3:], cache=cache).logits
    # Padding positions hold garbage (they see no key); every real position must agree.
    torch.testing.assert_close(torch.cat((a, b), 1)[mask_BS], full[mask_BS], atol=1e-5, rtol=1e-5)
    # The padded tokens must not change what the real ones see: compare with the unpadded sequence.
    with torch.no_grad():
        alone = model(tokens_BS[1:, 2:]).logits
    torch.testing.assert_close(full[1:, 2:], alone, atol=1e-5, rtol=1e-5)


def test_loss_is_mean_cross_entropy_over_unignored_targets() -> None:
    torch.manual_seed(0)
    model = MoETransformer(tiny())
    tokens_BS = torch.randint(0, 61, (2, 5))
    targets_BS = torch.randint(0, 61, (2, 5))
    targets_BS[0, :3] = -100
    out = model(tokens_BS, targets_BS=targets_BS)
    keep = targets_BS != -100
    expected = F.cross_entropy(out.logits[keep], targets_BS[keep])
    torch.testing.assert_close(out.loss, expected)
    # aux loss: the sum over MoE layers of coefficient-weighted layer losses.
    layer_sum = sum(out_l for out_l in [
        layer.aux_loss(layer.aux_losses(d, None, 2)) for layer, d in zip(model.moe_layers(), out.routing)])
    torch.testing.assert_close(out.aux_loss, layer_sum)
    (out.loss + out.aux_loss).backward()
    assert model.model.embed_tokens.weight.grad is not None


def test_all_ignored_targets_give_zero_loss_not_nan() -> None:
    model = MoETransformer(tiny())
    tokens_BS = torch.randint(0, 61, (1, 4))
    out = model(tokens_BS, targets_BS=torch.full_like(tokens_BS, -100))
    assert out.loss.item() == 0.0


def test_moe_layers_routing_and_bias_update() -> None:
    moe = MoEConfig(d_model=D, d_ff=16, num_experts=4, top_k=2, score_func="sigmoid", expert_bias=True)
    model = MoETransformer(tiny(n_layers=3, moe=moe, moe_layers=(0, 2)))
    out = model(torch.randint(0, 61, (2, 5)))
    assert [d is None for d in out.routing] == [False, True, False]
    assert len(model.moe_layers()) == 2
    before = [layer.router.expert_bias.clone() for layer in model.moe_layers()]
    model.update_expert_biases()
    after = [layer.router.expert_bias for layer in model.moe_layers()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_tied_head_shares_the_embedding() -> None:
    model = MoETransformer(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_hf_style_parameter_names() -> None:
    names = dict(MoETransformer(tiny(moe_layers="from:1")).named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.layers.0.self_attn.o_proj.weight", "model.layers.0.input_layernorm.weight",
                 "model.layers.0.post_attention_layernorm.weight", "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.mlp.router.gate.weight", "model.norm.weight", "lm_head.weight"):
        assert name in names, name


def test_config_json_round_trip(tmp_path) -> None:
    cfg = tiny(moe_layers=(0,), mla=MLAConfig(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
                                               v_head_dim=4),
               rope=RopeConfig(scaling="longrope", original_max_position=8, short_factor=(1.0, 2.0),
                               long_factor=(3.0, 4.0)),
               n_layers=2, attention_layers=(0,), mamba=MambaConfig(d_model=D))
    cfg.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


BAD = [
    pytest.param(dict(n_heads=5), "n_heads", id="heads-do-not-divide-d_model"),
    pytest.param(dict(n_kv_heads=3), "n_kv_heads", id="kv-heads-do-not-divide-heads"),
    pytest.param(dict(moe_layers=(0, 1, 2)), "moe_layers", id="layer-list-longer-than-model"),
    pytest.param(dict(moe_layers=(5,)), "moe_layers", id="layer-index-out-of-range"),
    pytest.param(dict(moe_layers="sometimes"), "moe_layers", id="unknown-layer-spec"),
    pytest.param(dict(attention_layers=(0,)), "mamba", id="mamba-layer-without-mamba-config"),
    pytest.param(dict(norm="batchnorm"), "norm", id="unknown-norm"),
    pytest.param(dict(qk_norm="yes"), "qk_norm", id="unknown-qk-norm"),
    pytest.param(dict(moe=None), "moe_layers", id="moe-layers-without-moe"),
    pytest.param(dict(moe_layers="every:2", d_ff=None), "d_ff", id="dense-layer-without-d_ff"),
    pytest.param(dict(moe=MoEConfig(d_model=16, d_ff=8, num_experts=2, top_k=1)), "moe.d_model",
                 id="moe-width-mismatch"),
    pytest.param(dict(kv_share_every=2, attention_layers=(1,), mamba=MambaConfig(d_model=D)),
                 "kv_share_every", id="kv-share-source-not-attention"),
    pytest.param(dict(norm_bias=True), "norm_bias", id="rmsnorm-with-bias"),
    pytest.param(dict(mla=MLAConfig(), n_kv_heads=2), "n_kv_heads", id="mla-with-gqa"),
    pytest.param(dict(moe_parallel=True, d_ff=None), "moe_parallel", id="parallel-moe-without-d_ff"),
    pytest.param(dict(n_kv_heads=2, moa=MoEConfig(d_model=D, d_ff=16, num_experts=4, top_k=1)), "n_heads",
                 id="moa-heads-not-top_k-times-kv-heads"),
    pytest.param(dict(n_kv_heads=2, moa=MoEConfig(d_model=D, d_ff=20, num_experts=4, top_k=2)), "moa.d_ff",
                 id="moa-width-not-kv-width"),
]


@pytest.mark.parametrize("overrides,field", BAD)
def test_bad_configs_raise_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        tiny(**overrides)


@pytest.mark.parametrize("kwargs,field", [
    pytest.param(dict(scaling="yarn"), "original_max_position", id="yarn-without-original"),
    pytest.param(dict(scaling="ntk"), "rope.scaling", id="unknown-scaling"),
    pytest.param(dict(partial_rotary=0.0), "partial_rotary", id="zero-rotary"),
    pytest.param(dict(scaling="longrope", original_max_position=8), "short_factor", id="longrope-no-tables"),
])
def test_bad_rope_configs_raise(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RopeConfig(**kwargs)


def test_bad_inputs_raise() -> None:
    model = MoETransformer(tiny())
    with pytest.raises(ValueError, match="tokens_BS"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match="targets_BS"):
        model(torch.zeros(2, 3, dtype=torch.long), targets_BS=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="KVCache"):
        model(torch.zeros(2, 3, dtype=torch.long), cache={})
    cache = model.new_cache()
    model(torch.zeros(2, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="new_cache"):
        model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
