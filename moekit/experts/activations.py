"""Expert activations: gated (GLU) ones take a gate and an up projection, plain ones one input."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

GATED = ("swiglu", "geglu")


def glu(gate: Tensor, up: Tensor, activation: str) -> Tensor:
    """SwiGLU (Shazeer 2020): silu(gate) * up; GeGLU: gelu(gate) * up (tanh approximation)."""
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "geglu":
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"activation={activation!r} is not a gated activation")


def plain(h: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return F.gelu(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "silu":
        return F.silu(h)
    raise ValueError(f"activation={activation!r} is not a plain activation")
