"""Inference-time linear layers on the CPU kernel that is fast for the rows, dtype and weight layout.

On a CPU without native bf16 (AVX2; AVX-512 without BF16) torch's bf16 matrix multiply is slow
for more than one row: measured on this project's 2-core AVX2 VM, a (512, 512) @ (512, 1024)
product takes ~135 ms in bf16 and ~3.6 ms in fp32, and at 16 rows 3-14 ms against 0.2-0.3 ms.
So without gradients, a reduced-precision linear of several rows runs in fp32 (inputs are exact
in fp32; the products are accumulated in fp32 as the bf16 kernels do, and rounded back once).
One row (a decode step) stays in bf16, where it is bandwidth-bound: with the weight stored
transposed (`lm_head_layout`), a matrix-vector product reads it at the highest speed measured.
With gradients, on other devices and for fp32 this is `F.linear` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_REDUCED = (torch.bfloat16, torch.float16)


def slow_reduced_matmul(x: Tensor) -> bool:
    """True on a CPU whose bf16/fp16 matrix multiply has no native instructions (AVX512-BF16 or AMX)."""
    if x.device.type != "cpu" or x.dtype not in _REDUCED:
        return False
    cpu = torch.cpu
    if x.dtype == torch.bfloat16:
        return not (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    return not cpu._is_amx_fp16_supported()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` (weight (out, in), any strides) on the fast kernel for the case.

    Exactly `F.linear` when gradients are on or the dtype/device has fast matmuls; otherwise a
    single row takes a matrix-vector product in the weight's dtype, more rows an fp32 product.
    """
    if torch.is_grad_enabled() or not slow_reduced_matmul(x) or x.dim() < 1:
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows == 1 and weight.stride(0) == 1:
        # column-major weight (lm_head_layout): mv streams it once, at bandwidth
        y = torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    if rows == 1:
        return F.linear(x, weight, bias)
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


def project(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`, through `linear` for an nn.Linear (other modules, e.g. quantized ones, as they are)."""
    if type(module) is not nn.Linear:
        return module(x)
    return linear(x, module.weight, module.bias)


@torch.no_grad()
def lm_head_layout(model: nn.Module) -> bool:
    """Store an untied LM head (V, D) weight as the transposed view of a row-major (D, V) matrix.

    Names, shapes and values are unchanged; a batch-1 decode step then reads the largest matrix of
    a small model at about twice the speed (fp32 through F.linear, bf16 through `linear`'s
    matrix-vector product: 4.5 vs 10 ms and 3.6 vs 6.5 ms for (32000, 512) on the 2-core AVX2 VM).
    A tied head (shared with the embedding, which reads rows) is left alone. Returns whether it
    changed anything. Anything that saves the weight must make it contiguous first.
    """
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not isinstance(head, nn.Linear) or head.weight.device.type != "cpu" or (
            embed is not None and embed.weight is head.weight) or head.weight.stride(0) == 1:
        return False
    head.weight.data = head.weight.data.t().contiguous().t()
    return True
