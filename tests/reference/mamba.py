"""Slow, obviously-correct Mamba mixer: one time step at a time, straight from the equations.

Reads the weights of a moekit MambaMixer by name; shares no code with moekit.model.mamba.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def mamba_reference(mixer, x_BSD: Tensor) -> tuple[Tensor, Tensor]:
    """Returns y (B, S, D) and the final SSM state (B, I, N), in float64; differentiable."""
    cfg = mixer.config
    p = {n: t.double() for n, t in mixer.named_parameters()}  # gradients flow back to the mixer
    x = x_BSD.double()
    Bsz, S, _ = x.shape
    I, N, R, K = cfg.d_inner, cfg.d_state, cfg.rank, cfg.d_conv
    xz = x @ p["in_proj.weight"].t() + (p["in_proj.bias"] if cfg.bias else 0)
    u, z = xz[..., :I], xz[..., I:]
    A = -torch.exp(p["A_log"])  # (I, N)
    h = torch.zeros(Bsz, I, N, dtype=torch.float64)
    ys = []
    for t in range(S):
        # causal depthwise conv: tap j of the kernel sees input t - (K - 1 - j)
        c = torch.zeros(Bsz, I, dtype=torch.float64)
        for j in range(K):
            src = t - (K - 1 - j)
            if src >= 0:
                c = c + p["conv1d.weight"][:, 0, j] * u[:, src]
        if cfg.conv_bias:
            c = c + p["conv1d.bias"]
        c = F.silu(c)
        proj = c @ p["x_proj.weight"].t()
        dt, Bt, Ct = proj[:, :R], proj[:, R:R + N], proj[:, R + N:]
        if cfg.dt_layernorm:
            dt = rms(dt, p["dt_layernorm.weight"], cfg.norm_eps)
            Bt = rms(Bt, p["b_layernorm.weight"], cfg.norm_eps)
            Ct = rms(Ct, p["c_layernorm.weight"], cfg.norm_eps)
        delta = F.softplus(dt @ p["dt_proj.weight"].t() + p["dt_proj.bias"])  # (B, I)
        # h_t = exp(delta A) h_{t-1} + delta B_t x_t, channel by channel
        h = torch.stack([torch.exp(delta[:, i, None] * A[i]) * h[:, i] + delta[:, i, None] * Bt * c[:, i, None]
                         for i in range(I)], dim=1)
        y = (h * Ct[:, None, :]).sum(-1) + p["D"] * c
        ys.append(y * F.silu(z[:, t]))
    y = torch.stack(ys, dim=1) @ p["out_proj.weight"].t() + (p["out_proj.bias"] if cfg.bias else 0)
    return y, h
