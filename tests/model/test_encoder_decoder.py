"""Switch Transformer encoder-decoder: logits equal transformers' with copied weights (capacity
dropping included), decoder KV cache equals the full forward, parameter counts, config errors."""

from __future__ import annotations

import tempfile

import pytest
import torch

import moekit
from moekit.dispatch.capacity import apply_capacity
from moekit.model.accounting import num_params
from moekit.model.encoder_decoder import (
    FeedForwardLayer,
    SwitchConfig,
    SwitchTransformer,
    relative_position_bucket,
)
from moekit.routing.base import counts_from_ids
from moekit.types import RoutingDecision

TINY = dict(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=4, num_decoder_layers=4,
            num_heads=2, num_experts=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=16, dropout_rate=0.0, decoder_start_token_id=0)


def hf_pair(seed: int = 0, **overrides):
    """A random transformers Switch model and ours, loaded from its saved checkpoint."""
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersForConditionalGeneration,
    )

    hf_config = SwitchTransformersConfig(**{**TINY, **overrides})
    torch.manual_seed(seed)
    hf = SwitchTransformersForConditionalGeneration(hf_config).eval()
    with torch.no_grad():  # transformers 5 unties these too when tie_word_embeddings=False
        hf.encoder.embed_tokens.weight.copy_(hf.shared.weight)
        hf.decoder.embed_tokens.weight.copy_(hf.shared.weight)
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(path)
        ours = moekit.from_pretrained(path)
    assert isinstance(ours, SwitchTransformer)
    return hf, ours


@pytest.mark.parametrize("overrides,pad,expect_drops", [
    pytest.param(dict(expert_capacity=3, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),
                 False, True, id="tied-capacity-drops"),
    pytest.param(dict(expert_capacity=64, num_sparse_encoder_layers=4, num_sparse_decoder_layers=1,
                      tie_word_embeddings=False), False, False, id="untied-all-encoder-sparse"),
    pytest.param(dict(expert_capacity=2, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
                      router_bias=True), True, True, id="padded-encoder-router-bias"),
])
def test_logits_and_loss_match_transformers(overrides, pad, expect_drops):
    hf, ours = hf_pair(**overrides)
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (2, 10))
    labels = torch.randint(0, 50, (2, 7))
    labels[1, -2:] = -100
    mask = torch.ones(2, 10, dtype=torch.long)
    if pad:
        mask[0, 7:] = 0  # right padding: pads route nowhere in moekit, after every real token in hf
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, labels=labels)
        got = ours(ids, labels_BS=labels, attention_mask_BS=mask.bool())
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-4, atol=1e-4)
    drops = sum(int(r.dropped_TK.sum()) for r in got.routing if r is not None)
    assert (drops > 0) == expect_drops  # the capacity cases really drop tokens


def test_loss_plus_aux_loss_matches_transformers_with_one_sparse_layer_per_stack():
    # With one sparse layer per stack, transformers' router losses (balance loss per sequence,
    # z-loss, coefficient-weighted) are ours; with more it pools the layers of a stack into one
    # loss, where moekit sums the per-layer losses.
    hf, ours = hf_pair(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1,
                       num_sparse_decoder_layers=1, expert_capacity=3)
    torch.manual_seed(2)
    ids, labels = torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = hf(input_ids=ids, labels=labels, output_router_logits=True)
        got = ours(ids, labels_BS=labels)
    assert expected.encoder_aux_loss > 0 and expected.decoder_z_loss > 0
    torch.testing.assert_close(got.loss + got.aux_loss, expected.loss, rtol=1e-5, atol=1e-5)


def test_relative_position_buckets_match_transformers():
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersAttention,
    )

    rel = torch.arange(-40, 41)[None, :] - torch.arange(0, 5)[:, None]
    for bidirectional in (True, False):
        expected = SwitchTransformersAttention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=32, max_distance=20)
        got = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=20)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("capacity", [pytest.param(None, id="dropless"), pytest.param(64, id="capacity-64")])
def test_decoder_kv_cache_equals_full_forward(capacity):
    config = SwitchConfig(**{**TINY, "expert_capacity": capacity})
    torch.manual_seed(0)
    model = SwitchTransformer(config).eval()
    ids, dec = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        full = model(ids, dec, attention_mask_BS=mask).logits
        out = model(ids, dec[:, :2], attention_mask_BS=mask, use_cache=True)  # prefill two tokens
        steps = [out.logits]
        for t in range(2, 6):
            out = model(None, dec[:, t:t + 1], cache=out.cache)
            steps.append(out.logits)
    assert out.cache.length == 6
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [
    pytest.param(dict(num_sparse_encoder_layers=2, num_sparse_decoder_layers=2), id="every-2nd"),
    pytest.param(dict(num_sparse_encoder_layers=4, num_sparse_decoder_layers=1,
                      tie_word_embeddings=False, router_bias=True), id="untied-bias"),
])
def test_num_params_equals_built_model_and_transformers(overrides):
    hf, ours = hf_pair(**overrides)
    built = sum(p.numel() for p in ours.parameters())
    hf_count = sum(p.numel() for p in hf.parameters())
    if not ours.config.tie_word_embeddings:  # transformers 5's separate encoder/decoder embed_tokens
        hf_count -= 2 * hf.shared.weight.numel()
    assert num_params(ours.config) == built == hf_count


def test_sparse_layer_placement_follows_transformers():
    config = SwitchConfig(**{**TINY, "num_layers": 6, "num_decoder_layers": 7,
                             "encoder_sparse_step": 3, "decoder_sparse_step": 0})
    assert [config.is_sparse(i, decoder=False) for i in range(6)] == [0, 1, 0, 0, 1, 0]
    assert not any(config.is_sparse(i, decoder=True) for i in range(7))
    assert all(SwitchConfig(**{**TINY, "encoder_sparse_step": 1}).is_sparse(i, decoder=False)
               for i in range(4))


def test_grouped_capacity_equals_capacity_per_group():
    torch.manual_seed(0)
    G, S, E, K = 3, 8, 4, 2
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(G * S)])
    ids[5, 1] = -1  # an empty slot is never kept
    weights = torch.rand(G * S, K)
    logits = torch.randn(G * S, E)

    def decision(i, w, lg):
        return RoutingDecision(i, w, lg, lg.softmax(-1), counts_from_ids(i, E))

    for policy in ("position", "score"):
        grouped = apply_capacity(decision(ids, weights, logits), capacity=2, policy=policy, num_groups=G)
        for g in range(G):
            sl = slice(g * S, (g + 1) * S)
            alone = apply_capacity(decision(ids[sl], weights[sl], logits[sl]), capacity=2, policy=policy)
            assert torch.equal(grouped.expert_ids_TK[sl], alone.expert_ids_TK)
            assert torch.equal(grouped.weights_TK[sl], alone.weights_TK)
        assert int(grouped.dropped_TK.sum()) > 0
    with pytest.raises(ValueError, match="num_groups=5"):
        apply_capacity(decision(ids, weights, logits), capacity=2, num_groups=5)


def test_dropped_token_passes_the_residual_unchanged():
    config = SwitchConfig(**{**TINY, "expert_capacity": 1, "num_experts": 2})
    torch.manual_seed(0)
    ff = FeedForwardLayer(config, sparse=True).eval()
    x = torch.randn(2, 6, 16)
    y, out = ff(x, None)
    dropped_BS = out.decision.dropped_TK[:, 0].view(2, 6)
    assert dropped_BS.sum() >= 2 * (6 - 2)  # at most 2 experts x 1 slot kept per sequence
    torch.testing.assert_close(y[dropped_BS], x[dropped_BS], rtol=0, atol=0)
    assert not torch.allclose(y[~dropped_BS], x[~dropped_BS])


def test_training_forward_backward_with_jitter_and_aux_loss():
    config = SwitchConfig(**{**TINY, "expert_capacity": 4, "dropout_rate": 0.1})
    torch.manual_seed(0)
    model = SwitchTransformer(config).train()
    ids, labels = torch.randint(0, 50, (2, 8)), torch.randint(0, 50, (2, 5))
    out = model(ids, labels_BS=labels)
    assert out.aux_loss is not None and out.aux_loss > 0
    assert len(out.routing) == 8 and sum(r is not None for r in out.routing) == 4
    (out.loss + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_shift_right_matches_transformers():
    hf, ours = hf_pair(expert_capacity=8)
    labels = torch.tensor([[5, 6, -100, 7], [8, -100, -100, -100]])
    assert torch.equal(ours.shift_right(labels), hf._shift_right(labels))


@pytest.mark.parametrize("overrides,field", [
    pytest.param(dict(d_model=0), "d_model", id="d_model-zero"),
    pytest.param(dict(num_decoder_layers=0), "num_decoder_layers", id="decoder-layers-zero"),
    pytest.param(dict(encoder_sparse_step=-1), "encoder_sparse_step", id="negative-step"),
    pytest.param(dict(expert_capacity=0), "expert_capacity", id="capacity-zero"),
    pytest.param(dict(expert_capacity=4, capacity_factor=1.0), "capacity_factor", id="both-capacities"),
    pytest.param(dict(router_jitter_noise=1.0), "router_jitter_noise", id="jitter-one"),
    pytest.param(dict(dense_act_fn="gated-gelu"), "dense_act_fn", id="gated-act"),
    pytest.param(dict(relative_attention_num_buckets=2), "relative_attention_num_buckets", id="buckets"),
    pytest.param(dict(pad_token_id=50), "pad_token_id", id="pad-outside-vocab"),
    pytest.param(dict(dropout_rate=1.0), "dropout_rate", id="dropout-one"),
    pytest.param(dict(router_aux_loss_coef=-1.0), "router_aux_loss_coef", id="negative-coef"),
])
def test_bad_config_raises_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        SwitchConfig(**{**TINY, **overrides})


def test_loading_refuses_untied_input_embeddings(tmp_path):
    hf, _ = hf_pair(tie_word_embeddings=False)
    with torch.no_grad():
        hf.decoder.embed_tokens.weight.add_(1.0)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="decoder.embed_tokens.weight in .* differs from shared.weight"):
        moekit.from_pretrained(tmp_path)


def test_bad_inputs_raise():
    model = SwitchTransformer(SwitchConfig(**TINY)).eval()
    ids = torch.randint(0, 50, (2, 5))
    with pytest.raises(ValueError, match="labels_BS"):
        model(ids)
    with pytest.raises(TypeError, match="input_ids_BS"):
        model(ids.float(), ids)
    with pytest.raises(ValueError, match="cache"):
        model(None, ids)
    with pytest.raises(ValueError, match="labels_BS has shape"):
        model(ids, ids, ids[:, :3])
    cache = model(ids, ids[:, :2], use_cache=True).cache
    with pytest.raises(ValueError, match="2 cached"):  # the decoder mask must cover past + new
        model(None, ids[:, 2:3], decoder_attention_mask_BS=torch.ones(2, 1, dtype=torch.bool), cache=cache)
