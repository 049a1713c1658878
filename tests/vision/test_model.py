"""ViT-MoE: one expert equals the dense ViT (outputs and gradients); shapes, errors, every router."""

from __future__ import annotations

import pytest
import torch

from moekit.config import MoEConfig
from moekit.vision.model import ViT, ViTConfig, dense_to_one_expert, flops_per_image


def tiny(moe: MoEConfig | None = None, **kw) -> ViTConfig:
    base = dict(image_size=8, patch_size=4, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=moe)
    return ViTConfig(**{**base, **kw})


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_one_expert_moe_equals_dense(pooling: str) -> None:
    torch.manual_seed(0)
    one = MoEConfig(d_model=16, d_ff=32, num_experts=1, top_k=1, activation="gelu", expert_mlp_bias=True,
                    load_balance_coef=0.0)
    dense, moe = ViT(tiny(pooling=pooling)), ViT(tiny(one, pooling=pooling))
    with torch.no_grad():  # random (not zero) head and biases, so every gradient is non-trivial
        for p in dense.parameters():
            p.normal_(0, 0.3)
    missing = moe.load_state_dict(dense.state_dict(), strict=False)
    assert set(missing.unexpected_keys) == {"blocks.1.mlp.up_proj.weight", "blocks.1.mlp.up_proj.bias",
                                            "blocks.1.mlp.down_proj.weight", "blocks.1.mlp.down_proj.bias"}
    dense_to_one_expert(dense.blocks[1].mlp, moe.blocks[1].mlp)
    images = torch.rand(3, 8, 8)
    out_d, out_m = dense(images), moe(images)
    torch.testing.assert_close(out_m.logits, out_d.logits, rtol=1e-5, atol=1e-5)
    target = torch.tensor([0, 3, 7])
    torch.nn.functional.cross_entropy(out_d.logits, target).backward()
    torch.nn.functional.cross_entropy(out_m.logits, target).backward()
    grads_d = dict(dense.named_parameters())
    for name, p in moe.named_parameters():
        if name in grads_d:
            torch.testing.assert_close(p.grad, grads_d[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    e, d = moe.blocks[1].mlp.experts, dense.blocks[1].mlp
    torch.testing.assert_close(e.w_in_EDF.grad[0], d.up_proj.weight.grad.t(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(e.w_out_EFD.grad[0], d.down_proj.weight.grad.t(), rtol=1e-4, atol=1e-6)
    assert moe.blocks[1].mlp.router.gate.weight.grad.abs().sum() == 0  # softmax over one expert is 1


@pytest.mark.parametrize("router,extra", [
    pytest.param("topk", {}, id="topk"),
    pytest.param("topk", {"capacity_factor": 0.5, "drop_policy": "batch_priority"}, id="topk-bpr"),
    pytest.param("expert_choice", {}, id="expert_choice"),
    pytest.param("soft", {"soft_slots": 2}, id="soft"),
    pytest.param("sinkhorn", {}, id="sinkhorn"),
])
def test_every_router_trains(router: str, extra: dict) -> None:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2, router=router, activation="gelu", **extra)
    model = ViT(tiny(moe, moe_every=1))
    out = model(torch.rand(4, 8, 8))
    assert out.logits.shape == (4, 10) and len(out.routing) == 2
    (out.logits.sum() + out.aux_loss).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "gate" in n or "phi" in n)
    assert flops_per_image(model.config) > 0


def test_wrong_image_size_is_a_clear_error() -> None:
    model = ViT(tiny())
    with pytest.raises(ValueError, match=r"image_size=28"):
        model(torch.rand(2, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.rand(2, 3, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(2, 8, 8, dtype=torch.uint8))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        ViTConfig(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="moe.d_model"):
        tiny(MoEConfig(d_model=8, d_ff=8, num_experts=2))
    with pytest.raises(ValueError, match="pooling"):
        tiny(pooling="max")
