"""Slow reference mixture of attention (JetMoE): one token slot at a time, plain causal attention.

Given a decision (expert ids and weights per token slot), each slot's query is x @ w_q[e]; slot j's
head h attends over K/V head h with `reference_attention`; the slot output goes through w_o[e],
is weighted and summed per token, plus the bias.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_attention(q_BHSd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, scale: float) -> Tensor:
    """softmax(q k^T * scale + causal mask) v, written out (differentiable, unlike reference_attention)."""
    S = q_BHSd.shape[2]
    scores = (q_BHSd @ k_BHSd.transpose(-1, -2)) * scale
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v_BHSd


def reference_moa(moa, x_BSD: Tensor, ids_TK: Tensor, w_TK: Tensor, cos_sin=None) -> Tensor:
    from moekit.model.rope import apply_rope

    cfg = moa.model_config
    B, S, D = x_BSD.shape
    K, hd, k = cfg.kv_heads, cfg.dim_head, ids_TK.shape[1]
    x_TD = x_BSD.reshape(-1, D)
    q_rows = []
    for t in range(B * S):
        slots = [x_TD[t] @ moa.w_q_EDA[e] if e >= 0 else x_TD.new_zeros(K * hd) for e in ids_TK[t].tolist()]
        q_rows.append(torch.stack(slots))
    q_BHSd = torch.stack(q_rows).view(B, S, k * K, hd).transpose(1, 2)
    k_BSA, v_BSA = moa.kv_proj(x_BSD).chunk(2, dim=-1)
    k_BKSd = k_BSA.view(B, S, K, hd).transpose(1, 2)
    v_BKSd = v_BSA.view(B, S, K, hd).transpose(1, 2)
    if cos_sin is not None:
        q_BHSd, k_BKSd = apply_rope(q_BHSd, *cos_sin), apply_rope(k_BKSd, *cos_sin)
    out_BHSd = causal_attention(q_BHSd, k_BKSd.repeat(1, k, 1, 1), v_BKSd.repeat(1, k, 1, 1), moa.scale)
    out_TKA = out_BHSd.transpose(1, 2).reshape(B * S, k, K * hd)
    y = []
    for t in range(B * S):
        acc = torch.zeros(D)
        for j, e in enumerate(ids_TK[t].tolist()):
            if e >= 0:
                acc = acc + w_TK[t, j] * (out_TKA[t, j] @ moa.w_o_EAD[e])
        y.append(acc)
    return (torch.stack(y) + moa.bias).view(B, S, D)
