"""Weight-only quantized experts (and optionally attention): int8 and int4, in memory or offloaded.

int8: per output channel, symmetric: w[n, k] ~ q[n, k] * scale[n], q in [-127, 127].
int4: per group of `group_size` inputs, asymmetric (gpt-fast / llama.cpp Q4_1 style):
      w[n, k] ~ (q[n, k] - 8) * scale[n, g] + zero[n, g], q in [0, 15], g = k // group_size.
Weights are kept output-major (N, K) like nn.Linear. int8 products run torch's CPU kernel
`_weight_int8pack_mm` with bf16 activations (fp32 activations are rounded to bf16 for it, see
`quant_matmul`); int4 dequantizes one expert's weight to the activation dtype and does a plain
matmul (`reference_matmul`, also the reference for int8). Measured on this CPU, one 1024x512
weight: `_weight_int8pack_mm` with fp32 activations and `_weight_int4pack_mm_for_cpu` were 2-20x
slower than that, so they are not used.

Stored layout (`save_quantized`, safetensors, never pickle): moekit parameter names; each
quantized weight W (e.g. `model.layers.0.mlp.experts.w_up_EDF`) becomes
    W_qweight  int8 (E, N, K)          | uint8 (E, N, K // 2), low nibble = even k (int4)
    W_scales   float32 (E, N)          | float32 (E, N, K // group_size)
    W_zeros    (int4 only) float32 (E, N, K // group_size)
(attention Linear weights the same without E), beside moekit_config.json whose "quantize" entry
records {"method": "int8" | "int4", "group_size": G, "attention": bool}.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts.grouped import Experts, row_blocks
from moekit.inference.expert_cache import SlotSpec
from moekit.inference.expert_math import expert_forward, expert_param_shapes
from moekit.layer import MoELayer
from moekit.model.attention import Attention

Method = Literal["int8", "int4"]
GROUP_SIZE = 32
QUANT_SUFFIXES = ("_qweight", "_scales", "_zeros")


# ---- the maths ---------------------------------------------------------------------------------
def quantize_int8(w_NK: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: (q int8 (.., N, K), scale float32 (.., N))."""
    w = w_NK.float()
    scale = (w.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w_NK: Tensor, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric group-wise int4: (q uint8 packed (.., N, K // 2), scale, zero float32 (.., N, K // G))."""
    *lead, N, K = w_NK.shape
    if K % group_size or K % 2:
        raise ValueError(f"int4 needs the input dim ({K}) to be a multiple of group_size={group_size}")
    w = w_NK.float().reshape(*lead, N, K // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(*lead, N, K)
    zero = lo + 8 * scale
    return q[..., 0::2] | (q[..., 1::2] << 4), scale, zero


def unpack_int4(packed: Tensor) -> Tensor:
    """(.., N, K // 2) uint8 -> (.., N, K) uint8 values in [0, 15]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The float (N, K) weight a quantized one stands for (int4 when `zero` is given)."""
    if zero is None:
        return (q.float() * scale[..., None]).to(dtype)
    G = q.shape[-1] * 2 // scale.shape[-1]
    v = unpack_int4(q).float().unflatten(-1, (-1, G))
    return ((v - 8) * scale[..., None] + zero[..., None]).flatten(-2).to(dtype)


def quant_matmul(x_MK: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """x @ W.T for a quantized W (N, K); (M, N) in x's dtype.

    int8 on CPU runs torch's weight-only kernel `_weight_int8pack_mm`, which reads the int8 bytes
    directly (a quarter of fp32's memory traffic). It is fast only with bf16 activations, so fp32
    activations are rounded to bf16 for it and the fp32 scales applied to its output afterwards
    (W8A16, as gpt-fast's int8): the error this adds (~0.4% of the output's largest value, measured
    in tests/inference/test_quant.py) is below int8's own rounding. `reference_matmul` is the exact
    dequantize-then-matmul the tests hold it to; int4 and other devices use that."""
    if zero is None and x_MK.device.type == "cpu" and x_MK.shape[0] > 0 and q.is_contiguous():
        if x_MK.dtype == torch.bfloat16:
            return torch.ops.aten._weight_int8pack_mm(x_MK.contiguous(), q, scale.to(x_MK.dtype))
        if x_MK.dtype == torch.float32:
            ones_N = torch.ones(q.shape[0], dtype=torch.bfloat16)
            y_MN = torch.ops.aten._weight_int8pack_mm(x_MK.to(torch.bfloat16).contiguous(), q, ones_N)
            return torch.mul(y_MN, scale)  # bf16 * fp32 -> fp32
    return reference_matmul(x_MK, q, scale, zero)


def reference_matmul(x_MK: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """x @ W.T with W dequantized to x's dtype first: the exact product of the quantized weight."""
    return x_MK @ dequantize(q, scale, zero, x_MK.dtype).T


def quantize_weight(w_NK: Tensor, method: Method, group_size: int = GROUP_SIZE) -> dict[str, Tensor]:
    """{"_qweight", "_scales"[, "_zeros"]} for one weight (any leading dims)."""
    if method == "int8":
        q, s = quantize_int8(w_NK)
        return {"_qweight": q, "_scales": s}
    q, s, z = quantize_int4(w_NK, group_size)
    return {"_qweight": q, "_scales": s, "_zeros": z}


def quant_shapes(N: int, K: int, method: Method,
                 group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """suffix -> (shape, dtype) of one quantized (N, K) weight."""
    if method == "int8":
        return {"_qweight": ((N, K), torch.int8), "_scales": ((N,), torch.float32)}
    return {"_qweight": ((N, K // 2), torch.uint8), "_scales": ((N, K // group_size), torch.float32),
            "_zeros": ((N, K // group_size), torch.float32)}


# ---- experts ------------------------------------------------------------------------------------
def _weight_dims(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """(N, K) of moekit's (in, out) expert weight `name`: w_*_EDF / w_*_EFD are (K, N) per expert."""
    return shape[-1], shape[-2]


class QuantFormat:
    """Experts with quantized weights and float biases (a cache slot's layout, and the in-memory one)."""

    def __init__(self, config: MoEConfig, dtype: torch.dtype, method: Method,
                 group_size: int = GROUP_SIZE) -> None:

        if method not in ("int8", "int4"):
            raise ValueError(f"quantize={method!r} is invalid: must be 'int8' or 'int4'")
        self.config, self.dtype, self.method, self.group_size = config, dtype, method, group_size
        self.float_shapes = expert_param_shapes(config)
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name, shape in self.float_shapes.items():
            if name.startswith("w_"):
                N, K = _weight_dims(name, shape)
                if method == "int4" and K % group_size:
                    raise ValueError(f"int4 with group_size={group_size} needs {name}'s input dim {K} "
                                     f"to be a multiple of it; use int8 or a group size that divides {K}")
                for suffix, spec in quant_shapes(N, K, method, group_size).items():
                    self.tensors[name + suffix] = spec
            else:
                self.tensors[name] = (shape, dtype)

    def spec(self) -> SlotSpec:
        return SlotSpec(tuple((n, s, d) for n, (s, d) in self.tensors.items()))

    def quantize(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-expert float tensors (moekit layout) -> this format's tensors (with any leading dims)."""
        out = {}
        for name, t in tensors.items():
            if name.startswith("w_"):
                for suffix, q in quantize_weight(t.transpose(-1, -2), self.method, self.group_size).items():
                    out[name + suffix] = q
            else:
                out[name] = t
        return out

    def fill(self, views: dict[str, Tensor], tensors: dict[str, Tensor]) -> None:
        if next(iter(self.tensors)) not in tensors:  # a float checkpoint: quantize on the way in
            tensors = self.quantize(tensors)
        for name, view in views.items():
            view.copy_(tensors[name])

    def forward(self, x_rD: Tensor, views: dict[str, Tensor], *, fused_bias: bool) -> Tensor:

        def matmul(x: Tensor, name: str) -> Tensor:
            return quant_matmul(x, views[name + "_qweight"], views[name + "_scales"],
                                views.get(name + "_zeros"))

        return expert_forward(x_rD, views, self.config, fused_bias=fused_bias, matmul=matmul)


class QuantizedExperts(nn.Module):
    """All experts of a layer quantized, in memory (buffers `w_*_qweight`, `w_*_scales`, ...).

    Forward: as `Experts` (x_RD rows sorted by expert, counts_E) -> y_RD, one expert at a time.
    """

    def __init__(self, config: MoEConfig, fmt: QuantFormat, num_experts: int | None = None) -> None:
        super().__init__()
        self.config, self.fmt = config, fmt
        self.num_experts = num_experts or config.num_experts
        for name, (shape, dtype) in fmt.tensors.items():
            self.register_buffer(name, torch.empty(self.num_experts, *shape, dtype=dtype))

    @classmethod
    def from_experts(cls, experts: Experts, method: Method, group_size: int = GROUP_SIZE) -> QuantizedExperts:
        dtype = next(experts.parameters()).dtype
        fmt = QuantFormat(experts.config, dtype, method, group_size)
        with torch.device(next(experts.parameters()).device):
            out = cls(experts.config, fmt, experts.num_experts)
        with torch.no_grad():
            for name, t in fmt.quantize({n: p.detach() for n, p in experts.named_parameters()}).items():
                getattr(out, name).copy_(t)
        return out

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        R = x_RD.shape[0]
        if counts_E.shape != (self.num_experts,) or int(counts_E.sum()) != R:
            raise ValueError(f"counts_E (shape {tuple(counts_E.shape)}, sum {int(counts_E.sum())}) must have "
                             f"{self.num_experts} entries summing to x_RD's {R} rows")
        fused_bias = 0 < R <= 64  # as Experts.decode_max_rows, so offloaded and in-memory agree
        y_RD = x_RD.new_empty(R, self.config.d_model)
        for e, lo, hi in row_blocks(counts_E):
            views = {name: getattr(self, name)[e] for name in self.fmt.tensors}
            y_RD[lo:hi] = self.fmt.forward(x_RD[lo:hi], views, fused_bias=fused_bias)
        return y_RD


class QuantLinear(nn.Module):
    """nn.Linear with a quantized weight (buffers `weight_qweight`, `weight_scales`[, `weight_zeros`])."""

    def __init__(self, N: int, K: int, method: Method, group_size: int, bias: bool,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.method, self.group_size = method, group_size
        for suffix, (shape, dt) in quant_shapes(N, K, method, group_size).items():
            self.register_buffer("weight" + suffix, torch.empty(shape, dtype=dt))
        self.bias = nn.Parameter(torch.empty(N, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: Method, group_size: int = GROUP_SIZE) -> QuantLinear:
        w = linear.weight.detach()
        with torch.device(w.device):
            out = cls(*w.shape, method, group_size, linear.bias is not None, w.dtype)
        with torch.no_grad():
            for suffix, t in quantize_weight(w, method, group_size).items():
                getattr(out, "weight" + suffix).copy_(t)
            if linear.bias is not None:
                out.bias.copy_(linear.bias)
        return out

    def forward(self, x: Tensor) -> Tensor:
        y = quant_matmul(x.reshape(-1, x.shape[-1]), self.weight_qweight, self.weight_scales,
                         getattr(self, "weight_zeros", None))
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


# ---- whole models --------------------------------------------------------------------------------
def quantize_model(model: nn.Module, method: Method | None, *, attention: bool = False,
                   group_size: int = GROUP_SIZE) -> nn.Module:
    """Replace every MoE layer's `Experts` (and with `attention`, every Attention projection) by a
    quantized copy, in place; returns the model. method=None leaves it as it is."""
    if method is None:
        return model
    if method not in ("int8", "int4"):
        raise ValueError(f"quantize={method!r} is invalid: must be 'int8', 'int4' or None")
    for layer in [m for m in model.modules() if isinstance(m, MoELayer)]:
        if isinstance(layer.experts, Experts):
            layer.experts = QuantizedExperts.from_experts(layer.experts, method, group_size)
    if attention:
        quantize_attention(model, method, group_size)
    quant = {"method": method, "group_size": group_size, "attention": attention}
    model.quantize = quant  # type: ignore[attr-defined]
    return model


def quantize_attention(model: nn.Module, method: Method, group_size: int = GROUP_SIZE) -> None:
    for attn in [m for m in model.modules() if isinstance(m, Attention)]:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(attn, name, None)
            if isinstance(linear, nn.Linear):
                setattr(attn, name, QuantLinear.from_linear(linear, method, group_size))


def save_quantized(model: nn.Module, path: str | Path, *, max_shard_size: int | str = "5GB",
                   overwrite: bool = False) -> list[str]:
    """Write a model quantized by `quantize_model` in the native format, its `quantize` entry saying how
    (the tensor layout of this module's docstring)."""
    from moekit.hf.native import save_native

    quant = getattr(model, "quantize", None)
    if quant is None:
        raise ValueError("save_quantized needs a model quantized with quantize_model(model, 'int8'|'int4') "
                         "or loaded with quantize=")
    return save_native(model, path, max_shard_size=max_shard_size, overwrite=overwrite, quantize=dict(quant))


def check_quantized_file(path: str | Path, quant: dict) -> None:
    """Every `*_qweight` in the directory has `*_scales` (and for int4 `*_zeros`) that fit it.

    Raises ValueError naming the tensor, both shapes and the file otherwise."""
    from moekit.hf.io import CheckpointReader

    method, G = quant.get("method"), int(quant.get("group_size", GROUP_SIZE))
    if method not in ("int8", "int4"):
        raise ValueError(f"{path}: moekit_config.json quantize.method={method!r} is invalid: must be int8 "
                         f"or int4")
    with CheckpointReader(path) as reader:
        keys = set(reader.keys())
        for key in sorted(k for k in keys if k.endswith("_qweight")):
            base, q_shape = key.removesuffix("_qweight"), reader.shape(key)
            want_dtype = torch.int8 if method == "int8" else torch.uint8
            if reader.dtype(key) != want_dtype:
                raise ValueError(f"{reader.path / reader.file_of(key)}: {key} is {reader.dtype(key)}, "
                                 f"expected {want_dtype} for {method}")
            *lead, N, Kq = q_shape
            K = Kq if method == "int8" else 2 * Kq
            want = {"_scales": (*lead, N) if method == "int8" else (*lead, N, K // G)}
            if method == "int4":
                want["_zeros"] = want["_scales"]
            for suffix, shape in want.items():
                other = base + suffix
                if other not in keys:
                    raise ValueError(f"{reader.path}: {key} has no {other}; the quantized file is incomplete")
                if reader.shape(other) != shape:
                    raise ValueError(f"{reader.path / reader.file_of(other)}: {other} has shape "
                                     f"{reader.shape(other)} but its weight {key} {q_shape} ({method}, "
                                     f"group_size={G}) needs {shape}; "
                                     f"the scales do not match the weights (re-run save_quantized)")


def quantize_attention_meta(model: nn.Module, method: Method, group_size: int) -> None:
    """Empty QuantLinear projections in place of Attention's (for loading into)."""
    for attn in [m for m in model.modules() if isinstance(m, Attention)]:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear = getattr(attn, name, None)
            if isinstance(linear, nn.Linear):
                N, K = linear.weight.shape
                setattr(attn, name, QuantLinear(N, K, method, group_size, linear.bias is not None,
                                                linear.weight.dtype))
