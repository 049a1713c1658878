"""Slow references of the expert-choice, hash, Sinkhorn and Soft MoE routers.

Per-token / per-expert Python loops that follow the papers' definitions. Weights are built from the
logits with scalar torch ops (so autograd gives reference gradients); selections use Python floats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tests.reference.moe import expert_mlp


def softmax_row(logits: Tensor) -> list[Tensor]:
    """Softmax of a 1-D tensor as a list of scalar tensors (exp(l - max) / sum)."""
    m = float(logits.detach().max())
    ex = [torch.exp(logits[i].float() - m) for i in range(logits.shape[0])]
    total = sum(ex)
    return [v / total for v in ex]


def sigmoid_row(logits: Tensor) -> list[Tensor]:
    return [1 / (1 + torch.exp(-logits[i].float())) for i in range(logits.shape[0])]


# ---- expert choice (Zhou et al. 2022) -------------------------------------------------------------
def reference_expert_choice(
    logits_TE: Tensor, *, top_k: int, mask_T: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Each expert in turn sorts the real tokens by (score desc, token id asc) and takes the first C."""
    T, E = logits_TE.shape
    real = [t for t in range(T) if mask_T is None or bool(mask_T[t])]
    capacity = math.ceil(len(real) * top_k / E)
    scores = [softmax_row(logits_TE[t]) for t in range(T)]
    ids = [[-1] * E for _ in range(T)]
    weights: list[list[Tensor]] = [[torch.zeros(())] * E for _ in range(T)]
    for e in range(E):
        ranked = sorted(real, key=lambda t: (-float(scores[t][e].detach()), t))
        for t in ranked[:capacity]:
            ids[t][e] = e
            weights[t][e] = scores[t][e]
    weights_TE = torch.stack([torch.stack(row) for row in weights]) if T else torch.zeros(0, E)
    return torch.tensor(ids, dtype=torch.long).reshape(T, E), weights_TE


# ---- hash layers (Roller et al. 2021) --------------------------------------------------------------
def reference_round_robin(vocab_size: int, num_experts: int, top_k: int) -> list[list[int]]:
    """Slots 0, 1, 2, ... dealt to experts 0, 1, ..., E-1, 0, ...: token v holds slots v*K .. v*K+K-1."""
    table, slot = [], 0
    for _ in range(vocab_size):
        row = []
        for _ in range(top_k):
            row.append(slot % num_experts)
            slot += 1
        table.append(row)
    return table


def reference_balanced_table(counts: list[int], num_experts: int, top_k: int) -> list[list[int]]:
    """Most frequent token first; each takes the K least-loaded experts (lower id on ties)."""
    loads = [0] * num_experts
    table = [[0] * top_k for _ in counts]
    for v in sorted(range(len(counts)), key=lambda v: (-counts[v], v)):
        picked: list[int] = []
        for _ in range(top_k):
            free = [e for e in range(num_experts) if e not in picked]
            picked.append(min(free, key=lambda e: (loads[e], e)))
        for e in picked:
            loads[e] += counts[v]
        table[v] = picked
    return table


def reference_hash(token_ids: list[int], table: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Look each token up in the table; weight 1/K per expert."""
    K = len(table[0])
    ids = [list(table[v]) for v in token_ids]
    return torch.tensor(ids, dtype=torch.long).reshape(len(ids), K), torch.full((len(ids), K), 1.0 / K)


# ---- Sinkhorn (Megatron-LM's sinkhorn router) ----------------------------------------------------
def reference_sinkhorn_matrix(logits_TE: Tensor, *, iters: int, mask_T: Tensor | None = None) -> list[list[float]]:
    """Megatron-LM `sinkhorn` with a fixed number of iterations, on real tokens, with Python floats.

    cost = exp(logits); d0 (per token) and d1 (per expert) alternately: d0 = 1/T / sum_e d1 cost,
    d1 = 1/E / sum_t d0 cost; the result is d1 * cost * d0. Padded rows are all 0.
    """
    T, E = logits_TE.shape
    real = [t for t in range(T) if mask_T is None or bool(mask_T[t])]
    cost = [[math.exp(float(logits_TE[t, e].detach())) for e in range(E)] for t in range(T)]
    d0 = [1.0] * T
    d1 = [1.0] * E
    for _ in range(iters):
        for t in real:
            d0[t] = (1 / len(real)) / sum(d1[e] * cost[t][e] for e in range(E))
        for e in range(E):
            d1[e] = (1 / E) / sum(d0[t] * cost[t][e] for t in real)
    return [[d1[e] * cost[t][e] * d0[t] if t in real else 0.0 for e in range(E)] for t in range(T)]


def reference_sinkhorn(
    logits_TE: Tensor,
    *,
    top_k: int,
    iters: int,
    balanced: bool,
    score_func: str = "softmax",
    normalize_topk: bool = True,
    routed_scaling_factor: float = 1.0,
    mask_T: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per token: top-k experts of the balanced matrix (or of the scores), weights from the scores."""
    T, E = logits_TE.shape
    P = reference_sinkhorn_matrix(logits_TE, iters=iters, mask_T=mask_T) if balanced else None
    ids, weights = [], []
    for t in range(T):
        scores = softmax_row(logits_TE[t]) if score_func == "softmax" else sigmoid_row(logits_TE[t])
        select = P[t] if P is not None else [float(s.detach()) for s in scores]
        chosen = sorted(range(E), key=lambda e: (-select[e], e))[:top_k]
        w = [scores[e] for e in chosen]
        if normalize_topk:
            total = sum(w)
            w = [v / total for v in w]
        ids.append(chosen)
        weights.append(torch.stack([v * routed_scaling_factor for v in w]))
    return torch.tensor(ids, dtype=torch.long).reshape(T, top_k), torch.stack(weights)


# ---- Soft MoE (Puigcerver et al. 2023) ------------------------------------------------------------
def reference_soft_moe(
    x_BSD: Tensor, phi_DN: Tensor, experts: nn.Module, *, slots: int, mask_BS: Tensor | None = None
) -> Tensor:
    """Per sequence, per slot: input = sum_s D[s, n] x_s with D softmax over real tokens (eq. 1);
    slot n -> expert n // slots; per token: y_s = sum_n C[s, n] slot_out_n, C softmax over slots
    (eq. 3). Padded tokens get 0 and are not mixed in."""
    B, S, D = x_BSD.shape
    N = phi_DN.shape[1]
    out = []
    for b in range(B):
        real = [s for s in range(S) if mask_BS is None or bool(mask_BS[b, s])]
        logits_SN = x_BSD[b].float() @ phi_DN.float()
        slot_out = []
        for n in range(N):
            if real:
                w = softmax_row(logits_SN[real, n])
                x_in = sum(w[i] * x_BSD[b, s].float() for i, s in enumerate(real))
            else:
                x_in = torch.zeros(D)
            slot_out.append(expert_mlp(experts, n // slots, x_in.to(x_BSD.dtype)).float())
        rows = []
        for s in range(S):
            if s in real:
                c = softmax_row(logits_SN[s])
                rows.append(sum(c[n] * slot_out[n] for n in range(N)))
            else:
                rows.append(torch.zeros(D))
        out.append(torch.stack(rows))
    return torch.stack(out).to(x_BSD.dtype)
