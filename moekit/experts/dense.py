"""A dense feed-forward MLP: shared experts, Arctic's dense residual, and dense model layers."""

from __future__ import annotations

from torch import Tensor, nn

from moekit.experts.activations import glu, plain
from moekit.experts.layout import linear, linear_many
from moekit.traits import GATED_ACTIVATIONS


class DenseMLP(nn.Module):
    """`down(act(gate(x)) * up(x))` for gated activations, `out(act(in(x)))` otherwise.

    Parameter names follow the Hugging Face layout (gate_proj / up_proj / down_proj), so shared
    experts and dense layers map onto checkpoints by name.
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", *, bias: bool = False):
        super().__init__()
        self.activation = activation
        self.gated = activation in GATED_ACTIVATIONS
        if self.gated:
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        # layout.linear: F.linear with a backward in fast layouts for bf16 on CPU.
        def proj(m: nn.Linear, h: Tensor) -> Tensor:
            return linear(h, m.weight, m.bias)

        if self.gated:
            gate, up = linear_many(x, [(self.gate_proj.weight, self.gate_proj.bias),
                                       (self.up_proj.weight, self.up_proj.bias)])
            return proj(self.down_proj, glu(gate, up, self.activation))
        return proj(self.down_proj, plain(proj(self.up_proj, x), self.activation))
