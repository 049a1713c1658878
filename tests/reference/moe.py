"""Slow reference MoE forward: one token at a time, one (expert, weight) slot at a time.

Reads the Experts module's 3-D weights directly (w_gate_EDF / w_up_EDF / w_down_EFD or
w_in_EDF / w_out_EFD, plus optional biases), so it checks dispatch, experts and combine together.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.experts.activations import glu, plain


def expert_mlp(experts: nn.Module, e: int, x_D: Tensor) -> Tensor:
    """Expert e of an `Experts` module applied to one vector x_D, in x's dtype."""
    cfg = experts.config

    def bias(name: str) -> Tensor | float:
        b = getattr(experts, name, None)
        return 0.0 if b is None else b[e]

    if cfg.gated:
        gate_F = x_D @ experts.w_gate_EDF[e] + bias("b_gate_EF")
        up_F = x_D @ experts.w_up_EDF[e] + bias("b_up_EF")
        return glu(gate_F, up_F, cfg.activation) @ experts.w_down_EFD[e] + bias("b_down_ED")
    h_F = plain(x_D @ experts.w_in_EDF[e] + bias("b_in_EF"), cfg.activation)
    return h_F @ experts.w_out_EFD[e] + bias("b_out_ED")


def reference_moe(x_TD: Tensor, expert_ids_TK: Tensor, weights_TK: Tensor, experts_module: nn.Module) -> Tensor:
    """y_t = sum over token t's slots k with expert_ids_TK[t, k] >= 0 of weights_TK[t, k] * expert(x_t).

    Accumulates in fp32 and returns x's dtype; a token with no expert gets 0.
    """
    T, D = x_TD.shape
    rows = []
    for t in range(T):
        y_D = torch.zeros(D, dtype=torch.float32, device=x_TD.device)
        for k in range(expert_ids_TK.shape[1]):
            e = int(expert_ids_TK[t, k])
            if e >= 0:
                y_D = y_D + weights_TK[t, k].float() * expert_mlp(experts_module, e, x_TD[t]).float()
        rows.append(y_D)
    return torch.stack(rows).to(x_TD.dtype) if rows else x_TD.new_zeros(0, D)
