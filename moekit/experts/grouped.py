"""Routed experts with 3-D weights: every projection of every expert in one tensor.

`Experts.forward(x_RD, counts_E)` takes rows sorted by expert (`counts_E[e]` rows for expert e, in
order) and runs each projection as ONE grouped GEMM over the 3-D weights, forward and backward:
on CPU moekit's own kernel where it is the faster one (`_own_kernel`: bf16 without bf16 matrix
instructions, fp32 forwards; `moekit.kernels.cpu.grouped_mm`), else `torch._grouped_mm`
in the compute dtype of `moekit.experts.layout`. Where neither can run (device, dtype, 16-byte
alignment) `grouped_matmul` falls back to a loop of plain matmuls. A decode step (a few rows)
loops over only the experts that received rows, so it reads only their weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts.activations import glu, plain
from moekit.experts.layout import affine, compute_dtype, is_transposed, linear_layout, matmul, slow_reduced_matmul
from moekit.kernels import cpu as cpu_kernels

# The CPU kernel of torch._grouped_mm (torch >= 2.9) takes these; CUDA's takes bf16 only (sm80+).
_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(t: Tensor) -> bool:
    """The grouped-GEMM kernels need the base pointer and every non-unit stride 16-byte aligned."""
    size = t.element_size()
    if any(s * size % 16 for s, n in zip(t.stride(), t.shape) if s != 1 and n > 1):
        return False
    # Under torch.compile tensors are fake (no storage); inductor allocates aligned buffers, and
    # parameters come from the eager allocator, which aligns to 64 bytes.
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0


def grouped_mm_supported(x_RD: Tensor, w_EDF: Tensor) -> bool:
    """True when `torch._grouped_mm` has a kernel for these tensors' device, dtype and layout."""
    if not hasattr(torch, "_grouped_mm") or x_RD.dtype != w_EDF.dtype:
        return False
    if torch.compiler.is_compiling() and w_EDF.dtype != torch.bfloat16:
        return False  # inductor's meta function for _grouped_mm accepts bf16 only (torch 2.13)
    device = w_EDF.device
    if device.type == "cpu":
        ok_dtype = w_EDF.dtype in _CPU_DTYPES
    elif device.type == "cuda":
        ok_dtype = w_EDF.dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    else:
        ok_dtype = False
    return ok_dtype and _aligned(x_RD) and _aligned(w_EDF)


def grouped_matmul(x_RD: Tensor, w_EDF: Tensor, counts_E: Tensor, offs_E: Tensor | None = None) -> Tensor:
    """Per-expert matmul of rows sorted by expert: y[rows of e] = x[rows of e] @ w_EDF[e].

    Forward and backward run as grouped GEMMs with operands in the layout the kernel runs fast
    (`moekit.experts.layout`); where `torch._grouped_mm` cannot run, a loop of plain matmuls.

    Args:
        x_RD: (R, D) rows sorted by expert, R == counts_E.sum().
        w_EDF: (E, D, F) weights (any strides).
        counts_E: long (E,) rows per expert.
        offs_E: int32 (E,) cumulative counts, computed from counts_E when None (pass it to share
            it between the projections of one forward).
    Returns:
        (R, F) in x's dtype.
    """
    x = _grouped_operand(x_RD, w_EDF)
    if x is not None:
        if offs_E is None:
            offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return _GroupedMatmul.apply(x, w_EDF, offs_E)
    return _loop_matmul(x_RD, w_EDF, counts_E)


def _grouped_operand(x_RD: Tensor, w_EDF: Tensor) -> Tensor | None:
    """x as the grouped path takes it (a fresh copy where only its base pointer is off, as a sliced
    view's may be), or None where `torch._grouped_mm` cannot run these operands (the loop instead)."""
    if grouped_mm_supported(x_RD, w_EDF):
        return x_RD
    if x_RD.shape[0] and grouped_mm_supported(x_RD.clone(), w_EDF):
        return x_RD.clone()
    return None


def _grouped_mm(a: Tensor, b: Tensor, offs_E: Tensor) -> Tensor:
    """`torch._grouped_mm` in `compute_dtype` of its mean rows per expert (fp32 for bf16 on a CPU
    without bf16 matrix instructions, where each expert gets several rows), returned in a's dtype."""
    if _own_kernel(a, b):
        return cpu_kernels.grouped_mm(a, b, offs_E)
    dtype = a.dtype
    rows_per_expert = (a.shape[0] if b.dim() == 3 else a.shape[1]) / max(1, offs_E.numel())
    if compute_dtype(a, rows_per_expert) != dtype:
        a, b = a.float(), b.float()
    if not (_aligned(a) and _aligned(b)):
        a, b = a.contiguous(), b.contiguous()
    return torch._grouped_mm(a, b, offs=offs_E).to(dtype)


def _own_kernel(a: Tensor, b: Tensor) -> bool:
    """True where moekit's CPU grouped GEMM (`moekit.kernels.cpu.grouped_mm`) beats torch's
    (benchmarks/moe_layer.py): bf16 on a CPU without bf16 matrix instructions (computed at the fp32
    rate from the bf16 operands, no fp32 copies), and fp32 rows times weights stored (out, in), the
    experts' forward: it reads the rows in place and shares all experts' pieces between the
    threads, where torch's kernel makes one matmul call per expert and threads each on its own.
    The fp32 backward products (input and weight gradients) stay with torch's, which runs them as
    fast on one thread."""
    if not cpu_kernels.grouped_mm_supports(a, b):
        return False
    if slow_reduced_matmul(a):
        return True
    return a.dtype == torch.float32 and b.dim() == 3 and b.stride(-2) == 1 and a.stride(-1) == 1


class _GroupedMatmul(torch.autograd.Function):
    """y_RF = x_RD @ w_EDF[expert of each row], differentiated by grouped GEMMs of its own.

    Each product runs in `compute_dtype`; only the operands in their own dtype are saved (an fp32
    copy for the backward is made there and dropped). The weight gradient is computed directly in
    the weight's memory layout (no transposing copy when it is accumulated). Experts with no rows
    get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, x_RD: Tensor, w_EDF: Tensor, offs_E: Tensor) -> Tensor:
        ctx.save_for_backward(x_RD, w_EDF, offs_E)
        return _grouped_mm(x_RD, w_EDF, offs_E)

    @staticmethod
    def backward(ctx, g_RF: Tensor):  # type: ignore[override]
        x_RD, w_EDF, offs_E = ctx.saved_tensors
        g_RF = g_RF.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = _grouped_mm(g_RF, w_EDF.transpose(-2, -1), offs_E)
        if ctx.needs_input_grad[1]:
            if is_transposed(w_EDF):  # stored (E, F, D): the gradient in the same layout
                grad_w = _grouped_mm(g_RF.t(), x_RD, offs_E).transpose(-2, -1)
            else:
                grad_w = _grouped_mm(x_RD.t(), g_RF, offs_E)
        return grad_x, grad_w.to(w_EDF.dtype) if grad_w is not None else None, None


def row_blocks(counts_E: Tensor) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of every expert that has rows (one host sync)."""
    blocks, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            blocks.append((e, start, start + n))
            start += n
    return blocks


def expert_matmul(x_rD: Tensor, w_DF: Tensor) -> Tensor:
    """One expert's rows times its weight exactly as `grouped_matmul` computes that expert's block
    (the same kernel and compute dtype, so the same bits; a forward, no autograd): for modules that
    hold their experts one at a time (`moekit.inference.offload`)."""
    w_1DF = w_DF.unsqueeze(0)
    x = _grouped_operand(x_rD, w_1DF) if x_rD.shape[0] else None
    if x is not None and _own_kernel(x, w_1DF):
        return cpu_kernels.grouped_mm(x, w_1DF, torch.tensor([x.shape[0]], dtype=torch.int32))
    return matmul(x_rD, w_DF)


def _loop_matmul(x_RD: Tensor, w_EDF: Tensor, counts_E: Tensor) -> Tensor:
    """The fallback: one matmul per expert with rows (slow on many experts, exact everywhere)."""
    ys = [matmul(x_RD[lo:hi], w_EDF[e]) for e, lo, hi in row_blocks(counts_E)]
    return torch.cat(ys) if ys else x_RD.new_zeros(0, w_EDF.shape[-1])


def rows_bias(b_EF: Tensor, counts_E: Tensor, num_rows: int) -> Tensor:
    """(R, F) bias of each row's expert (repeat_interleave with a known size: no host sync)."""
    return torch.repeat_interleave(b_EF, counts_E, dim=0, output_size=num_rows)


class Experts(nn.Module):
    """E independent MLPs stored as `w_gate_EDF`, `w_up_EDF`, `w_down_EFD` (GLU) or
    `w_in_EDF`, `w_out_EFD` (plain), with optional biases `b_*_EF` / `b_*_ED`.

    Args:
        config: the layer's MoEConfig (d_model, d_ff, activation, expert_mlp_bias).
        num_experts: experts held here (expert parallelism holds E / ep); default config.num_experts.
        fuse_gate_up: run gate and up as one grouped GEMM of width 2F over weights concatenated at
            run time. Off by default: on CPU the concatenation copies every expert's weights each
            forward, which costs more than reading the rows twice saves (benchmarks/moe_layer.py
            measures both). The parameters stay separate either way, so checkpoints load by name.
        decode_max_rows: at most this many rows (a decode step: 1-16 tokens times top_k) take the
            decode path, a loop over only the experts that received rows; the CPU grouped kernel
            calls a matmul for every expert, empty or not, which dominates a decode step.
    """

    def __init__(
        self,
        config: MoEConfig,
        *,
        num_experts: int | None = None,
        fuse_gate_up: bool = False,
        decode_max_rows: int = 64,
    ) -> None:
        super().__init__()
        self.config = config
        E = num_experts if num_experts is not None else config.num_experts
        D, F = config.d_model, config.d_ff
        self.num_experts = E
        self.fuse_gate_up = fuse_gate_up
        self.decode_max_rows = decode_max_rows
        # (the weights' addresses and dtypes, their ExpertPointers) for the decode kernel
        self._pointers: tuple[tuple, cpu_kernels.ExpertPointers | None] | None = None
        names_in = ("w_gate_EDF", "w_up_EDF") if config.gated else ("w_in_EDF",)
        out_name = "w_down_EFD" if config.gated else "w_out_EFD"
        # Stored (out, in) per expert, as checkpoints store them; see moekit.experts.layout.
        for name in names_in:
            self.register_parameter(name, nn.Parameter(linear_layout(E, n_in=D, n_out=F)))
        self.register_parameter(out_name, nn.Parameter(linear_layout(E, n_in=F, n_out=D)))
        if config.expert_mlp_bias:
            for name in names_in:
                bias = "b_" + name[2:-3] + "EF"
                self.register_parameter(bias, nn.Parameter(torch.zeros(E, F)))
            self.register_parameter("b_" + out_name[2:-3] + "ED", nn.Parameter(torch.zeros(E, D)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float | None = None) -> None:
        """Weights normal(0, std) (None: 1 / sqrt(fan_in) per matrix), biases zero."""
        D, F = self.config.d_model, self.config.d_ff
        for name, p in self.named_parameters(recurse=False):
            if name.startswith("w_"):
                fan_in = F if name.endswith("EFD") else D
                # Drawn in logical (E, in, out) order whatever the storage, so a seed gives the
                # same weights in every layout.
                p.copy_(torch.empty(p.shape, dtype=p.dtype, device=p.device).normal_(
                    std=std if std is not None else 1.0 / math.sqrt(fan_in)))
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
        """Run expert e on its block of `counts_E[e]` rows; returns (R, D) in x's dtype.

        Args:
            x_RD: (R, D) rows sorted by expert; R must equal counts_E.sum().
            counts_E: long (E,) rows per expert (experts may have 0 rows).
        """
        R = x_RD.shape[0]
        if counts_E.shape != (self.num_experts,):
            raise ValueError(f"counts_E has shape {tuple(counts_E.shape)}; expected ({self.num_experts},)")
        if not torch.compiler.is_compiling() and int(counts_E.sum()) != R:
            # The grouped kernel leaves rows past the last offset unwritten: refuse, never return garbage.
            raise ValueError(f"x_RD has {R} rows but counts_E sums to {int(counts_E.sum())}; pass exactly "
                             "the rows the counts describe, sorted by expert")
        if 0 < R <= self.decode_max_rows and not torch.compiler.is_compiling():
            return self.forward_selected(x_RD, counts_E)
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        ins = self.input_projections()
        w_out_EFD, b_out_ED = self.output_projection()
        if self.config.gated and self.fuse_gate_up:
            (w_g, b_g), (w_u, b_u) = ins
            gate_up_R2F = grouped_matmul(x_RD, torch.cat([w_g, w_u], dim=-1), counts_E, offs_E)
            if b_g is not None and b_u is not None:
                gate_up_R2F = gate_up_R2F + rows_bias(torch.cat([b_g, b_u], -1), counts_E, R)
            hs = list(gate_up_R2F.chunk(2, dim=-1))
        else:
            hs = [grouped_matmul(x_RD, w, counts_E, offs_E) for w, _ in ins]
            hs = [h if b is None else h + rows_bias(b, counts_E, R) for h, (_, b) in zip(hs, ins)]
        if self.config.gated:
            h_RF = glu(hs[0], hs[1], self.config.activation)
        else:
            h_RF = plain(hs[0], self.config.activation)
        y_RD = grouped_matmul(h_RF, w_out_EFD, counts_E, offs_E)
        return y_RD if b_out_ED is None else y_RD + rows_bias(b_out_ED, counts_E, R)

    def slot_outputs(self, x_TD: Tensor, ids_TK: Tensor) -> Tensor | None:
        """Each routed slot's expert output, fp32 (T, K, D), by the CPU kernel that streams only the
        selected experts' weights (`moekit.kernels.cpu.expert_rows`); zeros where the id is -1.
        None where the kernel cannot run (no compiler, autograd, device, dtype, layout): the
        caller then dispatches as usual."""
        pointers = self.kernel_pointers()
        if pointers is None or not cpu_kernels.supports(x_TD, *pointers.keep):
            return None
        return cpu_kernels.expert_rows(x_TD, ids_TK, pointers)

    def kernel_pointers(self) -> cpu_kernels.ExpertPointers | None:
        """Where the experts' weights are, for `cpu_kernels.expert_rows` (None where their layout or
        dtype has no kernel); rebuilt after a move or a cast."""
        projections = [*self.input_projections(), self.output_projection()]
        key = tuple((t.data_ptr(), t.dtype) for pair in projections for t in pair if t is not None)
        if self._pointers is None or self._pointers[0] != key:
            self._pointers = (key, cpu_kernels.expert_pointers(projections, self.config.activation))
        return self._pointers[1]

    def forward_selected(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Decode path: plain matmuls on the weights of the experts that have rows, and no others.

        A loop over at most R experts (R is small here); the weights are read in place, never copied.
        """
        ins = self.input_projections()
        w_out_EFD, b_out_ED = self.output_projection()
        ys = []
        for e, lo, hi in row_blocks(counts_E):
            x_rD = x_RD[lo:hi]
            hs = [affine(x_rD, w[e], None if b is None else b[e]) for w, b in ins]
            h_rF = glu(hs[0], hs[1], self.config.activation) if self.config.gated else plain(
                hs[0], self.config.activation)
            ys.append(affine(h_rF, w_out_EFD[e], None if b_out_ED is None else b_out_ED[e]))
        return torch.cat(ys) if ys else x_RD.new_zeros(0, w_out_EFD.shape[-1])
