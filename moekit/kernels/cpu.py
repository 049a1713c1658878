"""The CPU kernels of `small_rows.cpp` and `grouped_gemm.cpp`: built at first use, loaded with ctypes,
torch fallbacks.

The library is compiled once per source, compiler and CPU (`g++ -O3 -march=native -fopenmp`, a few
seconds) into `$MOEKIT_CACHE` (default `~/.cache/moekit`)`/kernels/`, written to a temporary name and
renamed, so concurrent processes never load a half-written file. Where there is no compiler, the
build fails, or `MOEKIT_KERNELS=0` is set, `available()` is False and every caller keeps its torch
path: the kernels are a speed-up, never a requirement.

Entry points (no autograd; inference only; CPU tensors):
    linear_rows(x, weight, bias)      F.linear for a few rows, weight (out, in) row-major
    linear_rows_many(x, [(w, b), ...])   several of them sharing x, in one call
    rmsnorm(x, weight, eps)           RMSNorm of a few rows (statistics in fp32)
    rope(x_BHSd, cos_SR, sin_SR, interleaved)   rotary embedding of a few positions
    attend_one(q_BH1d, k_BKTd, v_BKTe, mask_B11T, scale)   one query per sequence over its KV cache
    topk_route(x_TD, gate_weight, gate_bias, ...)   token-choice top-k routing of a few tokens
    expert_rows(x_TD, ids_TK, experts)  every routed slot's expert output, o_TKD (experts: ExpertPointers)
    grouped_mm(a, b, offs)            torch._grouped_mm's 2-D x 3-D and 2-D x 2-D products (the
                                      experts' forward and backward; grouped_mm_supports says where)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

_SOURCES = (Path(__file__).with_name("small_rows.cpp"), Path(__file__).with_name("grouped_gemm.cpp"))
_HEADERS = (Path(__file__).with_name("simd.h"),)  # included by the sources; part of the build's key
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c++17")
_WTYPE = {torch.float32: 0, torch.bfloat16: 1}
ACTIVATIONS = {"swiglu": 0, "geglu": 1, "clamped_swiglu": 2, "gelu": 3, "relu": 4, "silu": 5}

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def cache_dir() -> Path:
    return Path(os.environ.get("MOEKIT_CACHE", Path.home() / ".cache" / "moekit")) / "kernels"


def _cpu_key() -> str:
    """What the `-march=native` binary depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "\n".join(lines) + platform.machine()


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    texts = [src.read_text() for src in (*_SOURCES, *_HEADERS)]
    digest = hashlib.sha256("\0".join([*texts, " ".join(_FLAGS), version, _cpu_key(), sys.platform]).encode())
    key = digest.hexdigest()[:16]
    target = cache_dir() / f"moekit_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *_FLAGS, *map(str, _SOURCES), "-o", tmp], capture_output=True,
                                text=True)
        if result.returncode != 0:
            names = ", ".join(src.name for src in _SOURCES)
            raise RuntimeError(f"{compiler} failed on {names}:\n{result.stderr[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("MOEKIT_KERNELS", "1") == "0" or sys.platform != "linux":
        return None
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"moekit's CPU kernels are unavailable ({err}); using the torch paths", stacklevel=3)
        return None
    lib.mk_linear_rows.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _int, _int]
    lib.mk_expert_rows.argtypes = [_ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _int,
                                   _int, _int, _ptr, _int]
    lib.mk_rmsnorm.argtypes = [_ptr, _i64, _i64, _ptr, ctypes.c_float, _ptr, _int]
    lib.mk_rope.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i64, _int, _ptr, _int]
    lib.mk_topk_route.argtypes = [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _int, _int, _int, ctypes.c_float,
                                  _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _int]
    lib.mk_grouped_gemm.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _i64, _i64,
                                    _i64, _ptr, _int, _int, _int, _int]
    lib.mk_grouped_gemm.restype = _int
    lib.mk_attend_one.argtypes = [_ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64,
                                  _i64, _i64, _ptr, _i64, ctypes.c_float, _ptr, _int, _int]
    return lib


def _loaded(entry: str) -> ctypes.CDLL:
    """The loaded library, for an entry point that callers reach only where `supports` said yes."""
    lib = _library()
    if lib is None:
        raise RuntimeError(f"moekit.kernels.cpu.{entry} needs the compiled kernels; check available() first")
    return lib


def available() -> bool:
    """True when the compiled kernels are loaded (see the module docstring)."""
    return _library() is not None


def entry(name: str) -> Callable:
    """The raw ctypes function `mk_<name>` (its arguments: small_rows.cpp), for a caller that binds
    its arguments once and calls it many times (`moekit.model.one_token`). Needs `available()`."""
    return getattr(_loaded(name), f"mk_{name}")


def wtype(dtype: torch.dtype) -> int:
    """The kernels' code for a weight dtype (fp32 0, bf16 1)."""
    return _WTYPE[dtype]


def supports(x: Tensor, *weights: Tensor) -> bool:
    """True when the kernels can run these tensors: CPU, fp32/bf16, no autograd, library loaded."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype not in _WTYPE or not available():
        return False
    same = all(w.dtype == x.dtype and w.device.type == "cpu" for w in weights)
    return same and not torch.compiler.is_compiling()


def address(t: Tensor | None) -> int:
    """A tensor's address as the kernels take it; 0 (a null pointer) for None."""
    return 0 if t is None else t.data_ptr()


def addresses(values: list[int]) -> ctypes.Array:
    """An int64 array of addresses or sizes, as the kernels' pointer-table arguments take."""
    return (ctypes.c_int64 * len(values))(*values)


def linear_rows_many(x: Tensor, weights: list[tuple[Tensor, Tensor | None]]) -> list[Tensor]:
    """[F.linear(x, w, b) for w, b in weights] for a few rows, in one call: every weight (out, in)
    with unit stride along in, weights and biases in x's dtype. Accumulates in fp32 and rounds
    once to x's dtype. Call only where `supports(x, *weights)`."""
    lib = _loaded("linear_rows")
    K = x.shape[-1]
    for w, b in weights:
        if w.dim() != 2 or w.shape[1] != K or w.stride(-1) != 1:
            raise ValueError(f"linear_rows needs weights (out, {K}) with unit stride along in; got shape "
                             f"{tuple(w.shape)}, strides {tuple(w.stride())}")
        if b is not None and (b.dtype != x.dtype or not b.is_contiguous()):
            raise ValueError(f"linear_rows needs contiguous biases in {x.dtype}")
    x2 = x.reshape(-1, K).contiguous()
    ys = [torch.empty(x2.shape[0], w.shape[0], dtype=x.dtype) for w, _ in weights]
    lib.mk_linear_rows(x2.data_ptr(), x2.shape[0], K, len(weights),
                       addresses([w.data_ptr() for w, _ in weights]),
                       addresses([w.shape[0] for w, _ in weights]),
                       addresses([w.stride(0) for w, _ in weights]),
                       addresses([address(b) for _, b in weights]),
                       addresses([y.data_ptr() for y in ys]), _WTYPE[x.dtype], torch.get_num_threads())
    return [y.view(*x.shape[:-1], y.shape[-1]) for y in ys]


def linear_rows(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)` for a few rows (see `linear_rows_many`)."""
    return linear_rows_many(x, [(weight, bias)])[0]


@dataclass(frozen=True)
class ExpertPointers:
    """Where each expert's weights are, for `expert_rows`: one layer's gate/in, up and down/out
    projections, each expert's matrix stored (out, in) row-major with rows `lds[i]` apart.

    ptrs_3E: int64 (3, E) addresses (0 for an expert that is not there; row 1 unused for plain
    experts); bias_ptrs_3E: the same for biases in the weight dtype, or None; keep: the tensors the
    addresses point into (held so that they outlive the call).
    """

    ptrs_3E: Tensor
    bias_ptrs_3E: Tensor | None
    lds: Tensor
    gated: bool
    d_ff: int
    dtype: torch.dtype
    activation: str
    keep: tuple[Tensor, ...]


def expert_pointers(projections: list[tuple[Tensor, Tensor | None]], activation: str, *,
                    expert: int | None = None, num_experts: int | None = None) -> ExpertPointers | None:
    """ExpertPointers of one layer's expert weights: [(w, b)] for gate, up, down (gated) or in, out
    (plain), in `moekit.experts.grouped.Experts`' logical shapes. Either every expert's 3-D weights
    (w (E, in, out), b (E, out)), or, with `expert` and `num_experts`, one expert's 2-D ones
    (w (in, out), b (out,); an offloaded expert in its cache slot). None when a weight is not
    stored (out, in) row-major or its dtype has no kernel."""
    ws = [w for w, _ in projections]
    dtype = ws[0].dtype
    if not all(w.stride(-2) == 1 and w.dtype == dtype for w in ws) or dtype not in _WTYPE:
        return None
    gated = len(projections) == 3
    order = list(projections) if gated else [projections[0], (None, None), projections[1]]
    if any(b is not None and (b.dtype != dtype or b.stride(-1) != 1) for _, b in order):
        return None
    size = ws[0].element_size()
    E = ws[0].shape[0] if expert is None else num_experts
    assert E is not None, "pass num_experts with expert"
    arange_E = torch.arange(E, dtype=torch.int64)

    def addresses(t: Tensor | None) -> Tensor:
        if t is None:
            return torch.zeros(E, dtype=torch.int64)
        if expert is None:
            return t.data_ptr() + arange_E * (t.stride(0) * size)
        return torch.zeros(E, dtype=torch.int64).index_fill_(0, torch.tensor([expert]), t.data_ptr())

    biases = [b for _, b in order]
    return ExpertPointers(
        ptrs_3E=torch.stack([addresses(w) for w, _ in order]),
        bias_ptrs_3E=None if all(b is None for b in biases) else torch.stack([addresses(b) for b in biases]),
        lds=torch.tensor([0 if w is None else w.stride(-1) for w, _ in order], dtype=torch.int64),
        gated=gated, d_ff=ws[0].shape[-1], dtype=dtype, activation=activation,
        keep=tuple(t for pair in order for t in pair if t is not None))


def expert_rows(x_TD: Tensor, ids_TK: Tensor, experts: ExpertPointers, *, only: int = -1,
                out_TKD: Tensor | None = None) -> Tensor:
    """o_TKD[t, k] = expert ids_TK[t, k] applied to x_TD[t], in fp32 (accumulated in fp32, never
    rounded to the model dtype in between), for every slot whose id is >= 0 (and == `only` when
    only >= 0); the other slots of `out_TKD` (default: zeros) are left as they are.

    Call only where `supports(x_TD, ...)`; the routing weights are applied by the caller.
    """
    lib = _loaded("expert_rows")
    T, D = x_TD.shape
    K = ids_TK.shape[1]
    E = experts.ptrs_3E.shape[1]
    if x_TD.dtype != experts.dtype:
        raise ValueError(f"x_TD is {x_TD.dtype} but the experts are {experts.dtype}")
    x = x_TD.contiguous()
    ids = ids_TK.to(torch.int64).contiguous()
    o = torch.zeros(T, K, D, dtype=torch.float32) if out_TKD is None else out_TKD
    if o.shape != (T, K, D) or o.dtype != torch.float32 or not o.is_contiguous():
        raise ValueError(f"out_TKD must be a contiguous float32 ({T}, {K}, {D}) tensor")
    lib.mk_expert_rows(x.data_ptr(), T, D, experts.d_ff, K, E, ids.data_ptr(), only,
                       experts.ptrs_3E.data_ptr(), address(experts.bias_ptrs_3E), experts.lds.data_ptr(),
                       int(experts.gated), _WTYPE[experts.dtype], ACTIVATIONS[experts.activation],
                       o.data_ptr(), torch.get_num_threads())
    return o


def rmsnorm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`moekit.model.norm.RMSNorm` (cast_to="input") of x (…, D): fp32 statistics, the normalised
    row rounded to x's dtype, then times the weight (x's dtype). Call only where `supports(x, weight)`."""
    lib = _loaded("rmsnorm")
    D = x.shape[-1]
    if weight.shape != (D,) or not weight.is_contiguous():
        raise ValueError(f"rmsnorm needs a contiguous ({D},) weight; got {tuple(weight.shape)}")
    x2 = x.contiguous()
    y = torch.empty_like(x2)
    lib.mk_rmsnorm(x2.data_ptr(), x2.numel() // D, D, weight.data_ptr(), eps, y.data_ptr(), _WTYPE[x.dtype])
    return y


def rope(x_BHSd: Tensor, cos_SR: Tensor, sin_SR: Tensor, *, interleaved: bool) -> Tensor:
    """`moekit.model.rope.apply_rope` (each product rounded to x's dtype, as torch's ops round);
    cos/sin (S, R), or (B, 1, S, R) with each row at its own positions (`row_cos_sin`). x may be
    any view with unit stride inside a head; returns a contiguous (B, H, S, d) tensor."""
    lib = _loaded("rope")
    B, H, S, d = x_BHSd.shape
    R = cos_SR.shape[-1]
    per_row = cos_SR.dim() == 4
    if x_BHSd.stride(-1) != 1 or cos_SR.shape != ((B, 1, S, R) if per_row else (S, R)) or 2 * R > d:
        raise ValueError("rope needs x with unit stride inside a head and (S, R) or (B, 1, S, R) "
                         "tables, 2R <= d")
    cos, sin = cos_SR.to(x_BHSd.dtype).contiguous(), sin_SR.to(x_BHSd.dtype).contiguous()
    y = torch.empty(B, H, S, d, dtype=x_BHSd.dtype)
    lib.mk_rope(x_BHSd.data_ptr(), B, H, S, d, addresses(list(x_BHSd.stride()[:3])), cos.data_ptr(),
                sin.data_ptr(), S * R if per_row else 0, R, int(interleaved), y.data_ptr(),
                _WTYPE[x_BHSd.dtype])
    return y


def attend_one(q_BH1d: Tensor, k_BKTd: Tensor, v_BKTe: Tensor, mask_B11T: Tensor, scale: float) -> Tensor:
    """`moekit.model.attention.attend_one`: one query per sequence over its keys, read in place
    (strided cache rows, no copies; fp32 maths, the output rounded once to q's dtype). The mask is
    (B or 1, 1, 1, T). Returns (B, H, 1, e)."""
    lib = _loaded("attend_one")
    B, H, _, d = q_BH1d.shape
    _, K, T, e = v_BKTe.shape
    if (k_BKTd.shape[0] != B or v_BKTe.shape[0] != B or k_BKTd.stride(-1) != 1 or v_BKTe.stride(-1) != 1
            or mask_B11T.shape[-1] != T or mask_B11T.shape[0] not in (1, B)):
        raise ValueError("attend_one needs K/V of the queries' sequences with unit stride inside a head and "
                         "a (B or 1, 1, 1, T) mask")
    q = q_BH1d.contiguous()
    mask = mask_B11T.reshape(mask_B11T.shape[0], T).float().contiguous()
    out = torch.empty(B, H, 1, e, dtype=q.dtype)
    lib.mk_attend_one(q.data_ptr(), B, H, K, T, d, e, k_BKTd.data_ptr(), k_BKTd.stride(0), k_BKTd.stride(1),
                      k_BKTd.stride(2), v_BKTe.data_ptr(), v_BKTe.stride(0), v_BKTe.stride(1), v_BKTe.stride(2),
                      mask.data_ptr(), T if mask.shape[0] > 1 else 0, scale, out.data_ptr(), _WTYPE[q.dtype],
                      torch.get_num_threads())
    return out


def topk_route(x_TD: Tensor, gate_weight: Tensor, gate_bias: Tensor | None, *, top_k: int, score_func: str,
               softmax_after_topk: bool, normalize_topk: bool, routed_scaling_factor: float,
               selection_bias_E: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`moekit.routing.topk.topk_route` of a linear gate without expert groups, in one call.
    Returns (ids_TK long, weights_TK fp32, logits_TE fp32, probs_TE fp32, counts_E long).
    Call only where `supports(x_TD, gate_weight)`."""
    lib = _loaded("topk_route")
    T, D = x_TD.shape
    E = gate_weight.shape[0]
    if gate_weight.shape != (E, D) or not gate_weight.is_contiguous() or not 0 < top_k <= E:
        raise ValueError(f"topk_route needs a contiguous ({E}, {D}) gate and 0 < top_k <= {E}")
    x = x_TD.contiguous()
    bias = None if gate_bias is None else gate_bias.to(x.dtype).contiguous()
    sel = None if selection_bias_E is None else selection_bias_E.float().contiguous()
    logits, probs = torch.empty(T, E), torch.empty(T, E)
    ids, weights = torch.empty(T, top_k, dtype=torch.int64), torch.empty(T, top_k)
    counts = torch.empty(E, dtype=torch.int64)
    lib.mk_topk_route(x.data_ptr(), T, D, E, top_k, gate_weight.data_ptr(), address(bias),
                      int(score_func == "sigmoid"), int(softmax_after_topk), int(normalize_topk),
                      routed_scaling_factor, address(sel), logits.data_ptr(), probs.data_ptr(),
                      ids.data_ptr(), weights.data_ptr(), counts.data_ptr(), _WTYPE[x.dtype])
    return ids, weights, logits, probs, counts


def grouped_mm_supports(a: Tensor, b: Tensor) -> bool:
    """True when `grouped_mm` runs these operands: CPU, both fp32 or both bf16, library loaded
    (any strides; autograd is the caller's: `moekit.experts.grouped` wraps it in its own Function)."""
    return (a.device.type == "cpu" and b.device.type == "cpu" and a.dtype == b.dtype and a.dtype in _WTYPE
            and not torch.compiler.is_compiling() and available())


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """`torch._grouped_mm(a, b, offs=offs)` for its two CPU cases, in one parallel kernel call:

    - a (R, K), b (E, K, N): rows [offs[e-1], offs[e]) of a times b[e]; returns (R, N) (rows past
      offs[-1] zero);
    - a (M, R), b (R, N): depth [offs[e-1], offs[e]) of both; returns (E, M, N) (zero for an empty
      group).

    offs: int (E,) non-decreasing cumulative ends. Operands of any strides, fp32 or bf16 (widened to
    fp32, accumulated in fp32 in order along the depth, rounded once to a's dtype). Call only where
    `grouped_mm_supports(a, b)`."""
    lib = _loaded("grouped_gemm")
    offs32 = offs.to(torch.int32).contiguous()
    E = offs32.numel()
    if a.dim() != 2 or b.dim() not in (2, 3) or a.dtype != b.dtype:
        raise ValueError(f"grouped_mm takes a 2-D a and a 2-D or 3-D b of one dtype; got {tuple(a.shape)} "
                         f"{a.dtype} and {tuple(b.shape)} {b.dtype}")
    if b.dim() == 3:
        (R, K), (Eb, Kb, N) = a.shape, b.shape
        if Eb != E or Kb != K:
            raise ValueError(f"grouped_mm: a (R, K) = {tuple(a.shape)} needs b (E={E}, K={K}, N); got {tuple(b.shape)}")
        out = torch.empty(R, N, dtype=a.dtype)
        mode, M, sbe, sbk, sbn, sce = 0, R, b.stride(0), b.stride(1), b.stride(2), 0
    else:
        (M, R), (Rb, N) = a.shape, b.shape
        if Rb != R:
            raise ValueError(f"grouped_mm: a (M, R) = {tuple(a.shape)} needs b (R={R}, N); got {tuple(b.shape)}")
        out = torch.empty(E, M, N, dtype=a.dtype)
        mode, K, sbe, sbk, sbn, sce = 1, R, 0, b.stride(0), b.stride(1), M * N
    status = lib.mk_grouped_gemm(a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), sbe, sbk, sbn,
                                 out.data_ptr(), sce, N, M, N, K, E, offs32.data_ptr(), mode,
                                 _WTYPE[a.dtype], _WTYPE[a.dtype], torch.get_num_threads())
    if status != 0:
        raise ValueError(f"grouped_mm: offs must be non-decreasing and at most {R}; got {offs32.tolist()}")
    if mode == 0 and E and int(offs32[-1]) < R:
        out[int(offs32[-1]):] = 0
    elif mode == 0 and not E:
        out.zero_()
    return out
