"""One routed expert's parameter shapes and MLP, exactly as `moekit.experts.grouped.Experts` computes
them, for the offloaded (`offload.py`) and the quantized (`quant.py`) expert modules."""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import MoEConfig
from moekit.experts.activations import glu, plain
from moekit.experts.grouped import Experts
from moekit.experts.layout import affine


def expert_param_shapes(config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Per-expert shape of each routed-expert parameter of `Experts(config)` (e.g. w_up_EDF: (D, F))."""
    with torch.device("meta"):
        experts = Experts(config, num_experts=1)
    return {name: tuple(p.shape[1:]) for name, p in experts.named_parameters()}


def expert_param_transposed(config: MoEConfig) -> frozenset[str]:
    """The 2-D per-expert weights that `Experts(config)` stores column-major (a transposed view of a
    contiguous (out, in) tensor, the Hugging Face layout), read from the strides of a meta build."""
    with torch.device("meta"):
        experts = Experts(config, num_experts=1)
    out = set()
    for name, p in experts.named_parameters():
        w = p[0]
        if w.dim() == 2 and w.shape[0] > 1 and w.shape[1] > 1 and w.stride() == (1, w.shape[0]):
            out.add(name)
    return frozenset(out)


def expert_forward(x_rD: Tensor, w: dict[str, Tensor], config: MoEConfig, *, fused_bias: bool,
                   matmul) -> Tensor:
    """One expert's MLP on its rows, as `Experts` computes it: with `fused_bias` (its decode path)
    biases enter through addmm, else (its grouped path) they are added after the matmul.

    `matmul(x, name)` multiplies by the weight `name` (float or quantized)."""
    names = ("gate", "up") if config.gated else ("in",)
    out = "down" if config.gated else "out"

    def project(x: Tensor, weight: str, bias: str) -> Tensor:
        b = w.get(bias)
        if b is None:
            return matmul(x, weight)
        if fused_bias and weight in w:
            return affine(x, w[weight], b)
        return matmul(x, weight) + b

    hs = [project(x_rD, f"w_{n}_EDF", f"b_{n}_EF") for n in names]
    h_rF = glu(hs[0], hs[1], config.activation) if config.gated else plain(hs[0], config.activation)
    return project(h_rF, f"w_{out}_EFD", f"b_{out}_ED")
