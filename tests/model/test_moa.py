"""Mixture of attention is built from MoELayer's parts: sort dispatch + grouped GEMM equal a slow
loop (outputs and gradients, with an expert that gets no tokens); its routing reaches ModelOutput,
record/replay, the named aux losses and the aux-loss-free bias update."""

from __future__ import annotations

import torch

from moekit.config import MoEConfig
from moekit.model import ModelConfig, MoETransformer
from moekit.model.attention import additive_mask
from moekit.model.moa import MixtureOfAttention
from moekit.model.rope import rope_cos_sin
from moekit.types import RoutingDecision
from tests.reference.moa import reference_moa

D, V = 32, 40


def jet(**moa) -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=16,
                       moe_layers="none", moa=MoEConfig(d_model=D, d_ff=16, num_experts=4, top_k=2,
                                                        **{"softmax_after_topk": True, **moa}))


def test_sorted_grouped_path_equals_the_slow_loop_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    cfg = jet()
    fast = MixtureOfAttention(cfg, 0)
    B, S = 2, 5
    x = torch.randn(B, S, D, requires_grad=True)
    # Replay a choice in which expert 3 receives no token (and one slot goes nowhere).
    ids_TK = torch.randint(0, 3, (B * S, 2))
    ids_TK[:, 1] = (ids_TK[:, 0] + 1) % 3
    ids_TK[4, 1] = -1
    recorded = RoutingDecision(ids_TK, torch.zeros(B * S, 2), torch.zeros(B * S, 4), torch.zeros(B * S, 4),
                               torch.zeros(4, dtype=torch.long))
    fast.router.replay = [recorded]
    cos_sin = rope_cos_sin(cfg.rope, 8, torch.arange(S), max_seq_len=64, dtype=torch.float32)
    mask = additive_mask(torch.arange(S), torch.arange(S), window=None, key_mask_BT=None, dtype=torch.float32)
    y, _, decision, _ = fast(x, cos_sin=cos_sin, mask_B1ST=mask)
    assert decision.counts_E.tolist()[3] == 0 and torch.equal(decision.expert_ids_TK, ids_TK)
    want = reference_moa(fast, x, ids_TK, decision.weights_TK, cos_sin)
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(y)
    params = [x, fast.w_q_EDA, fast.w_o_EAD, fast.kv_proj.weight, fast.router.gate.weight]
    got_grads = torch.autograd.grad((y * g).sum(), params, retain_graph=True)
    want_grads = torch.autograd.grad((want * g).sum(), params)
    for p, a, b in zip(("x", "w_q", "w_o", "kv_proj", "router"), got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, p=p: f"grad of {p}: {m}")


def test_routing_reaches_the_model_output_metrics_and_recording() -> None:
    torch.manual_seed(0)
    model = MoETransformer(jet(z_loss_coef=1e-3))
    moa = model.model.layers[0].self_attn
    moa.router.recording = []
    tokens_BS = torch.randint(0, V, (2, 6))
    out = model(tokens_BS, targets_BS=tokens_BS)
    assert [d is not None for d in out.attention_routing] == [True, True]
    assert out.routing == [None, None]  # dense feed-forward layers
    assert set(out.aux_losses) == {"moa/load_balance", "moa/z"}
    # The weighted sum is the named losses times the router's coefficients.
    cfg = model.config.moa
    want = cfg.load_balance_coef * out.aux_losses["moa/load_balance"] + cfg.z_loss_coef * out.aux_losses["moa/z"]
    torch.testing.assert_close(out.aux_loss, want)
    assert len(moa.router.recording) == 1
    assert torch.equal(moa.router.recording[0].expert_ids_TK, out.attention_routing[0].expert_ids_TK)
    # Replaying the recording gives the same logits.
    moa.router.replay, moa.router.recording = list(moa.router.recording), None
    torch.testing.assert_close(model(tokens_BS).logits, out.logits)


def test_update_expert_biases_moves_the_attention_routers_bias() -> None:
    torch.manual_seed(0)
    model = MoETransformer(jet(expert_bias=True, bias_update_rate=0.1, softmax_after_topk=False)).train()
    model(torch.randint(0, V, (2, 8)))
    routed = model.routed_layers()
    assert len(routed) == 2 and all(isinstance(m, MixtureOfAttention) for m in routed)
    assert all(m.load_counts_E.sum() == 2 * 8 * 2 for m in routed)
    model.update_expert_biases()
    for m in routed:
        assert m.router.expert_bias.abs().sum() > 0 and m.load_counts_E.sum() == 0
