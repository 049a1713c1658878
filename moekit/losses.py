"""Balancing losses for MoE routers: pure, keyword-only functions.

Every function takes an optional padding mask (True = real token) and ignores padded tokens: they
are excluded by selection (torch.where), never by multiplying with 0, so a NaN or inf in a padded
token's logits cannot reach a loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _mask_T(mask_T: Tensor | None, T: int, device: torch.device) -> Tensor:
    """The padding mask as bool (T,), all True when None."""
    if mask_T is None:
        return torch.ones(T, dtype=torch.bool, device=device)
    return mask_T.reshape(-1).to(device=device, dtype=torch.bool)


def expert_fraction_E(selected_TK: Tensor, *, num_experts: int, mask_T: Tensor | None = None) -> Tensor:
    """f_e: the fraction of (real) token slots the router sent to expert e (before dropping)."""
    T, K = selected_TK.shape
    m_T = _mask_T(mask_T, T, selected_TK.device)
    valid_TK = ((selected_TK >= 0) & m_T[:, None]).float()
    counts_E = torch.zeros(num_experts, device=selected_TK.device).index_add_(
        0, selected_TK.clamp_min(0).reshape(-1), valid_TK.reshape(-1)
    )
    return counts_E / (m_T.sum() * K).clamp_min(1.0)


def global_expert_fraction_E(
    selected_TK: Tensor, *, num_experts: int, mask_T: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """f_e over the tokens of every rank of `group`: slot counts and token counts summed, then divided."""
    T, K = selected_TK.shape
    m_T = _mask_T(mask_T, T, selected_TK.device)
    valid_TK = (selected_TK >= 0).float() * m_T[:, None]
    counts_E1 = torch.zeros(num_experts + 1, device=selected_TK.device)
    counts_E1[:num_experts].index_add_(0, selected_TK.clamp_min(0).reshape(-1), valid_TK.reshape(-1))
    counts_E1[num_experts] = m_T.sum()
    dist.all_reduce(counts_E1, group=group)  # integer-valued floats: the sum is exact
    return counts_E1[:num_experts] / (counts_E1[num_experts] * K).clamp_min(1.0)


def mean_prob_E(probs_TE: Tensor, *, mask_T: Tensor | None = None) -> Tensor:
    """P_e: the mean router probability of expert e over real tokens."""
    m_T = _mask_T(mask_T, probs_TE.shape[0], probs_TE.device)
    kept_TE = torch.where(m_T[:, None], probs_TE.float(), 0.0)
    return kept_TE.sum(0) / m_T.sum().clamp_min(1)


def load_balance_loss(
    *,
    probs_TE: Tensor,
    selected_TK: Tensor,
    mask_T: Tensor | None = None,
    num_sequences: int = 1,
    granularity: str = "micro_batch",
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Switch / GShard balance loss  E * sum_e f_e * P_e  (Fedus et al. 2021, eq. 4).

    Uniform routing gives 1; all tokens on one expert gives E (for top-1).
    granularity:
        "micro_batch": f and P over all tokens of this call.
        "sequence":    the loss per sequence, averaged (DeepSeek-V3 sequence-wise loss); tokens
                       are laid out as `num_sequences` equal, contiguous sequences.
        "global":      f over the whole data-parallel batch: the expert counts are summed over
                       `group` (the default group when torch.distributed is initialised), P stays
                       local (Qiu et al. 2025, global-batch balance).
    group: the ranks that together hold this micro-batch (moekit.parallel sets it on each layer).
        Given, "micro_batch" and "global" count f over all their tokens, so the loss averaged over
        the ranks equals the one-process loss of the whole batch. "sequence" needs no exchange.
    """
    T, E = probs_TE.shape
    if granularity == "sequence":
        if T % num_sequences:
            raise ValueError(f"{T} tokens do not split into num_sequences={num_sequences} sequences")
        S = T // num_sequences
        m_BS = _mask_T(mask_T, T, probs_TE.device).view(num_sequences, S)
        losses = [
            load_balance_loss(probs_TE=probs_TE[b * S:(b + 1) * S],
                              selected_TK=selected_TK[b * S:(b + 1) * S], mask_T=m_BS[b])
            for b in range(num_sequences)
        ]
        present = m_BS.any(1)
        return torch.where(present, torch.stack(losses), 0.0).sum() / present.sum().clamp_min(1)
    if granularity not in ("micro_batch", "global"):
        raise ValueError(f"granularity={granularity!r} is invalid: 'micro_batch', 'sequence' or 'global'")
    if group is not None or (granularity == "global" and dist.is_available() and dist.is_initialized()):
        f_E = global_expert_fraction_E(selected_TK, num_experts=E, mask_T=mask_T, group=group)
    else:
        f_E = expert_fraction_E(selected_TK, num_experts=E, mask_T=mask_T)
    return E * (f_E.detach() * mean_prob_E(probs_TE, mask_T=mask_T)).sum()


def z_loss(*, logits_TE: Tensor, mask_T: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2."""
    m_T = _mask_T(mask_T, logits_TE.shape[0], logits_TE.device)
    lse_T = torch.logsumexp(logits_TE.float(), dim=-1)
    return torch.where(m_T, lse_T.square(), 0.0).sum() / m_T.sum().clamp_min(1)


def expert_bias_update(bias_E: Tensor, counts_E: Tensor, *, rate: float) -> Tensor:
    """Aux-loss-free bias step (Wang et al. 2024; DeepSeek-V3): b + rate * sign(mean load - load)."""
    load_E = counts_E.float()
    return bias_E + rate * torch.sign(load_E.mean() - load_E)
