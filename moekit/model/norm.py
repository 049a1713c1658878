"""Normalisation layers: RMSNorm (statistics in fp32, as transformers) and LayerNorm with or without bias.

`make_norm` picks one from a ModelConfig; `l2_norm` is Llama 4's parameter-free QK-norm.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from moekit.kernels import cpu as cpu_kernels


# Up to this many elements (a decode step's rows), without autograd, RMSNorm runs as one CPU
# kernel call (`moekit.kernels.cpu.rmsnorm`) instead of eight small torch ops.
KERNEL_MAX_ELEMENTS = 1 << 15


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight, the one class moekit uses.

    Normalises in fp32 (or wider, for fp64 input), then, as transformers does:
        cast_to="input" (Llama, Mixtral, Jamba): back to the input dtype, then times the weight;
        cast_to="weight" (T5 / Switch Transformers): to the weight's dtype only when that is fp16 or
            bf16, then times the weight.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, cast_to: Literal["input", "weight"] = "input") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps
        self.cast_to = cast_to

    def forward(self, x: Tensor) -> Tensor:
        if (self.cast_to == "input" and x.dim() and x.numel() <= KERNEL_MAX_ELEMENTS
                and cpu_kernels.supports(x, self.weight)):
            return cpu_kernels.rmsnorm(x, self.weight, self.variance_epsilon)  # a decode step's few rows
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.cast_to == "input":
            return self.weight * x32.to(x.dtype)
        half = self.weight.dtype in (torch.float16, torch.bfloat16)
        return self.weight * (x32.to(self.weight.dtype) if half else x32)


def l2_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Parameter-free L2 normalisation over the last dim, in fp32 (Llama 4 QK-norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = False) -> nn.Module:
    """An RMSNorm, or a torch LayerNorm with or without bias (DBRX: without; Phi-3.5-MoE: with)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"norm={kind!r} is unknown; use 'rmsnorm' or 'layernorm'")


__all__ = ["RMSNorm", "l2_norm", "make_norm"]
