"""Shared by the offload and quantization tests: tiny checkpoints, greedy decoding, one thread."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import moekit
from moekit.inference.offload import FloatFormat


def greedy_logits(model, prompt_BS: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Logits of the prompt and of each greedily decoded token, through the model's KV cache."""
    cache = model.new_cache()
    with torch.no_grad():
        logits = model(prompt_BS, cache=cache).logits
        out = [logits]
        for _ in range(steps):
            nxt_B1 = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(nxt_B1, cache=cache).logits
            out.append(logits)
    return out


def expert_bytes(model, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one routed expert takes in a float cache slot."""
    return FloatFormat(model.moe_layers()[0].config, dtype).spec().nbytes


def load_quiet(path: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unexpected "offloading is not needed" fails the test
        return moekit.from_pretrained(path, **kwargs)
