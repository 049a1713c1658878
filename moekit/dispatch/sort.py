"""Dropless dispatch: sort token slots by expert, run the experts, scatter back.

`dispatch` gathers one row per (token, slot) whose expert id is >= 0, ordered by expert (stable, so
rows of one expert keep token order). `combine` multiplies each row by its routing weight, in fp32,
and sums the rows of a token: the only place routing weights are applied. Its backward keeps only
the rows in their own dtype (no fp32 copy of the routed activations lives until the backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.types import DispatchPlan, RoutingDecision


def sort_plan(expert_ids_TK: Tensor, weights_TK: Tensor, num_experts: int) -> tuple[DispatchPlan, Tensor]:
    """Plan of rows sorted by expert, and tokens per expert (long (E,)). Slots with id -1 are skipped."""
    T, K = expert_ids_TK.shape
    ids_S = expert_ids_TK.reshape(-1)
    # Unrouted slots (-1) sort after every expert and are cut off.
    key_S = torch.where(ids_S < 0, torch.full_like(ids_S, num_experts), ids_S)
    order_S = torch.sort(key_S, stable=True).indices
    counts_E = torch.bincount(key_S, minlength=num_experts + 1)[:num_experts]
    order_R = order_S[: int(counts_E.sum())]
    plan = DispatchPlan(
        token_index_R=order_R // K,
        weights_R=weights_TK.reshape(-1)[order_R],
        num_tokens=T,
        slot_index_R=order_R,
    )
    return plan, counts_E


# Rows per chunk in the router-weight gradient: bounds its fp32 temporaries to a few MB.
_CHUNK_ROWS = 4096


class WeightedCombine(torch.autograd.Function):
    """y_TD[t] = sum over rows r of token t of weights_R[r] * y_RD[r], accumulated in fp32.

    Autograd on the same expression would save y_RD.float() (twice the bytes of bf16 rows) for the
    weight gradient; this saves y_RD as it is and upcasts chunk by chunk in the backward.
    """

    @staticmethod
    def forward(ctx, y_RD: Tensor, weights_R: Tensor, token_index_R: Tensor, num_tokens: int) -> Tensor:
        ctx.weights_dtype = weights_R.dtype
        weights_R = weights_R.float()
        y_TD = y_RD.new_zeros((num_tokens, y_RD.shape[-1]), dtype=torch.float32)
        y_TD.index_add_(0, token_index_R, y_RD.float() * weights_R[:, None])
        ctx.save_for_backward(y_RD, weights_R, token_index_R)
        return y_TD.to(y_RD.dtype)

    @staticmethod
    def backward(ctx, grad_TD: Tensor):  # type: ignore[override]
        y_RD, weights_R, token_index_R = ctx.saved_tensors
        grad_RD = grad_TD.index_select(0, token_index_R)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = (grad_RD.float() * weights_R[:, None]).to(y_RD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.cat([
                (g_rD.float() * y_rD.float()).sum(-1)
                for g_rD, y_rD in zip(grad_RD.split(_CHUNK_ROWS), y_RD.split(_CHUNK_ROWS))
            ]).to(ctx.weights_dtype) if y_RD.shape[0] else weights_R.new_zeros(0, dtype=ctx.weights_dtype)
        return grad_y, grad_w, None, None


def combine_slots(o_TKD: Tensor, weights_TK: Tensor) -> Tensor:
    """y_TD = sum over k of weights_TK[t, k] * o_TKD[t, k], in fp32 (slots without an expert carry
    weight 0 and a zero row); the combine of a decode step computed per slot (MoELayer.few_rows)."""
    return (o_TKD.float() * weights_TK.float()[..., None]).sum(1)


class SortDispatcher:
    """Dropless dispatcher (no parameters): `dispatch(x_TD, decision)` -> rows sorted by expert."""

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchPlan]:
        plan, counts_E = sort_plan(decision.expert_ids_TK, decision.weights_TK, decision.num_experts)
        # index_select, not x_TD[index]: the same gather, several times faster on CPU (and its
        # backward is an index_add rather than an accumulating index_put).
        return x_TD.index_select(0, plan.token_index_R), counts_E, plan

    def combine(self, y_RD: Tensor, plan: DispatchPlan) -> Tensor:
        """Weighted sum of each token's rows, accumulated in fp32, returned in y's dtype."""
        return WeightedCombine.apply(y_RD, plan.weights_R, plan.token_index_R, plan.num_tokens)
