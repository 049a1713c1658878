"""Parameter counts come from the meta-device build; checked here against counts by hand."""

from __future__ import annotations

import pytest

from moekit.config import MoEConfig
from moekit.model import ModelConfig
from moekit.model.accounting import active_params, num_params
from moekit.model.mamba import MambaConfig

D, F, E, V = 8, 16, 4, 50


@pytest.mark.parametrize("kw,total,active", [
    # router D*E + E experts of 3 D*F matrices; a token uses top_k=2 of them
    pytest.param({}, D * E + E * 3 * D * F, D * E + 2 * 3 * D * F, id="swiglu"),
    pytest.param(dict(activation="gelu", expert_mlp_bias=True, router_bias=True),
                 D * E + E + E * (2 * D * F + F + D), D * E + E + 2 * (2 * D * F + F + D), id="gelu-biases"),
    pytest.param(dict(noisy_gating=True, num_shared_experts=1, shared_expert_gate=True),
                 2 * D * E + E * 3 * D * F + 3 * D * F + D, 2 * D * E + 2 * 3 * D * F + 3 * D * F + D,
                 id="noisy-shared-gated"),
    pytest.param(dict(router="hash", hash_vocab_size=10), E * 3 * D * F, 2 * 3 * D * F, id="hash-no-gate"),
    pytest.param(dict(router="soft", soft_slots=3), D * E * 3 + E * 3 * D * F, D * E * 3 + 2 * 3 * D * F,
                 id="soft-slots"),
])
def test_moe_layer_counts_by_hand(kw: dict, total: int, active: int) -> None:
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=2, **kw)
    assert (num_params(cfg), active_params(cfg)) == (total, active)


def test_decoder_counts_by_hand() -> None:
    # 2 layers: attention q,k,v,o (4 D*D), an MoE (router + 4 swiglu experts of width F), 2 RMSNorms.
    moe = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=2)
    block = 4 * D * D + D * E + E * 3 * D * F + 2 * D
    block_active = 4 * D * D + D * E + 2 * 3 * D * F + 2 * D
    untied = ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=2, moe=moe)
    assert num_params(untied) == V * D + 2 * block + D + V * D
    assert active_params(untied) == V * D + 2 * block_active + D + V * D
    assert active_params(untied, embedding=False, lm_head=False) == 2 * block_active + D
    tied = untied.replace(tie_embeddings=True, lm_head_bias=True)
    assert num_params(tied) == V * D + 2 * block + D + V
    assert active_params(tied, embedding=False) == 2 * block_active + D + V * D + V
    assert active_params(tied, lm_head=False) == V * D + 2 * block_active + D


def test_mamba_counts_by_hand() -> None:
    # (Switch Transformers' count is checked against transformers' model in test_encoder_decoder.py.)
    m = MambaConfig(d_model=D, d_state=4, expand=2, d_conv=4, dt_rank=2)
    I, R, N = 2 * D, 2, 4  # in_proj, depthwise conv (+bias), x_proj, dt_proj (+bias), A_log, D, out_proj
    by_hand = D * 2 * I + I * 4 + I + I * (R + 2 * N) + R * I + I + I * N + I + I * D
    assert num_params(m) == by_hand + R + 2 * N  # + the dt/B/C RMSNorms (dt_layernorm=True)
