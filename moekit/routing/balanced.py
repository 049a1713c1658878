"""Balanced assignment routing with Sinkhorn iterations (Megatron-LM's sinkhorn router).

BASE layers (Lewis et al. 2021) solve a balanced linear assignment of tokens to experts in training;
Sinkhorn normalisation (Clark et al. 2022; Megatron-LM) approximates it: alternately normalise the
rows (tokens) and columns (experts) of exp(logits), then let each token take its top-k experts of the
balanced matrix. The combine weights come from the plain router scores; evaluation uses plain top-k.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.routing.base import LinearGateRouter, counts_from_ids
from moekit.routing.topk import balance_probs, chosen_weights, expert_scores, stable_topk
from moekit.types import RoutingDecision


@torch.no_grad()
def sinkhorn_log(logits_TE: Tensor, *, iters: int, mask_T: Tensor | None = None) -> Tensor:
    """Log of the Sinkhorn-balanced matrix, up to a constant per row (fp32 (T, E), no gradient).

    Megatron-LM's `sinkhorn` computes d1 * exp(logits) * d0 with d0 (rows) and d1 (columns)
    normalised in turn; in log space each half-step subtracts a logsumexp (no overflow in exp).
    Padded rows (mask False) do not take part in the column sums. Each iteration ends with the
    column step, so the per-row ranking (all the router needs) reflects the balanced columns.
    """
    log_P_TE = logits_TE.float()
    keep_T1 = None if mask_T is None else mask_T.reshape(-1, 1).bool()
    for _ in range(iters):
        log_P_TE = log_P_TE - torch.logsumexp(log_P_TE, dim=1, keepdim=True)  # rows sum to 1
        col_TE = log_P_TE if keep_T1 is None else log_P_TE.masked_fill(~keep_T1, float("-inf"))
        log_P_TE = log_P_TE - torch.logsumexp(col_TE, dim=0, keepdim=True)  # columns sum to 1
    return log_P_TE


def sinkhorn_route(
    logits_TE: Tensor,
    *,
    top_k: int,
    iters: int,
    balanced: bool,
    score_func: str = "softmax",
    normalize_topk: bool = True,
    routed_scaling_factor: float = 1.0,
    mask_T: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k experts of the Sinkhorn-balanced matrix (`balanced`, training) or of the plain scores.

    Args:
        logits_TE: router logits (any float dtype; computed in fp32).
        balanced: select by the balanced matrix; the selection itself has no gradient.
        score_func / normalize_topk / routed_scaling_factor: combine weights as in `topk_route`,
            from the plain scores of the selected experts (sigmoid is Megatron's choice for k = 1).
    Returns:
        expert_ids_TK (long), weights_TK (fp32), probs_TE (fp32 scores for the balance loss).
    Ties go to the lower expert id.
    """
    logits_TE = logits_TE.float()
    scores_TE = expert_scores(logits_TE, score_func)
    select_TE = sinkhorn_log(logits_TE, iters=iters, mask_T=mask_T) if balanced else scores_TE.detach()
    _, ids_TK = stable_topk(select_TE, top_k)
    weights_TK = chosen_weights(logits_TE, scores_TE, ids_TK, normalize_topk=normalize_topk,
                                routed_scaling_factor=routed_scaling_factor)
    return ids_TK, weights_TK, balance_probs(scores_TE, score_func)


class SinkhornRouter(LinearGateRouter):
    """Linear gate + `sinkhorn_route`: balanced selection in training, plain top-k in eval.

    With top_k = 1 and normalize_topk = True every weight is exactly 1 and the gate gets no
    gradient; use score_func="sigmoid" with normalize_topk=False as Megatron-LM does.
    """

    def route(
        self, x_TD: Tensor, *, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None
    ) -> RoutingDecision:
        cfg = self.config
        logits_TE = self.logits(x_TD)
        ids_TK, weights_TK, probs_TE = sinkhorn_route(
            logits_TE,
            top_k=cfg.top_k,
            iters=cfg.sinkhorn_iters,
            balanced=self.training,
            score_func=cfg.score_func,
            normalize_topk=cfg.normalize_topk,
            routed_scaling_factor=cfg.routed_scaling_factor,
            mask_T=mask_T,
        )
        return RoutingDecision(ids_TK, weights_TK, logits_TE, probs_TE,
                               counts_from_ids(ids_TK, cfg.num_experts))

    def weights_for(self, x_TD: Tensor, expert_ids_TK: Tensor) -> RoutingDecision:
        """Replay: the recorded experts, weights from the current scores (as in `sinkhorn_route`)."""
        cfg = self.config
        logits_TE = self.logits(x_TD)
        scores_TE = expert_scores(logits_TE, cfg.score_func)
        weights_TK = chosen_weights(logits_TE, scores_TE, expert_ids_TK, normalize_topk=cfg.normalize_topk,
                                    routed_scaling_factor=cfg.routed_scaling_factor)
        return RoutingDecision(expert_ids_TK, weights_TK, logits_TE, balance_probs(scores_TE, cfg.score_func),
                               counts_from_ids(expert_ids_TK, cfg.num_experts))
