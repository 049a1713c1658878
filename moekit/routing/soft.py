"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts"), for encoders.

Each expert owns `soft_slots` slots: N = E * soft_slots slots in all, slot n belongs to expert
n // soft_slots (N is this file's extra shape suffix). Per sequence, each slot's input is a softmax
mix of the sequence's tokens (dispatch), each expert processes its slots, and each token's output is a
softmax mix of all slot outputs (combine). Slots mix tokens of a sequence, so it is never causal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.routing.base import Router, counts_from_ids, detach_decision
from moekit.types import RoutingDecision

CAUSAL_ERROR = (
    "router='soft' mixes all tokens of a sequence into every expert slot, so a token's output depends "
    "on later tokens: it cannot be used causally (decoders, generation). Use it in an encoder "
    "(causal=False) or choose another router (topk, sinkhorn, hash)."
)
REPLAY_ERROR = (
    "router='soft' makes no discrete expert choice, so there is nothing to replay; clear router.replay "
    "(recording works: it stores the per-expert combine weights)"
)


def soft_dispatch_combine(logits_BSN: Tensor, mask_BS: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Dispatch and combine weights from the slot logits X Phi (fp32).

    dispatch_BSN: softmax over the tokens of a sequence for each slot (paper eq. 1); padded tokens get
        0 and a fully padded sequence dispatches nothing.
    combine_BSN: softmax over all slots for each token (paper eq. 3); 0 for padded tokens.
    """
    logits_BSN = logits_BSN.float()
    combine_BSN = logits_BSN.softmax(-1)
    if mask_BS is None:
        return logits_BSN.softmax(1), combine_BSN
    keep_BS1 = mask_BS.bool()[..., None]
    # A finite fill keeps a fully padded sequence free of NaN (uniform, then zeroed by the mask).
    fill = torch.finfo(torch.float32).min
    dispatch_BSN = logits_BSN.masked_fill(~keep_BS1, fill).softmax(1) * keep_BS1
    return dispatch_BSN, combine_BSN * keep_BS1


def soft_moe(
    x_BSD: Tensor, logits_BSN: Tensor, experts: nn.Module, *, slots: int, mask_BS: Tensor | None = None
) -> Tensor:
    """Soft MoE: y = C (f(D^T X)) per sequence, with D, C from `soft_dispatch_combine`.

    Args:
        x_BSD: tokens, any float dtype. logits_BSN: fp32 slot logits X Phi.
        experts: an `Experts` module, called once on all slots (rows sorted by expert).
        slots: slots per expert; the number of experts is N / slots.
        mask_BS: bool, True for real tokens (padded tokens are not mixed in and get output 0).
    Returns:
        y_BSD in x's dtype (the mixes are computed in fp32).
    """
    B, S, D = x_BSD.shape
    N = logits_BSN.shape[-1]
    E = N // slots
    dispatch_BSN, combine_BSN = soft_dispatch_combine(logits_BSN, mask_BS)
    xs_BND = torch.einsum("bsn,bsd->bnd", dispatch_BSN, x_BSD.float()).to(x_BSD.dtype)
    # Rows sorted by expert: (B, E, slots, D) -> (E, B, slots, D), B * slots rows per expert.
    rows_RD = xs_BND.reshape(B, E, slots, D).transpose(0, 1).reshape(E * B * slots, D)
    counts_E = torch.full((E,), B * slots, dtype=torch.long, device=x_BSD.device)
    ys_RD = experts(rows_RD, counts_E)
    ys_BND = ys_RD.reshape(E, B, slots, D).transpose(0, 1).reshape(B, N, D)
    return torch.einsum("bsn,bnd->bsd", combine_BSN, ys_BND.float()).to(x_BSD.dtype)


def soft_decision(logits_TN: Tensor, *, slots: int, mask_T: Tensor | None = None) -> RoutingDecision:
    """A RoutingDecision summarising soft routing per expert, for losses, statistics and analysis.

    Fields (K = E): every real token is on every expert, `expert_ids_TK[t, e] = e` (-1 for padded
    tokens); `weights_TK[t, e]` is the token's combine weight summed over expert e's slots (rows sum
    to 1); `logits_TE` is the logsumexp of the token's slot logits over e's slots, so that
    `probs_TE = softmax(logits_TE)` equals those summed combine weights; `counts_E` is the number of
    real tokens each expert mixes into its slots (every expert processes num_sequences * slots slot
    rows). The output is NOT weights_TK applied to per-token expert outputs: experts see mixes of
    tokens (see `soft_moe`).
    """
    T, N = logits_TN.shape
    E = N // slots
    logits_TE = logits_TN.float().reshape(T, E, slots).logsumexp(-1)
    probs_TE = logits_TE.softmax(-1)
    ids_TE = torch.arange(E, device=logits_TN.device).expand(T, E).clone()
    weights_TE = probs_TE
    if mask_T is not None:
        keep_T1 = mask_T.reshape(-1, 1).bool()
        ids_TE = ids_TE.masked_fill(~keep_T1, -1)
        weights_TE = weights_TE * keep_T1
    return RoutingDecision(ids_TE, weights_TE, logits_TE, probs_TE, counts_from_ids(ids_TE, E))


class SoftRouter(Router):
    """Holds Phi (`phi_DN`, D x E * soft_slots) and computes the slot logits X Phi.

    The mixing itself runs in `soft_moe_layer` (SoftMoELayer calls it), since it needs whole sequences.
    `route` / `forward` on a flat (T, D) input treat it as one sequence and return `soft_decision`.
    The paper's l2-normalisation of X and Phi (for large d_model) is not applied.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        D, N = config.d_model, config.num_experts * config.soft_slots
        # LeCun-normal initialisation, as in the paper's code.
        self.phi_DN = nn.Parameter(torch.randn(D, N) / math.sqrt(D))

    def slot_logits(self, x_BSD: Tensor) -> Tensor:
        """X Phi in fp32, (..., N)."""
        return x_BSD.float() @ self.phi_DN.float()

    def route(
        self, x_TD: Tensor, *, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None
    ) -> RoutingDecision:
        return soft_decision(self.slot_logits(x_TD), slots=self.config.soft_slots, mask_T=mask_T)

    def weights_for(self, x_TD: Tensor, expert_ids_TK: Tensor) -> RoutingDecision:
        raise ValueError(REPLAY_ERROR)


def soft_moe_layer(
    router: SoftRouter, experts: nn.Module, x: Tensor, mask_T: Tensor | None
) -> tuple[Tensor, RoutingDecision]:
    """SoftMoELayer's routing and experts: x (B, S, D) or (T, D) (one sequence) -> (y_TD, decision)."""
    x_BSD = x if x.dim() == 3 else x[None]
    B, S, D = x_BSD.shape
    mask_BS = None if mask_T is None else mask_T.reshape(B, S)
    logits_BSN = router.slot_logits(x_BSD)
    y_BSD = soft_moe(x_BSD, logits_BSN, experts, slots=router.config.soft_slots, mask_BS=mask_BS)
    decision = soft_decision(logits_BSN.reshape(B * S, -1), slots=router.config.soft_slots, mask_T=mask_T)
    if router.recording is not None:
        router.recording.append(detach_decision(decision))
    return y_BSD.reshape(B * S, D), decision
