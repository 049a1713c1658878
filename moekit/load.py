"""`moekit.from_pretrained`: open any checkpoint folder moekit reads, in memory, or with its routed
experts offloaded to the files and read on demand (`moekit.inference.offload`), or quantized
(`moekit.inference.quant`).

This sits above `moekit.hf` and `moekit.inference`, which `moekit.hf.checkpoint.from_pretrained`
(the in-memory loader) must not import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def from_pretrained(
    path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
    offload_experts: bool = False, expert_cache: int | str | None = None, quantize: str | None = None,
    **offload_options: Any,
) -> nn.Module:
    """Load a Hugging Face directory, a native moekit directory or a training run's `final/`.

    Args:
        dtype, device: as in `moekit.hf.checkpoint.from_pretrained`.
        offload_experts, expert_cache: keep routed experts in the files and read them on demand into
            a cache of at most `expert_cache` bytes (e.g. "2GB"); further options (policy=, pin=,
            pin_fraction=, prefetch=) are `moekit.inference.offload.OffloadConfig`'s.
        quantize: "int8" or "int4" weight-only quantized experts. A directory written by
            `moekit.inference.quant.save_quantized` loads quantized as stored, without it.
    """
    from moekit.hf.native import is_native, read_native

    if is_native(path) and read_native(path).quantize is not None:
        if quantize is not None:
            raise ValueError(f"{path} already holds quantized weights; load it without quantize=")
        from moekit.inference.offload import load_quantized

        return load_quantized(path, device=device, offload_experts=offload_experts, expert_cache=expert_cache,
                              **offload_options)
    if offload_experts or quantize is not None or expert_cache is not None or offload_options:
        from moekit.inference.offload import load_with_options

        return load_with_options(path, dtype=dtype, device=device, offload_experts=offload_experts,
                                 expert_cache=expert_cache, quantize=quantize, **offload_options)
    from moekit.hf.checkpoint import from_pretrained as load_in_memory

    return load_in_memory(path, dtype=dtype, device=device)
