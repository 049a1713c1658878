"""MoE layer speed and memory: moekit vs transformers' experts implementations vs the dense limit.

Every figure is a ratio of medians measured side by side in one process, the implementations
interleaved repeat by repeat (the 2-core CPU is shared, so absolute times are noisy). Peak memory
runs one fresh subprocess per case. Prints tables and writes JSON to benchmarks/results/.

    python benchmarks/moe_layer.py            # full run (tens of minutes on 2 cores)
    python benchmarks/moe_layer.py --quick    # small shapes and a subset, a couple of minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts.dense import DenseMLP
from moekit.experts.grouped import Experts
from moekit.layer import MoELayer

RESULTS = Path(__file__).parent / "results"
# glibc returns every freed block over 32 MB to the OS and page-faults it back on the next
# allocation; in this VM those faults cost more than the elementwise ops touching the memory, for
# every implementation alike. Keeping freed memory (as jemalloc/tcmalloc setups do) measures compute.
MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34),
                 "MALLOC_TOP_PAD_": str(2**30)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    num_shared: int = 0  # DeepSeekMoE shared experts, each of width d_ff


SHAPES = {
    "olmoe": Shape("olmoe", 512, 512, 32, 4),
    "mixtral": Shape("mixtral", 512, 1792, 8, 2),
    "deepseek": Shape("deepseek", 512, 384, 64, 6, num_shared=2),
}


# ---- the contenders ------------------------------------------------------------------------------

def moekit_layer(shape: Shape, dtype: torch.dtype, *, fuse_gate_up: bool = False) -> MoELayer:
    """moekit's layer doing what transformers' block does: no aux loss (it has none in the block);
    DeepSeek-V2 weights are softmax top-k without renormalisation."""
    cfg = MoEConfig(d_model=shape.d_model, d_ff=shape.d_ff, num_experts=shape.num_experts,
                    top_k=shape.top_k, normalize_topk=shape.num_shared == 0,
                    num_shared_experts=shape.num_shared, load_balance_coef=0.0)
    torch.manual_seed(0)
    layer = MoELayer(cfg, experts=Experts(cfg, fuse_gate_up=fuse_gate_up))
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 1.0 / shape.d_model ** 0.5)
    return layer.to(dtype)


def hf_block(layer: MoELayer, impl: str) -> nn.Module:
    """transformers' Qwen3-MoE block (DeepSeek-V2 block with shared experts) holding `layer`'s weights."""
    from transformers import DeepseekV2Config, Qwen3MoeConfig
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = layer.config
    common = dict(hidden_size=cfg.d_model, moe_intermediate_size=cfg.d_ff, num_experts_per_tok=cfg.top_k,
                  hidden_act="silu")
    if cfg.num_shared_experts:
        hf_cfg = DeepseekV2Config(n_routed_experts=cfg.num_experts, n_shared_experts=cfg.num_shared_experts,
                                  topk_method="greedy", routed_scaling_factor=1.0, **common)
        hf_cfg._experts_implementation = impl
        block = DeepseekV2Moe(hf_cfg)
    else:
        hf_cfg = Qwen3MoeConfig(num_experts=cfg.num_experts, norm_topk_prob=True, **common)
        hf_cfg._experts_implementation = impl
        block = Qwen3MoeSparseMoeBlock(hf_cfg)
    ex = layer.experts
    dtype = ex.w_down_EFD.dtype
    with torch.no_grad():
        block.gate.weight.data = layer.router.gate.weight.detach().clone()
        # transformers stores (E, 2F, D) = [gate; up] rows and (E, D, F); ours are (E, D, F), (E, F, D).
        gate_up = torch.cat([ex.w_gate_EDF, ex.w_up_EDF], dim=-1).transpose(1, 2)
        block.experts.gate_up_proj.data = gate_up.contiguous()
        block.experts.down_proj.data = ex.w_down_EFD.transpose(1, 2).contiguous()
        if cfg.num_shared_experts:
            block.shared_experts.load_state_dict(layer.shared_experts.state_dict())
    return block.to(dtype)


class DenseLimit(nn.Module):
    """The same arithmetic as dense matmuls over the same rows: one dense MLP of width d_ff over
    all T*k routed rows (plus the shared experts on the T tokens), each matmul in its fastest
    layout (`moekit.experts.layout`, as nn.Linear stores weights). No MoE can beat it."""

    def __init__(self, shape: Shape, dtype: torch.dtype) -> None:
        super().__init__()
        self.mlp = DenseMLP(shape.d_model, shape.d_ff).to(dtype)
        self.shared = DenseMLP(shape.d_model, shape.num_shared * shape.d_ff).to(dtype) if shape.num_shared else None

    def forward(self, x_RD: Tensor, x_TD: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        y_RD = self.mlp(x_RD)
        return y_RD if self.shared is None else (y_RD, self.shared(x_TD))


# ---- timing --------------------------------------------------------------------------------------

def make_step(impl: str, shape: Shape, dtype: torch.dtype, T: int, backward: bool,
              fused: bool = False) -> tuple[Callable[[], None], nn.Module]:
    """A zero-argument callable running one forward (no_grad) or forward + backward of `impl`."""
    g = torch.Generator().manual_seed(1)
    x_TD = torch.randn(T, shape.d_model, generator=g).to(dtype)
    grad_TD = torch.randn(T, shape.d_model, generator=g).to(dtype)
    if impl == "dense":
        module = DenseLimit(shape, dtype)
        x_RD = x_TD.repeat_interleave(shape.top_k, 0)
        grad_RD = grad_TD.repeat_interleave(shape.top_k, 0)
        ins = [x_RD.requires_grad_(backward), x_TD.requires_grad_(backward)]
        leaves = ins

        def run() -> Tensor | tuple:
            return module(*ins)

        def grads(out: Tensor | tuple) -> None:
            if isinstance(out, tuple):
                torch.autograd.backward(out, (grad_RD, grad_TD))
            else:
                out.backward(grad_RD)
    else:
        layer = moekit_layer(shape, dtype, fuse_gate_up=fused)
        module = layer if impl == "moekit" else hf_block(layer, impl.removeprefix("hf_"))
        x_BSD = x_TD[None].clone().requires_grad_(backward)
        leaves = [x_BSD]

        def run() -> Tensor:
            out = module(x_BSD)
            return out.y if impl == "moekit" else out

        def grads(out: Tensor) -> None:
            out.backward(grad_TD[None])

    def step() -> None:
        if not backward:
            with torch.no_grad():
                run()
            return
        for t in [*module.parameters(), *leaves]:
            t.grad = None
        grads(run())

    return step, module


def time_side_by_side(steps: dict[str, Callable[[], None]], *, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step; each repeat runs every step once, in a rotating order."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ---- sections ------------------------------------------------------------------------------------

def check_agreement(shape: Shape, dtype: torch.dtype, T: int, impls: list[str]) -> dict[str, float]:
    """Per-token relative error (max in fp32, median in bf16) of each transformers implementation
    against moekit on the same weights; raises when they disagree."""
    layer = moekit_layer(shape, dtype)
    x_BSD = torch.randn(1, T, shape.d_model, generator=torch.Generator().manual_seed(2)).to(dtype)
    with torch.no_grad():
        ours = layer(x_BSD).y.float()[0]
        out = {}
        for impl in impls:
            theirs = hf_block(layer, impl.removeprefix("hf_"))(x_BSD).float()[0]
            # Per token: in bf16 transformers' router rounds its logits to bf16, so a near-tie token
            # may pick another expert; the median token shows whether the maths agree.
            err_T = (theirs - ours).norm(dim=-1) / ours.norm(dim=-1)
            out[impl] = float(err_T.max() if dtype == torch.float32 else err_T.median())
    if max(out.values(), default=0.0) > (1e-4 if dtype == torch.float32 else 2e-2):
        raise RuntimeError(f"{shape.name}: transformers and moekit disagree in fp32: {out}")
    return out


def section_vs_transformers(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        for dt in args.dtypes:
            dtype = DTYPES[dt]
            agree = check_agreement(shape, dtype, 64, ["hf_eager", "hf_grouped_mm"])
            for backward in (False, True):
                impls = ["moekit", "moekit_fused", "dense", "hf_eager", "hf_grouped_mm"]
                steps = {i: make_step(i.removesuffix("_fused"), shape, dtype, args.tokens, backward,
                                      fused=i.endswith("_fused"))[0] for i in impls}
                med = time_side_by_side(steps, warmup=args.warmup, repeats=args.repeats)
                best_hf = min(med["hf_eager"], med["hf_grouped_mm"])
                rows.append(dict(section="vs_transformers", shape=name, dtype=dt, T=args.tokens,
                                 mode="fwd+bwd" if backward else "fwd", ms={k: v * 1e3 for k, v in med.items()},
                                 vs_dense=med["moekit"] / med["dense"],
                                 speedup_vs_best_hf=best_hf / med["moekit"],
                                 fused_vs_separate=med["moekit_fused"] / med["moekit"],
                                 hf_rel_err=agree))
                print_row(rows[-1])
    return rows


# The issue's grid of fine-grained shapes; `--sweep-shapes` of them are drawn with `--seed`.
GRID = dict(num_experts=(8, 16, 32, 64, 128, 256), top_k=(1, 2, 4, 6, 8),
            d_model=(256, 384, 512, 640, 768, 1024, 1280, 1536, 2048),
            d_ff=(64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048),
            tokens=(256, 512, 1024, 2048, 4096, 8192, 16384))


def layer_gflop(shape: Shape, T: int) -> float:
    """Forward GFLOP of the routed experts: three (D x F) projections over T * k rows."""
    return 6 * T * shape.top_k * shape.d_model * shape.d_ff / 1e9


def sample_shapes(n: int, seed: int, max_gflop: float) -> list[tuple[Shape, int]]:
    """`n` (shape, T) drawn uniformly from GRID; draws whose forward exceeds `max_gflop` are
    redrawn (this machine's budget, printed with the results), nothing else is filtered."""
    import random

    rng, out = random.Random(seed), []
    while len(out) < n:
        E, k, D, Fd, T = (rng.choice(GRID[key]) for key in ("num_experts", "top_k", "d_model", "d_ff", "tokens"))
        shape = Shape(f"E{E}k{k}D{D}F{Fd}T{T}", D, Fd, E, k)
        if k <= E and layer_gflop(shape, T) <= max_gflop:
            out.append((shape, T))
    return out


def parse_shape(name: str) -> tuple[Shape, int]:
    """(shape, T) from a sweep name such as 'E256k1D512F768T256'."""
    import re

    match = re.fullmatch(r"E(\d+)k(\d+)D(\d+)F(\d+)T(\d+)", name)
    if match is None:
        raise SystemExit(f"--sweep-names {name!r}: expected a sweep shape name like E64k4D512F256T1024")
    E, k, D, Fd, T = (int(v) for v in match.groups())
    return Shape(name, D, Fd, E, k), T


def weights_bound_ms(row: dict, copy_GBps: float) -> float:
    """Milliseconds to read, once, the weights of every expert that gets rows (all E of them for
    these T * k, in expectation) at the machine's copy bandwidth: a floor no MoE layer beats when
    few rows reach each expert, which the dense limit (one expert's weights) does not pay.
    A forward+backward reads them twice and writes their gradients once."""
    shape, T = parse_shape(row["shape"])
    E, k, D, Fd = shape.num_experts, shape.top_k, shape.d_model, shape.d_ff
    used = E * (1 - (1 - 1 / E) ** (T * k))
    nbytes = used * 3 * D * Fd * (4 if row["dtype"] == "fp32" else 2) * (3 if row["mode"] == "fwd+bwd" else 1)
    return nbytes / (copy_GBps * 1e9) * 1e3


def section_sweep(args: argparse.Namespace) -> list[dict]:
    """Sampled grid shapes: moekit / dense limit and transformers / moekit, fwd and fwd+bwd."""
    from decode import copy_bandwidth  # benchmarks/decode.py, beside this script

    rows = []
    copy_GBps = copy_bandwidth() / 1e9
    drawn = sample_shapes(args.sweep_shapes, args.seed, args.max_gflop)
    if args.sweep_names:  # re-time named draws of an earlier sweep, e.g. its worst shapes
        drawn = [parse_shape(name) for name in args.sweep_names]
    print(f"sweep: {len(drawn)} shapes drawn with seed {args.seed}, forward <= {args.max_gflop} GFLOP", flush=True)
    for shape, T in drawn:
        for dt in args.dtypes:
            for backward in (False, True):
                # transformers' grouped_mm only: its eager loop is slower at every T >= 256 here
                # (the vs_transformers section times both) and takes minutes per call at E = 256.
                impls = ["moekit", "dense", "hf_grouped_mm"]
                steps = {i: make_step(i, shape, DTYPES[dt], T, backward)[0] for i in impls}
                med = time_side_by_side(steps, warmup=1, repeats=args.sweep_repeats)
                best_hf = med["hf_grouped_mm"]
                rows.append(dict(section="sweep", shape=shape.name, dtype=dt, T=T,
                                 mode="fwd+bwd" if backward else "fwd", ms={k: v * 1e3 for k, v in med.items()},
                                 vs_dense=med["moekit"] / med["dense"], speedup_vs_best_hf=best_hf / med["moekit"],
                                 copy_GBps=copy_GBps))
                print_row(rows[-1])
    return rows


def section_experts_scaling(args: argparse.Namespace) -> list[dict]:
    """E = 8 .. 256 at fixed active compute (top_k * d_ff = 2048), d_model 512."""
    rows = []
    shapes = {E: Shape(f"E{E}", 512, 2048 // k, E, k) for E, k in ((8, 2), (32, 4), (128, 8), (256, 8))}
    for dt in args.dtypes:
        for backward in (False, True):
            steps = {f"E={E}": make_step("moekit", s, DTYPES[dt], args.tokens, backward)[0]
                     for E, s in shapes.items() if E in args.experts}
            med = time_side_by_side(steps, warmup=args.warmup, repeats=args.repeats)
            base = med[f"E={min(args.experts)}"]
            rows.append(dict(section="experts_scaling", dtype=dt, T=args.tokens,
                             mode="fwd+bwd" if backward else "fwd", ms={k: v * 1e3 for k, v in med.items()},
                             vs_smallest_E={k: v / base for k, v in med.items()}))
            print_row(rows[-1])
    return rows


def section_token_scaling(args: argparse.Namespace) -> list[dict]:
    """T = 256 .. 16384 on the OLMoE-like shape: time per token and the ratio to the dense limit."""
    rows = []
    shape = SHAPES["olmoe"]
    for dt in args.dtypes:
        for backward in (False, True):
            steps = {}
            for T in args.token_counts:
                steps[f"moekit T={T}"] = make_step("moekit", shape, DTYPES[dt], T, backward)[0]
                steps[f"dense T={T}"] = make_step("dense", shape, DTYPES[dt], T, backward)[0]
            med = time_side_by_side(steps, warmup=args.warmup, repeats=args.repeats)
            ref_T = max(args.token_counts)
            per_tok = {T: med[f"moekit T={T}"] / T for T in args.token_counts}
            rows.append(dict(section="token_scaling", dtype=dt, mode="fwd+bwd" if backward else "fwd",
                             ms={k: v * 1e3 for k, v in med.items()},
                             per_token_vs_largest_T={T: v / per_tok[ref_T] for T, v in per_tok.items()},
                             vs_dense={T: med[f"moekit T={T}"] / med[f"dense T={T}"] for T in args.token_counts}))
            print_row(rows[-1])
    return rows


def section_decode(args: argparse.Namespace) -> list[dict]:
    """T = 1, 4, 16 forward (no_grad), moekit vs every CPU experts implementation of transformers."""
    rows = []
    for name in args.shapes:
        for dt in args.dtypes:
            for T in args.decode_tokens:
                impls = ["moekit", "hf_eager", "hf_batched_mm", "hf_grouped_mm"]
                steps = {i: make_step(i, SHAPES[name], DTYPES[dt], T, False)[0] for i in impls}
                med = time_side_by_side(steps, warmup=args.warmup + 3, repeats=args.repeats * 5)
                best_hf = min(v for k, v in med.items() if k.startswith("hf_"))
                rows.append(dict(section="decode", shape=name, dtype=dt, T=T,
                                 ms={k: v * 1e3 for k, v in med.items()},
                                 speedup_vs_best_hf=best_hf / med["moekit"]))
                print_row(rows[-1])
    return rows


def section_memory(args: argparse.Namespace) -> list[dict]:
    """Peak RSS growth of one forward + backward, one fresh subprocess per case."""
    rows = []
    for name in args.shapes:
        for dt in args.dtypes:
            peaks = {}
            for impl in ("moekit", "dense", "hf_grouped_mm"):
                cmd = [sys.executable, __file__, "--memory-case", f"{name},{dt},{impl},{args.tokens}",
                       *(["--threads", str(args.threads)] if args.threads else [])]
                env = {k: v for k, v in os.environ.items() if k not in MALLOC_TUNING}  # glibc defaults
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
                peaks[impl] = json.loads(out.strip().splitlines()[-1])
            m, d = peaks["moekit"], peaks["dense"]
            rows.append(dict(section="memory", shape=name, dtype=dt, T=args.tokens, mb=peaks,
                             vs_dense=m["peak_mb"] / d["peak_mb"],
                             vs_dense_without_weight_grads=(m["peak_mb"] - m["weight_grads_mb"])
                             / (d["peak_mb"] - d["weight_grads_mb"])))
            print_row(rows[-1])
    return rows


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_case(spec: str) -> None:
    """Run in a fresh process: peak RSS growth (MB) of one forward + backward, weights already built."""
    name, dt, impl, T = spec.split(",")
    step, module = make_step(impl, SHAPES[name], DTYPES[dt], int(T), True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset the peak RSS (VmHWM) to the current RSS
    before_mb = vm_kib("VmRSS") / 1024
    step()
    peak_mb = vm_kib("VmHWM") / 1024
    grads_mb = sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20
    print(json.dumps(dict(peak_mb=peak_mb - before_mb, weight_grads_mb=grads_mb)))


# ---- output --------------------------------------------------------------------------------------

def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
    return str(v)


def print_row(row: dict) -> None:
    print("  ".join(f"{k}={fmt(v)}" for k, v in row.items() if k != "section"), flush=True)


def markdown_summary(data: dict) -> str:
    """The JSON of a run as Markdown tables (what the README's performance section shows)."""
    rows, out = data["results"], []

    def table(header: list[str], lines: list[list[str]]) -> None:
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "---|" * len(header))
        out.extend("| " + " | ".join(line) + " |" for line in lines)
        out.append("")

    def x(v: float) -> str:
        return f"{v:.2f}x"

    sel = [r for r in rows if r["section"] == "vs_transformers"]
    if sel:
        table(["shape", "dtype", "pass", "moekit ms", "dense ms", "hf eager ms", "hf grouped_mm ms",
               "moekit / dense", "speedup vs best hf", "fused gate+up / separate"],
              [[r["shape"], r["dtype"], r["mode"], f"{r['ms']['moekit']:.0f}", f"{r['ms']['dense']:.0f}",
                f"{r['ms']['hf_eager']:.0f}", f"{r['ms']['hf_grouped_mm']:.0f}", x(r["vs_dense"]),
                x(r["speedup_vs_best_hf"]), x(r["fused_vs_separate"])] for r in sel])
    sel = [r for r in rows if r["section"] == "sweep"]
    for r in sel:
        if r.get("copy_GBps"):
            r["vs_limit"] = r["ms"]["moekit"] / max(r["ms"]["dense"], weights_bound_ms(r, r["copy_GBps"]))
    if sel:
        lines = []
        for dt in dict.fromkeys(r["dtype"] for r in sel):
            for mode in ("fwd", "fwd+bwd"):
                cell = [r for r in sel if r["dtype"] == dt and r["mode"] == mode]
                if not cell:
                    continue
                worst = max(cell, key=lambda r: r["vs_dense"])
                slowest_hf = min(cell, key=lambda r: r["speedup_vs_best_hf"])
                bound = [r for r in cell if "vs_limit" in r]
                worst_b = max(bound, key=lambda r: r["vs_limit"]) if bound else None
                lines.append([dt, mode, str(len(cell)), x(statistics.median(r["vs_dense"] for r in cell)),
                              f"{x(worst['vs_dense'])} ({worst['shape']})",
                              x(statistics.median(r["vs_limit"] for r in bound)) if bound else "-",
                              f"{x(worst_b['vs_limit'])} ({worst_b['shape']})" if worst_b else "-",
                              x(statistics.median(r["speedup_vs_best_hf"] for r in cell)),
                              f"{x(slowest_hf['speedup_vs_best_hf'])} ({slowest_hf['shape']})"])
        table(["dtype", "pass", "shapes", "median moekit / dense", "worst moekit / dense",
               "median moekit / max(dense, weights read)", "worst moekit / max(dense, weights read)",
               "median hf grouped_mm / moekit", "lowest hf grouped_mm / moekit"], lines)
    sel = [r for r in rows if r["section"] == "decode"]
    if sel:
        table(["shape", "dtype", "T", "moekit ms", "hf eager", "hf batched_mm", "hf grouped_mm",
               "speedup vs best hf"],
              [[r["shape"], r["dtype"], str(r["T"])] + [f"{r['ms'][k]:.2f}" for k in
               ("moekit", "hf_eager", "hf_batched_mm", "hf_grouped_mm")] + [x(r["speedup_vs_best_hf"])]
               for r in sel])
    sel = [r for r in rows if r["section"] == "memory"]
    if sel:
        table(["shape", "dtype", "moekit MB", "dense MB", "hf grouped_mm MB", "moekit / dense",
               "same, without weight grads"],
              [[r["shape"], r["dtype"]] + [f"{r['mb'][k]['peak_mb']:.0f}" for k in ("moekit", "dense", "hf_grouped_mm")]
               + [x(r["vs_dense"]), x(r["vs_dense_without_weight_grads"])] for r in sel])
    sel = [r for r in rows if r["section"] == "experts_scaling"]
    if sel:
        names = list(sel[0]["ms"])
        table(["dtype", "pass"] + [f"t({n}) / t({names[0]})" for n in names],
              [[r["dtype"], r["mode"]] + [x(r["vs_smallest_E"][n]) for n in names] for r in sel])
    sel = [r for r in rows if r["section"] == "token_scaling"]
    if sel:
        Ts = list(sel[0]["vs_dense"])
        table(["dtype", "pass"] + [f"T={T}: per-token time vs T={Ts[-1]}, moekit / dense" for T in Ts],
              [[r["dtype"], r["mode"]] + [f"{r['per_token_vs_largest_T'][T]:.2f}, {x(r['vs_dense'][T])}" for T in Ts]
               for r in sel])
    return "\n".join(out)


def cpu_bf16_native() -> bool:
    """The CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16), so bf16 GEMMs run at speed
    in every layout; without them the layout matters (moekit.experts.layout)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


SECTIONS = {
    "sweep": section_sweep,
    "vs_transformers": section_vs_transformers,
    "decode": section_decode,
    "memory": section_memory,
    "experts_scaling": section_experts_scaling,
    "token_scaling": section_token_scaling,
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small subset that runs in a couple of minutes")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (median reported)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sweep's shape draw (printed)")
    p.add_argument("--sweep-shapes", type=int, default=None, help="shapes drawn for the sweep (default 32)")
    p.add_argument("--sweep-names", nargs="+", default=None, metavar="NAME",
                   help="time these sweep shapes (e.g. E256k1D512F768T256) instead of a random draw")
    p.add_argument("--sweep-repeats", type=int, default=3, help="timed repeats per sweep case")
    p.add_argument("--max-gflop", type=float, default=2.0,
                   help="redraw sweep shapes whose forward exceeds this many GFLOP (a 2-core budget)")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--summary", type=Path, default=None, help="print a run's JSON as Markdown tables and exit")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice); 1 is steadier on a shared machine")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's malloc settings (by default the run re-executes itself with "
                        "MALLOC_MMAP_THRESHOLD_ raised, see MALLOC_TUNING)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        memory_case(args.memory_case)
        return
    if args.summary:
        print(markdown_summary(json.loads(args.summary.read_text())))
        return
    if not args.default_malloc and any(os.environ.get(k) != v for k, v in MALLOC_TUNING.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNING})
    quick = args.quick
    args.repeats = args.repeats or (3 if quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    args.shapes = ["olmoe"] if quick else list(SHAPES)
    args.dtypes = ["bf16"] if quick else ["fp32", "bf16"]
    args.tokens = 1024 if quick else 4096
    args.experts = (8, 256) if quick else (8, 32, 128, 256)
    args.token_counts = (256, 1024) if quick else (256, 1024, 4096, 16384)
    args.decode_tokens = (1,) if quick else (1, 4, 16)
    args.sweep_shapes = args.sweep_shapes or (4 if quick else 32)
    sections = args.sections.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")

    machine = dict(cpu=cpu_name(), bf16_native=cpu_bf16_native(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                   torch=torch.__version__, python=platform.python_version(),
                   malloc={k: os.environ.get(k) for k in MALLOC_TUNING})
    print(f"machine: {machine}  shapes: {[asdict(SHAPES[s]) for s in args.shapes]}", flush=True)
    out = args.out or RESULTS / ("moe_layer_quick.json" if quick else "moe_layer.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "memory_case")}
    rows = []
    for s in sections:
        print(f"\n== {s}", flush=True)
        rows += SECTIONS[s](args)
        # Written after every section, so a long run interrupted late keeps what it measured.
        out.write_text(json.dumps(dict(machine=machine, args=config, results=rows), indent=1, default=str) + "\n")
    print(f"\nwrote {out}\n")
    print(markdown_summary(json.loads(out.read_text())))


if __name__ == "__main__":
    main()
