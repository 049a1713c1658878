"""Expert activations: gated (GLU) ones take a gate and an up projection, plain ones one input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# gpt-oss clamped SwiGLU constants (openai/gpt-oss, swiglu_limit and alpha of its MLP).
CLAMP_LIMIT = 7.0
CLAMP_ALPHA = 1.702


def glu(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """SwiGLU (Shazeer 2020): silu(gate) * up; GeGLU: gelu(gate) * up (tanh approximation)."""
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "geglu":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "clamped_swiglu":
        # gpt-oss: gate clamped above, up clamped both sides, sigmoid(alpha * gate) and (up + 1).
        gate = gate.clamp(max=CLAMP_LIMIT)
        up = up.clamp(min=-CLAMP_LIMIT, max=CLAMP_LIMIT)
        return (up + 1) * (gate * torch.sigmoid(CLAMP_ALPHA * gate))
    raise ValueError(f"activation={activation!r} is not a gated activation")


def plain(h: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"activation={activation!r} is not a plain activation")
