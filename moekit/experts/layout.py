"""Where the CPU's reduced-precision matrix multiply is slow, and what the experts do about it.

On a CPU without native bf16/fp16 matrix instructions (AVX2; AVX-512 without BF16/AMX) torch's
bf16 GEMM runs 4-15x slower than fp32 on the same shape, whatever the layout (measured on this
project's 2-core AVX2 VM: a grouped GEMM of 16384 x 256 rows into 128 experts of 256 x 128 takes
138 ms in bf16 and 29 ms when its operands are cast to fp32 first, the casts included). So there,
a product in which several rows (`FP32_MIN_ROWS`) share each weight is computed in fp32 from the
bf16 values (exact: bf16 is a subset of fp32, and the bf16 kernels accumulate in fp32 too) and
rounded back to bf16 once. With fewer rows per weight (a decode step, or many experts with a row
or two each) it stays in bf16: it is bound by reading the weight, which the cast would triple.

Expert weights are stored as checkpoints store them, (out, in) per expert, and exposed as (in, out)
views (`linear_layout`): a one-row product then reads each weight row-contiguously.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.kernels import cpu as cpu_kernels

_REDUCED = (torch.bfloat16, torch.float16)


def linear_layout(*batch: int, n_in: int, n_out: int, **factory: object) -> Tensor:
    """An uninitialised (*batch, n_in, n_out) tensor stored (*batch, n_out, n_in): each matrix is
    the transposed view of a row-major (out, in) matrix, as `nn.Linear` and Hugging Face store it."""
    return torch.empty(*batch, n_out, n_in, **factory).transpose(-2, -1)  # type: ignore[arg-type]


def is_transposed(t: Tensor) -> bool:
    """True when the last two dims are column-major (a transposed view of a row-major matrix)."""
    return t.dim() >= 2 and t.stride(-2) == 1 and t.stride(-1) != 1 and t.shape[-1] > 1


def slow_reduced_matmul(x: Tensor) -> bool:
    """True for a bf16/fp16 tensor on a CPU without native matrix instructions for its dtype."""
    if x.device.type != "cpu" or x.dtype not in _REDUCED:
        return False
    if x.dtype == torch.bfloat16:
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return not torch.cpu._is_amx_fp16_supported()


# Rows sharing one weight from which the fp32 product (with its casts of the weight) wins; below
# it the product reads the weight for a few rows and the bf16 kernel, which reads half the bytes, wins.
FP32_MIN_ROWS = 4


def compute_dtype(x: Tensor, rows: float) -> torch.dtype:
    """The dtype a product of `rows` rows of `x` is computed in (see the module docstring). Under
    torch.compile the dtype stays (inductor's grouped GEMM takes bf16 only, and fuses its own casts)."""
    if rows < FP32_MIN_ROWS or torch.compiler.is_compiling() or not slow_reduced_matmul(x):
        return x.dtype
    return torch.float32


class _Matmul(torch.autograd.Function):
    """a @ b (2-D) computed in `compute_dtype`; saves the operands in their own dtype."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(a, b)
        return torch.mm(a.float(), b.float()).to(a.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        g = g.float()
        grad_a = (g @ b.float().t()).to(a.dtype) if ctx.needs_input_grad[0] else None
        grad_b = (a.float().t() @ g).to(b.dtype) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """`a @ b` for 2-D tensors (plain `torch.mm` semantics), in `compute_dtype`."""
    if compute_dtype(a, a.shape[0]) == a.dtype:
        return torch.mm(a, b)
    return _Matmul.apply(a, b)


def affine(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """`x @ w + b` (2-D x, w (in, out), b (out,) or None) as one addmm, in `compute_dtype`."""
    if b is None:
        return matmul(x, w)
    if compute_dtype(x, x.shape[0]) == x.dtype:
        return torch.addmm(b, x, w)
    return matmul(x, w) + b


# Rows up to which, without autograd, a product with an (out, in) row-major weight runs the CPU
# kernel that streams the weight once (`moekit.kernels.cpu.linear_rows`; benchmarks/decode.py).
KERNEL_MAX_ROWS = 16


def _rows(x: Tensor) -> int:
    """Rows of x for a product over its last dim."""
    return x.numel() // x.shape[-1] if x.dim() else 1


def _kernel_takes(x: Tensor, rows: int, weights: list[tuple[Tensor, Tensor | None]]) -> bool:
    """True where `linear` runs the CPU kernel: few rows, no autograd, (out, in) row-major weights."""
    return (0 < rows <= KERNEL_MAX_ROWS and x.dim() >= 1
            and all(w.dim() == 2 and w.stride(-1) == 1 and (b is None or b.is_contiguous())
                    for w, b in weights)
            and cpu_kernels.supports(x, *(t for pair in weights for t in pair if t is not None)))


def linear_many(x: Tensor, weights: list[tuple[Tensor, Tensor | None]]) -> list[Tensor]:
    """[linear(x, w, b) for w, b in weights]: one kernel call for all of them where the kernel runs
    (a decode step's q/k/v projections, an MLP's gate and up)."""
    if _kernel_takes(x, _rows(x), weights):
        return cpu_kernels.linear_rows_many(x, weights)
    return [linear(x, w, b) for w, b in weights]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` (weight (out, in), any strides), in `compute_dtype` (forward and
    backward). Up to `KERNEL_MAX_ROWS` rows without autograd on a row-major weight: the CPU
    kernel, accumulating in fp32. One bf16 row without gradients, on a weight stored column-major
    (`moekit.model.linear.lm_head_layout`), is a matrix-vector product: it streams the weight once."""
    rows = _rows(x)
    if _kernel_takes(x, rows, [(weight, bias)]):
        return cpu_kernels.linear_rows(x, weight, bias)
    if (rows == 1 and x.dim() >= 1 and weight.stride(0) == 1 and not torch.is_grad_enabled()
            and slow_reduced_matmul(x)):
        y = torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
        return y if bias is None else y + bias
    if x.dim() < 2 or compute_dtype(x, rows) == x.dtype:
        return torch.nn.functional.linear(x, weight, bias)
    y = matmul(x.reshape(-1, x.shape[-1]), weight.t()).view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias
