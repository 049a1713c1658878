"""Linear layers of the model through `moekit.experts.layout.linear` (the compute dtype that is
fast on this CPU for the rows and dtype), and the LM head's storage for one-row decoding."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.experts.layout import linear, linear_many


def project(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`, through `linear` for an nn.Linear (other modules, e.g. quantized ones, as they are)."""
    if type(module) is not nn.Linear:
        return module(x)
    return linear(x, module.weight, module.bias)


def project_many(modules: list[nn.Module], x: Tensor) -> list[Tensor]:
    """[project(m, x) for m in modules], as one kernel call where they are all nn.Linear."""
    if all(type(m) is nn.Linear for m in modules):
        return linear_many(x, [(m.weight, m.bias) for m in modules])
    return [project(m, x) for m in modules]


@torch.no_grad()
def lm_head_layout(model: nn.Module) -> bool:
    """Store an untied LM head (V, D) weight as the transposed view of a row-major (D, V) matrix.

    Names, shapes and values are unchanged; a batch-1 decode step then reads the largest matrix of
    a small model at about twice the speed (fp32 through F.linear, bf16 through `linear`'s
    matrix-vector product: 4.5 vs 10 ms and 3.6 vs 6.5 ms for (32000, 512) on the 2-core AVX2 VM).
    Not needed where moekit's CPU kernels are built (`moekit.kernels.cpu`): they stream the (V, D)
    row-major weight at memory speed. A tied head (shared with the embedding, which reads rows) is
    left alone. Returns whether it
    changed anything. Anything that saves the weight must make it contiguous first.
    """
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not isinstance(head, nn.Linear) or head.weight.device.type != "cpu" or (
            embed is not None and embed.weight is head.weight) or head.weight.stride(0) == 1:
        return False
    head.weight.data = head.weight.data.t().contiguous().t()
    return True
