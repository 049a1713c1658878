"""Slow, obviously-correct attention: one query, one head at a time, with Python-level loops.

Covers causal masking, sliding windows, chunks, padding keys, GQA head sharing, soft-capping, sinks,
plus a per-position RoPE rotation written from the definition (pairs rotated by angle pos * freq).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reference_attention(
    q_BHSd: Tensor,
    k_BKTd: Tensor,
    v_BKTe: Tensor,
    *,
    q_positions: list[int],
    scale: float,
    window: int | None = None,
    chunk: int | None = None,
    key_mask_BT: Tensor | None = None,
    softcap: float | None = None,
    sinks_H: Tensor | None = None,
) -> Tensor:
    """out[b, h, i] = sum_j p_j v[b, h // (H/K), j] over keys j <= pos_i (and within the window)."""
    B, H, S, _ = q_BHSd.shape
    K, T = k_BKTd.shape[1], k_BKTd.shape[2]
    out = torch.zeros(B, H, S, v_BKTe.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)
            for i in range(S):
                pos = q_positions[i]
                visible = [j for j in range(T) if j <= pos and (window is None or j > pos - window)
                           and (chunk is None or j // chunk == pos // chunk)
                           and (key_mask_BT is None or bool(key_mask_BT[b, j]))]
                logits = []
                for j in visible:
                    s = float((q_BHSd[b, h, i].double() * k_BKTd[b, kv, j].double()).sum()) * scale
                    if softcap is not None:
                        s = softcap * math.tanh(s / softcap)
                    logits.append(s)
                extra = [float(sinks_H[h])] if sinks_H is not None else []
                if not logits:
                    continue
                m = max(logits + extra)
                weights = [math.exp(s - m) for s in logits]
                denom = sum(weights) + sum(math.exp(s - m) for s in extra)
                for w, j in zip(weights, visible):
                    out[b, h, i] += (w / denom) * v_BKTe[b, kv, j].double()
    return out


def reference_rope(x_BHSd: Tensor, positions: list[int], freqs: list[float], *, interleaved: bool) -> Tensor:
    """Rotate each pair (a, b) by angle pos * freq_j: (a cos - b sin, b cos + a sin).

    Pairs are (j, j + R) in the half layout and (2j, 2j + 1) interleaved; the interleaved output is
    written as [rotated evens, rotated odds], matching `apply_rope`'s layout.
    """
    R = len(freqs)
    out = x_BHSd.double().clone()
    for s, pos in enumerate(positions):
        for j, f in enumerate(freqs):
            c, sn = math.cos(pos * f), math.sin(pos * f)
            ia, ib = (2 * j, 2 * j + 1) if interleaved else (j, j + R)
            a, b = x_BHSd[..., s, ia].double(), x_BHSd[..., s, ib].double()
            out[..., s, j] = a * c - b * sn
            out[..., s, j + R] = b * c + a * sn
    return out
