"""Inputs that must be refused (or converted explicitly), each with an error naming the field and fix.

Configs: values accepted and then failing deep inside torch or silently. Layers and models: masks
that are not bool, NaN/huge values in padding, token ids outside the vocabulary, a wrong dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit.config import MoEConfig
from moekit.layer import MoELayer
from moekit.model import ModelConfig, MoETransformer, RopeConfig
from moekit.soft_layer import SoftMoELayer

BASE = dict(d_model=8, d_ff=8, num_experts=4, top_k=2)
V = 30


@pytest.mark.parametrize("changes,field", [
    pytest.param(dict(capacity_factor=math.inf), "capacity_factor=inf", id="capacity-inf"),
    pytest.param(dict(capacity_factor="1.25"), "capacity_factor='1.25'", id="capacity-string"),
    pytest.param(dict(capacity_factor=math.nan), "capacity_factor=nan", id="capacity-nan"),
    pytest.param(dict(router="sinkhorn", sinkhorn_iters=2.5), "sinkhorn_iters=2.5", id="sinkhorn-iters-fraction"),
    pytest.param(dict(router="soft", soft_slots=1.5), "soft_slots=1.5", id="soft-slots-fraction"),
    pytest.param(dict(num_shared_experts=1.5), "num_shared_experts=1.5", id="shared-experts-fraction"),
    pytest.param(dict(num_groups=2, topk_groups=1.5), "topk_groups=1.5", id="topk-groups-fraction"),
    pytest.param(dict(top_k=True), "top_k=True", id="top-k-bool"),
    pytest.param(dict(routed_scaling_factor=math.inf), "routed_scaling_factor=inf", id="scaling-inf"),
    pytest.param(dict(load_balance_coef=math.inf), "load_balance_coef=inf", id="balance-coef-inf"),
    pytest.param(dict(z_loss_coef=math.nan), "z_loss_coef=nan", id="z-coef-nan"),
    pytest.param(dict(noisy_gating="no"), "noisy_gating='no'", id="bool-as-string"),
    pytest.param(dict(expert_capacity=True), "expert_capacity=True", id="capacity-bool"),
])
def test_bad_moe_config_values_are_refused_naming_field_and_value(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field.replace('(', '[(]')} is invalid: "):
        MoEConfig(**{**BASE, **changes})


@pytest.mark.parametrize("changes,field", [
    pytest.param(dict(tie_embeddings="no"), "tie_embeddings='no'", id="tie-string"),
    pytest.param(dict(norm_eps=math.inf), "norm_eps=inf", id="norm-eps-inf"),
    pytest.param(dict(residual_multiplier=math.nan), "residual_multiplier=nan", id="multiplier-nan"),
    pytest.param(dict(attn_logit_softcap=math.inf), "attn_logit_softcap=inf", id="softcap-inf"),
    pytest.param(dict(n_layers=True), "n_layers=True", id="layers-bool"),
])
def test_bad_model_config_values_are_refused(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field} is invalid: "):
        ModelConfig(**{**dict(vocab_size=V, d_model=8, n_layers=1, n_heads=2, d_ff=8), **changes})
    with pytest.raises(ValueError, match="^rope.theta=inf is invalid: must be a finite number > 0"):
        RopeConfig(theta=math.inf)


def _layer(**kw) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(MoEConfig(**{**BASE, "z_loss_coef": 1e-3, **kw}))


@pytest.mark.parametrize("mask,error", [
    pytest.param(torch.full((2, 3), 7), "values other than 0 and 1", id="int-sevens"),
    pytest.param(torch.full((2, 3), 0.25), "must be a bool tensor", id="float-quarter"),
])
def test_non_bool_masks_are_refused(mask: torch.Tensor, error: str) -> None:
    with pytest.raises((TypeError, ValueError), match=error):
        _layer()(torch.randn(2, 3, 8), mask=mask)
    model = MoETransformer(ModelConfig(vocab_size=V, d_model=8, n_layers=1, n_heads=2, moe=MoEConfig(**BASE)))
    with pytest.raises((TypeError, ValueError), match="mask_BS"):
        model(torch.randint(0, V, (2, 3)), mask_BS=mask)


def test_an_integer_0_1_mask_is_converted_and_equals_the_bool_mask() -> None:
    layer, x = _layer(), torch.randn(2, 3, 8)
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    a, b = layer(x, mask=m), layer(x, mask=m.bool())
    torch.testing.assert_close(a.y, b.y, rtol=0, atol=0)
    assert a.aux_losses.keys() == b.aux_losses.keys()


@pytest.mark.parametrize("bad", [pytest.param(math.nan, id="nan"), pytest.param(1e38, id="huge")])
@pytest.mark.parametrize("kw", [pytest.param({}, id="topk"), pytest.param(dict(router="sinkhorn"), id="sinkhorn"),
                                pytest.param(dict(router="expert_choice"), id="expert-choice"),
                                pytest.param(dict(load_balance_granularity="sequence"), id="per-sequence"),
                                pytest.param(dict(router="soft"), id="soft")])
def test_garbage_in_padding_reaches_no_loss_output_or_gradient(bad: float, kw: dict) -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(**{**BASE, "z_loss_coef": 1e-3, **kw})
    layer = (SoftMoELayer if kw.get("router") == "soft" else MoELayer)(cfg).train()
    mask = torch.tensor([[True, True, False], [True, False, False]])
    clean = torch.randn(2, 3, 8)
    dirty = clean.masked_fill(~mask[..., None], bad).requires_grad_(True)
    a, b = layer(clean, mask=mask), layer(dirty, mask=mask)
    assert a.aux_losses and all(torch.isfinite(v) for v in b.aux_losses.values())
    for name in a.aux_losses:
        torch.testing.assert_close(a.aux_losses[name], b.aux_losses[name])
    torch.testing.assert_close(a.y[mask], b.y[mask])
    (b.y[mask].sum() + sum(b.aux_losses.values())).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_token_ids_and_targets_outside_the_vocabulary_are_refused_naming_its_size() -> None:
    model = MoETransformer(ModelConfig(vocab_size=V, d_model=8, n_layers=1, n_heads=2, moe=MoEConfig(**BASE)))
    ok = torch.randint(0, V, (1, 4))
    with pytest.raises(ValueError, match=f"tokens_BS holds {V}, .*vocab_size={V}"):
        model(torch.tensor([[1, 2, V]]))
    with pytest.raises(ValueError, match="tokens_BS holds -1"):
        model(torch.tensor([[1, -1, 2]]))
    with pytest.raises(ValueError, match=f"targets_BS holds {V + 5}, .*or -100"):
        model(ok, targets_BS=torch.tensor([[1, 2, V + 5, -100]]))
    assert torch.isfinite(model(ok, targets_BS=torch.tensor([[1, -100, 2, 3]])).loss)


def test_an_input_dtype_different_from_the_layers_is_refused_outside_autocast() -> None:
    layer = _layer()
    with pytest.raises(TypeError, match="x has dtype torch.bfloat16 but the layer's weights are torch.float32"):
        layer(torch.randn(2, 3, 8, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="must be a float tensor"):
        layer(torch.ones(2, 3, 8, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 3, 8)).y.shape == (2, 3, 8)
