"""A Vision Transformer whose MLPs are MoE layers every other block (V-MoE, Riquelme et al. 2021).

    image (B, H, W) -> patches (B, P, C*p*p) -> linear embed + position (+ class token) -> blocks
    block: x + attn(LN(x)); x + mlp(LN(x)), the mlp a dense GELU MLP or an `MoELayer` (any router)
    -> LN -> class token or mean over patches -> linear head (B, classes)
Shape suffixes beyond types.py: P patches, S = P (+1 with a class token), N classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig, check, check_choice
from moekit.experts.dense import DenseMLP
from moekit.layer import MoELayer
from moekit.model.accounting import count_params
from moekit.soft_layer import make_moe_layer
from moekit.types import RoutingDecision

INIT_STD = 0.02


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Shape of a (V-MoE) Vision Transformer.

    Args:
        image_size / channels: input images are (channels, image_size, image_size).
        patch_size: side of the square patches (must divide image_size).
        d_model / n_layers / n_heads / d_ff: width, depth, attention heads, dense MLP width.
        pooling: "cls" (a learned class token) or "mean" (average over patch tokens).
        moe: the MoE layer of the MoE blocks (None: a dense ViT).
        moe_every: every `moe_every`-th block has an MoE MLP, counting from the second (V-MoE's
            "every other layer" is 2; 1 makes every block MoE).
    """

    image_size: int = 28
    channels: int = 1
    patch_size: int = 4
    num_classes: int = 10
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 128
    pooling: Literal["cls", "mean"] = "mean"
    moe: MoEConfig | None = None
    moe_every: int = 2

    def __post_init__(self) -> None:
        for name in ("image_size", "channels", "patch_size", "num_classes", "d_model", "n_layers",
                     "n_heads", "d_ff", "moe_every"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, value, "must be a positive integer")
        check(self.image_size % self.patch_size == 0, "patch_size", self.patch_size,
              f"must divide image_size={self.image_size}")
        check(self.d_model % self.n_heads == 0, "n_heads", self.n_heads,
              f"must divide d_model={self.d_model}")
        check_choice(self.pooling, "pooling", ("cls", "mean"))
        if self.moe is not None:
            check(self.moe.d_model == self.d_model, "moe.d_model", self.moe.d_model,
                  f"must equal d_model={self.d_model}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.num_patches + (self.pooling == "cls")

    def is_moe_block(self, i: int) -> bool:
        return self.moe is not None and i % self.moe_every == self.moe_every - 1

    def to_dict(self) -> dict:
        out = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "moe"}
        out["moe"] = None if self.moe is None else self.moe.to_dict()
        return out


def patchify(images_BCHW: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, P, C*p*p), patches in row-major order, pixels (c, i, j) within a patch."""
    B, C, H, W = images_BCHW.shape
    p = patch_size
    x = images_BCHW.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention (an encoder: no mask)."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x_BSD: Tensor) -> Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y_BHSd = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y_BHSd.transpose(1, 2).reshape(B, S, D))


class ViTBlock(nn.Module):
    """Pre-norm encoder block; `mlp` is a DenseMLP or an MoELayer."""

    def __init__(self, config: ViTConfig, moe: bool) -> None:
        super().__init__()
        D = config.d_model
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = SelfAttention(D, config.n_heads)
        self.mlp: nn.Module = (make_moe_layer(config.moe) if moe and config.moe is not None
                               else DenseMLP(D, config.d_ff, "gelu", bias=True))

    def forward(self, x_BSD: Tensor) -> tuple[Tensor, dict[str, Tensor], RoutingDecision | None]:
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD))
        h_BSD = self.norm2(x_BSD)
        if isinstance(self.mlp, MoELayer):
            out = self.mlp(h_BSD)
            return x_BSD + out.y, out.aux_losses, out.decision
        return x_BSD + self.mlp(h_BSD), {}, None


@dataclass(frozen=True)
class VisionOutput:
    """logits (B, N); `aux_loss` the coefficient-weighted sum over MoE layers (0 for a dense ViT);
    `routing` one decision per MoE block (tokens T = B * S, image-major)."""

    logits: Tensor
    aux_loss: Tensor
    aux_losses: dict[str, Tensor]
    routing: list[RoutingDecision]


class ViT(nn.Module):
    """forward(images) with images (B, H, W) (one channel) or (B, C, H, W), float in [0, 1] or
    already normalised; a size other than the config's raises a ValueError naming it."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        D, p, C = config.d_model, config.patch_size, config.channels
        self.patch_embed = nn.Linear(C * p * p, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.seq_len, D))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if config.pooling == "cls" else None
        self.blocks = nn.ModuleList(ViTBlock(config, config.is_moe_block(i)) for i in range(config.n_layers))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, config.num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Linear layers: truncated normal with std 1/sqrt(fan_in), as the routed experts draw theirs
        (so dense and expert MLPs start alike), zero biases; position embedding and class token
        normal(0.02); a zero head. (std 0.02 everywhere learned ~12 points slower in 150 steps.)"""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = module.in_features ** -0.5
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        nn.init.zeros_(self.head.weight)

    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoELayer)]

    def check_images(self, images: Tensor) -> Tensor:
        """(B, C, H, W) float from (B, H, W) or (B, C, H, W); ValueError on any other shape."""
        c = self.config
        if images.dim() == 3 and c.channels == 1:
            images = images[:, None]
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"images have shape {tuple(images.shape)}; this ViT takes (B, {c.channels}, "
                             f"{c.image_size}, {c.image_size})" + (f" or (B, {c.image_size}, {c.image_size})"
                             if c.channels == 1 else "") + ": resize the images or build the ViTConfig "
                             f"with image_size={images.shape[-1]}")
        if not images.is_floating_point():
            raise TypeError(f"images have dtype {images.dtype}; pass floats (e.g. uint8 pixels / 255)")
        return images

    def forward(self, images: Tensor) -> VisionOutput:
        images_BCHW = self.check_images(images)
        x_BSD = self.patch_embed(patchify(images_BCHW, self.config.patch_size))
        if self.cls_token is not None:
            x_BSD = torch.cat([self.cls_token.expand(x_BSD.shape[0], -1, -1), x_BSD], dim=1)
        x_BSD = x_BSD + self.pos_embed
        aux_loss = torch.zeros((), device=x_BSD.device)
        aux_named: dict[str, Tensor] = {}
        routing: list[RoutingDecision] = []
        for block in self.blocks:
            x_BSD, aux, decision = block(x_BSD)
            if decision is not None:
                routing.append(decision)
                aux_loss = aux_loss + block.mlp.aux_loss(aux)
                for k, v in aux.items():
                    aux_named[k] = aux_named.get(k, 0.0) + v
        x_BSD = self.norm(x_BSD)
        pooled_BD = x_BSD[:, 0] if self.cls_token is not None else x_BSD.mean(1)
        return VisionOutput(self.head(pooled_BD), aux_loss, aux_named, routing)


def dense_to_one_expert(dense: DenseMLP, moe: MoELayer) -> None:
    """Copy a GELU DenseMLP's weights into a one-expert MoELayer (expert_mlp_bias=True)."""
    with torch.no_grad():
        moe.experts.w_in_EDF[0].copy_(dense.up_proj.weight.t())
        moe.experts.b_in_EF[0].copy_(dense.up_proj.bias)
        moe.experts.w_out_EFD[0].copy_(dense.down_proj.weight.t())
        moe.experts.b_out_ED[0].copy_(dense.down_proj.bias)


def active_params(model: ViT) -> int:
    """Parameters one token touches: everything minus the experts a token does not use
    (Soft MoE: every expert sees slots, so per token it is E * slots / S experts' worth)."""
    total = count_params(model)
    c = model.config
    for layer in model.moe_layers():
        m = layer.config
        if m.router == "soft":
            used = m.num_experts * m.soft_slots / c.seq_len
        else:
            used = m.top_k
        per_expert = count_params(layer.experts) / m.num_experts
        total -= round((m.num_experts - used) * per_expert)
    return total


def flops_per_image(config: ViTConfig) -> float:
    """Forward multiply-adds x 2 per image: embeddings, attention, dense MLPs and the active expert
    MLPs (top_k experts per token; Soft MoE: E * slots slot rows)."""
    c, S, D = config, config.seq_len, config.d_model
    flops = 2 * c.num_patches * c.channels * c.patch_size ** 2 * D
    for i in range(c.n_layers):
        flops += 2 * S * 4 * D * D + 2 * 2 * S * S * D  # qkv + proj, scores + values
        if c.is_moe_block(i):
            m = c.moe
            assert m is not None
            rows = m.num_experts * m.soft_slots if m.router == "soft" else S * m.top_k
            flops += 2 * rows * 2 * D * m.d_ff + 2 * S * D * m.num_experts
        else:
            flops += 2 * S * 2 * D * c.d_ff
    return flops + 2 * D * c.num_classes
