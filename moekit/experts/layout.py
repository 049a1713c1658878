"""Memory layouts that the CPU's reduced-precision matrix multiply runs fast.

On a CPU without native bf16 instructions (AVX2, AVX-512 without BF16) torch's bf16/fp16 GEMM is
fast only when exactly one operand of `a @ b` is a transposed view (column-major): with both
row-major it is 6-15x slower, with both transposed 25-50x slower (measured on this project's
2-core AVX2 VM: 16384x256 @ 256x128 in bf16 takes 603 ms row-major x row-major, 96 ms with b
transposed, 82 ms with a transposed; fp32 takes 22 ms in every layout). fp32 and every other
device are left alone.

So expert weights are stored as the Hugging Face checkpoints store them, (out, in) per expert, and
exposed as (in, out) views (`linear_layout`): the forward `x @ W` is then the fast pair, and
`fast_operands` fixes the backward's pairs by copying the smaller operand.
"""

from __future__ import annotations

import torch
from torch import Tensor

_REDUCED = (torch.bfloat16, torch.float16)


def linear_layout(*batch: int, n_in: int, n_out: int, **factory: object) -> Tensor:
    """An uninitialised (*batch, n_in, n_out) tensor stored (*batch, n_out, n_in): each matrix is
    the transposed view of a row-major (out, in) matrix, as `nn.Linear` and Hugging Face store it."""
    return torch.empty(*batch, n_out, n_in, **factory).transpose(-2, -1)  # type: ignore[arg-type]


def is_transposed(t: Tensor) -> bool:
    """True when the last two dims are column-major (a transposed view of a row-major matrix)."""
    return t.dim() >= 2 and t.stride(-2) == 1 and t.stride(-1) != 1 and t.shape[-1] > 1


def _flipped(t: Tensor) -> Tensor:
    """The same values in the other layout of the last two dims (one copy), with the leading
    stride padded to 16 bytes, which the grouped-GEMM kernels require."""
    step = max(1, 16 // t.element_size())
    transposed = is_transposed(t)
    src = t if transposed else t.transpose(-2, -1)  # copy src row-major: t's other layout
    rows, cols = src.shape[-2:]
    buf = t.new_empty(*t.shape[:-2], rows, -(-cols // step) * step)[..., :cols]
    buf.copy_(src)
    return buf if transposed else buf.transpose(-2, -1)


def _aligned_leading_stride(t: Tensor) -> bool:
    """The non-unit stride of a matrix is a multiple of 16 bytes (what grouped GEMMs need)."""
    return all(s * t.element_size() % 16 == 0 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1)


def needs_fast_operands(a: Tensor) -> bool:
    return a.device.type == "cpu" and a.dtype in _REDUCED


def fast_operands(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """`a` and `b` (same values) laid out so that exactly one is transposed, where that matters.

    Copies the smaller operand when both have the same layout; returns them untouched otherwise
    (and always for fp32 or off the CPU).
    """
    if not needs_fast_operands(a) or is_transposed(a) != is_transposed(b):
        return a, b
    if a.numel() <= b.numel():
        return _flipped(a), b
    return a, _flipped(b)


class _Matmul(torch.autograd.Function):
    """a @ b (2-D) with `fast_operands` in the forward and in both products of the backward; the
    gradient of b is computed in b's own layout."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return torch.mm(*fast_operands(a, b))

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        grad_a = torch.mm(*fast_operands(g, b.t())) if ctx.needs_input_grad[0] else None
        grad_b = None
        if ctx.needs_input_grad[1]:
            grad_b = torch.mm(*fast_operands(g.t(), a)).t() if is_transposed(b) else torch.mm(
                *fast_operands(a.t(), g))
        return grad_a, grad_b


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b` for 2-D tensors, forward and backward in fast layouts (plain `torch.mm` semantics)."""
    if not needs_fast_operands(a):
        return torch.mm(a, b)
    return _Matmul.apply(a, b)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` (weight (out, in)) whose backward also runs in fast layouts on
    the CPU's reduced-precision kernels (F.linear's input gradient is the slow pair there)."""
    if not needs_fast_operands(x) or x.dim() < 2:
        return torch.nn.functional.linear(x, weight, bias)
    y = matmul(x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias
