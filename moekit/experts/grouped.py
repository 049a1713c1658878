"""Routed experts with 3-D weights: every projection of every expert in one tensor.

`Experts.forward(x_RD, counts_E)` takes rows already sorted by expert (`counts_E[e]` rows for
expert e, in order) and returns one output row per input row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts.activations import glu, plain


class Experts(nn.Module):
    """E independent MLPs stored as `w_gate_EDF`, `w_up_EDF`, `w_down_EFD` (GLU) or
    `w_in_EDF`, `w_out_EFD` (plain), with optional biases `b_*_EF` / `b_*_ED`."""

    def __init__(self, config: MoEConfig, *, num_experts: int | None = None) -> None:
        super().__init__()
        self.config = config
        E = num_experts if num_experts is not None else config.num_experts
        D, F = config.d_model, config.d_ff
        self.num_experts = E
        names_in = ("w_gate_EDF", "w_up_EDF") if config.gated else ("w_in_EDF",)
        out_name = "w_down_EFD" if config.gated else "w_out_EFD"
        for name in names_in:
            self.register_parameter(name, nn.Parameter(torch.empty(E, D, F)))
        self.register_parameter(out_name, nn.Parameter(torch.empty(E, F, D)))
        if config.expert_mlp_bias:
            for name in names_in:
                bias = "b_" + name[2:-3] + "EF"
                self.register_parameter(bias, nn.Parameter(torch.zeros(E, F)))
            self.register_parameter("b_" + out_name[2:-3] + "ED", nn.Parameter(torch.zeros(E, D)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        D, F = self.config.d_model, self.config.d_ff
        for name, p in self.named_parameters(recurse=False):
            if name.startswith("w_"):
                fan_in = F if name.endswith("EFD") else D
                nn.init.normal_(p, std=1.0 / math.sqrt(fan_in))
            else:
                nn.init.zeros_(p)

    def input_projections(self) -> list[tuple[Tensor, Tensor | None]]:
        """(weight_EDF, bias_EF or None) for each input projection (gate, up) or (in)."""
        names = ("gate", "up") if self.config.gated else ("in",)
        return [(getattr(self, f"w_{n}_EDF"), getattr(self, f"b_{n}_EF", None)) for n in names]

    def output_projection(self) -> tuple[Tensor, Tensor | None]:
        n = "down" if self.config.gated else "out"
        return getattr(self, f"w_{n}_EFD"), getattr(self, f"b_{n}_ED", None)

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Run each expert on its contiguous block of rows. Rows beyond sum(counts_E) are not allowed."""
        out_RD = x_RD.new_empty(x_RD.shape)
        bounds = [0] + torch.cumsum(counts_E, 0).tolist()
        ins = self.input_projections()
        w_out_EFD, b_out_ED = self.output_projection()
        for e in range(self.num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi == lo:
                continue
            x_rD = x_RD[lo:hi]
            hs = [x_rD @ w[e] + (0 if b is None else b[e]) for w, b in ins]
            h_rF = glu(hs[0], hs[1], self.config.activation) if self.config.gated else plain(
                hs[0], self.config.activation)
            y_rD = h_rF @ w_out_EFD[e]
            out_RD[lo:hi] = y_rD if b_out_ED is None else y_rD + b_out_ED[e]
        return out_RD
