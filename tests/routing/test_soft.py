"""Soft MoE: SoftMoELayer vs the per-slot reference (outputs and gradients), decision fields, errors."""

from __future__ import annotations

import pytest
import torch

from moekit.analysis.stats import routing_stats
from moekit.config import MoEConfig
from moekit.layer import MoELayer
from moekit.soft_layer import SoftMoELayer
from tests.reference.routers import reference_soft_moe

CASES = [
    pytest.param(dict(B=1, S=1, E=2, slots=1), id="one-token"),
    pytest.param(dict(B=2, S=5, E=4, slots=1), id="B2-S5-E4"),
    pytest.param(dict(B=3, S=4, E=2, slots=3, activation="gelu", expert_mlp_bias=True), id="3-slots-gelu-bias"),
    pytest.param(dict(B=2, S=6, E=3, slots=2, mask=[[1, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]]), id="padding"),
    pytest.param(dict(B=2, S=3, E=2, slots=2, mask=[[1, 1, 1], [0, 0, 0]]), id="fully-padded-sequence"),
]


def make_layer(B: int, S: int, E: int, slots: int, mask: list | None = None, **kw):
    torch.manual_seed(B * 100 + S * 10 + E)
    cfg = MoEConfig(d_model=6, d_ff=8, num_experts=E, router="soft", soft_slots=slots, top_k=1, **kw)
    layer = SoftMoELayer(cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    x_BSD = torch.randn(B, S, 6, requires_grad=True)
    mask_BS = None if mask is None else torch.tensor(mask, dtype=torch.bool)
    return layer, x_BSD, mask_BS


@pytest.mark.parametrize("case", CASES)
def test_layer_matches_reference_outputs_and_gradients(case: dict) -> None:
    layer, x_BSD, mask_BS = make_layer(**case)
    out = layer(x_BSD, mask=mask_BS)
    ref = reference_soft_moe(x_BSD, layer.router.phi_DN, layer.experts, slots=case["slots"], mask_BS=mask_BS)
    torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    params = [x_BSD] + list(layer.parameters())
    grads = torch.autograd.grad((out.y * g).sum(), params, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * g).sum(), params, allow_unused=True)
    for p, a, b in zip(params, grads, ref_grads):
        if b is None:  # e.g. biases of an expert whose slots are all from a padded sequence
            assert a is None or torch.count_nonzero(a) == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"gradient of {tuple(p.shape)}")


def test_decision_summarises_combine_weights_per_expert() -> None:
    layer, x_BSD, _ = make_layer(B=2, S=4, E=3, slots=2)
    mask_BS = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    d = layer(x_BSD, mask=mask_BS).decision
    real = mask_BS.reshape(-1)
    logits_TN = x_BSD.reshape(8, 6) @ layer.router.phi_DN  # slot n belongs to expert n // 2
    combine_TN = logits_TN.softmax(-1)
    torch.testing.assert_close(d.weights_TK[real], combine_TN[real].reshape(-1, 3, 2).sum(-1))
    torch.testing.assert_close(d.probs_TE, d.logits_TE.softmax(-1))
    torch.testing.assert_close(d.probs_TE[real], d.weights_TK[real])
    assert d.expert_ids_TK[real].tolist() == [[0, 1, 2]] * 7 and (d.expert_ids_TK[~real] == -1).all()
    assert (d.weights_TK[~real] == 0).all()
    assert d.counts_E.tolist() == [7, 7, 7]  # real tokens mixed into each expert's slots
    stats = routing_stats(d, mask_T=real)
    assert stats["max_vio"] == 0.0 and stats["dropped_fraction"] == 0.0


def test_sequences_are_independent_but_tokens_mix_within_a_sequence() -> None:
    layer, x_BSD, _ = make_layer(B=2, S=4, E=2, slots=2)
    with torch.no_grad():
        y = layer(x_BSD).y
        x2 = x_BSD.clone()
        x2[1, 3] += 1.0
        y2 = layer(x2).y
        assert torch.equal(y[0], y2[0])  # another sequence does not leak in
        assert not torch.allclose(y[1, 0], y2[1, 0])  # a later token changes an earlier one: not causal
        flat = layer(x_BSD[0]).y  # a (T, D) input is one sequence
        torch.testing.assert_close(flat, y[0], rtol=1e-6, atol=1e-6)


def test_padding_does_not_influence_real_tokens() -> None:
    layer, x_BSD, _ = make_layer(B=1, S=5, E=2, slots=1)
    mask_BS = torch.tensor([[1, 0, 1, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        y = layer(x_BSD, mask=mask_BS).y
        x2 = x_BSD.clone()
        x2[~mask_BS] = 50.0
        y2 = layer(x2, mask=mask_BS).y
    assert torch.equal(y[mask_BS], y2[mask_BS])
    assert (y[~mask_BS] == 0).all()


def test_causal_use_is_refused() -> None:
    layer, x_BSD, _ = make_layer(B=1, S=3, E=2, slots=1)
    with pytest.raises(ValueError, match="cannot be used causally"):
        layer(x_BSD, causal=True)
    topk = MoELayer(MoEConfig(d_model=6, d_ff=8, num_experts=2, top_k=1))
    topk(x_BSD, causal=True)  # other routers accept the flag
    with pytest.raises(ValueError, match="SoftMoELayer"):
        MoELayer(layer.config)  # soft is its own (encoder) layer


def test_no_balance_loss_and_z_loss_works() -> None:
    layer, x_BSD, _ = make_layer(B=2, S=3, E=2, slots=1, z_loss_coef=1e-3)
    aux = layer(x_BSD).aux_losses
    assert "load_balance" not in aux and torch.isfinite(aux["z"])
    assert layer.aux_loss(aux).requires_grad


def test_deterministic_recording_and_replay_refused() -> None:
    layer, x_BSD, _ = make_layer(B=2, S=3, E=2, slots=2)
    layer.router.recording = []
    a, b = layer(x_BSD), layer(x_BSD)
    assert torch.equal(a.y, b.y)
    assert len(layer.router.recording) == 2
    assert torch.equal(layer.router.recording[0].weights_TK, a.decision.weights_TK.detach())
    layer.router.replay = list(layer.router.recording)
    with pytest.raises(ValueError, match="nothing to replay"):
        layer(x_BSD)
    with pytest.raises(ValueError, match="nothing to replay"):
        layer.router(x_BSD.reshape(6, 6))


def test_bf16_runs_and_stays_close_to_fp32() -> None:
    layer, x_BSD, _ = make_layer(B=2, S=4, E=2, slots=2)
    with torch.no_grad():
        y32 = layer(x_BSD).y
        y16 = layer.to(torch.bfloat16)(x_BSD.to(torch.bfloat16)).y
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)
