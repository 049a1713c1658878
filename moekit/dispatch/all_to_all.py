"""Expert-parallel dispatch: rows travel to the rank that holds their expert and back.

The sort dispatcher's contract over an expert-parallel group of `ep` ranks, each holding
`e = E / ep` consecutive experts (rank r: experts [r*e, (r+1)*e)):

    dispatch: sort slots by global expert (-1 slots skipped, so dropless and capacity-dropped
              decisions go the same way) -> exchange per-expert counts -> all_to_all_single with
              uneven splits -> permute rank-major rows to local-expert-major order
    combine:  the inverse permutation -> all_to_all_single back -> the fp32 weighted sum

The one host sync of a layer is the `.tolist()` of the exchanged counts (the collective needs
its split sizes as Python ints); everything after it runs from those numbers. Both exchanges use
the autograd-aware functional collective, so the backward sends gradients the reverse way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from moekit.dispatch.sort import WeightedCombine
from moekit.types import DispatchPlan, RoutingDecision


def exclusive_cumsum(n_X: Tensor) -> Tensor:
    """[0, n0, n0+n1, ...] of a 1-D count tensor (same length)."""
    return torch.cumsum(n_X, 0) - n_X


def rank_to_expert_major(recv_counts_Pe: Tensor, num_rows: int) -> Tensor:
    """Permutation (long (R,)) taking rank-major received rows to local-expert-major order.

    Received rows come as blocks (source rank p, local expert j) in p-major order; the experts need
    them in j-major order (all of expert 0's rows from every source, then expert 1's, ...). Row i
    of the expert-major order is row `perm[i]` of the received buffer. `num_rows` is the known total
    (no host sync here).
    """
    start_Pe = exclusive_cumsum(recv_counts_Pe.reshape(-1)).view_as(recv_counts_Pe)
    size_eP = recv_counts_Pe.t().reshape(-1)
    start_eP = start_Pe.t().reshape(-1)
    # Each expert-major row i in block b: start_eP[b] + (i - first row of block b).
    shift_eP = start_eP - exclusive_cumsum(size_eP)
    arange_R = torch.arange(num_rows, device=recv_counts_Pe.device)
    return torch.repeat_interleave(shift_eP, size_eP, output_size=num_rows) + arange_R


class AllToAllDispatcher:
    """Dispatcher over an expert-parallel process group (no parameters).

    Args:
        group: the expert-parallel group; its rank r holds experts [r*e, (r+1)*e).
        num_experts: E, the layer's global expert count (divisible by the group size).
    `dispatch` returns the rows this rank's experts run, sorted by local expert, and counts (e,).
    """

    def __init__(self, group: dist.ProcessGroup, *, num_experts: int) -> None:
        self.group = group
        self.ep = dist.get_world_size(group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts={num_experts} does not split over an expert-parallel group of "
                             f"{self.ep} ranks; choose --expert-parallel dividing {num_experts}")
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchPlan]:
        E, P, e = self.num_experts, self.ep, self.num_local
        if decision.num_experts != E:
            raise ValueError(f"the decision routes over {decision.num_experts} experts; this dispatcher "
                             f"was built for {E}")
        T, K = decision.expert_ids_TK.shape
        ids_S = decision.expert_ids_TK.reshape(-1)
        key_S = torch.where(ids_S < 0, torch.full_like(ids_S, E), ids_S)  # -1 sorts last, cut off
        order_S = torch.sort(key_S, stable=True).indices
        send_counts_E = torch.bincount(key_S, minlength=E + 1)[:E]
        # recv_counts_Pe[p, j]: rows source rank p sends to my local expert j.
        recv_counts_Pe = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts_Pe, send_counts_E, group=self.group)
        recv_counts_Pe = recv_counts_Pe.view(P, e)
        # The layer's one host sync: split sizes of the collectives must be Python ints.
        host = torch.cat([send_counts_E.view(P, e).sum(1), recv_counts_Pe.sum(1)]).tolist()
        input_splits, output_splits = host[:P], host[P:]
        order_R = order_S[: sum(input_splits)]
        token_index_R = order_R // K
        x_send_RD = x_TD.index_select(0, token_index_R)
        x_recv_RD = all_to_all_single_autograd(x_send_RD, output_splits, input_splits, self.group)
        num_recv = sum(output_splits)
        perm_R = rank_to_expert_major(recv_counts_Pe, num_recv)
        inverse_R = torch.empty_like(perm_R).scatter_(
            0, perm_R, torch.arange(num_recv, device=perm_R.device))
        plan = DispatchPlan(
            token_index_R=token_index_R,
            weights_R=decision.weights_TK.reshape(-1)[order_R],
            num_tokens=T,
            extra={"inverse_R": inverse_R, "input_splits": input_splits, "output_splits": output_splits},
        )
        return x_recv_RD.index_select(0, perm_R), recv_counts_Pe.sum(0), plan

    def combine(self, y_RD: Tensor, plan: DispatchPlan) -> Tensor:
        """Rows back to their source ranks, then each token's weighted sum in fp32 (y's dtype out)."""
        extra = plan.extra
        y_rank_major_RD = y_RD.index_select(0, extra["inverse_R"])
        y_back_RD = all_to_all_single_autograd(
            y_rank_major_RD, extra["input_splits"], extra["output_splits"], self.group)
        y_back_RD = wait_tensor(y_back_RD)  # a plain tensor for the autograd.Function below
        return WeightedCombine.apply(y_back_RD, plan.weights_R, plan.token_index_R, plan.num_tokens)
