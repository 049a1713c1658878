"""Slow reference for `Experts.forward`: a plain Python loop over experts and their row blocks.

Reads the module's 3-D weights (and biases) directly, so the fast grouped-GEMM path is checked
against the most obvious way to compute the same thing.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.experts.activations import glu, plain


def reference_experts(experts: nn.Module, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    """Expert e applied to rows [sum(counts[:e]), sum(counts[:e+1])) of x_RD; returns (R, D)."""
    cfg = experts.config
    names = ("gate", "up") if cfg.gated else ("in",)
    out = "down" if cfg.gated else "out"

    def bias(name: str, e: int) -> Tensor | float:
        b = getattr(experts, name, None)
        return 0.0 if b is None else b[e]

    ys = []
    start = 0
    for e, count in enumerate(counts_E.tolist()):
        x_rD = x_RD[start:start + count]
        start += count
        hs = [x_rD @ getattr(experts, f"w_{n}_EDF")[e] + bias(f"b_{n}_EF", e) for n in names]
        h_rF = glu(hs[0], hs[1], cfg.activation) if cfg.gated else plain(hs[0], cfg.activation)
        ys.append(h_rF @ getattr(experts, f"w_{out}_EFD")[e] + bias(f"b_{out}_ED", e))
    assert start == x_RD.shape[0], "rows beyond sum(counts_E)"
    return torch.cat(ys) if ys else x_RD.new_zeros(0, x_RD.shape[1])
