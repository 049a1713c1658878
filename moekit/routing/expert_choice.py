"""Expert-choice routing (Zhou et al. 2022): every expert picks its top-C tokens.

Each expert takes exactly C = ceil(T * top_k / E) tokens, so the load is perfectly balanced and a
token may go to zero, one or many experts. Expert choice ranks tokens across the whole batch, so a
token's routing depends on later tokens: it is not causal (fine for training and encoders; at
generation time a single token is taken by every expert, since C >= 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.routing.base import LinearGateRouter, counts_from_ids
from moekit.types import RoutingDecision


def expert_choice_capacity(num_tokens: int, top_k: int, num_experts: int) -> int:
    """C = ceil(T * c / E), the paper's eq. 1 with capacity factor c = top_k; at most T."""
    return min(num_tokens, math.ceil(num_tokens * top_k / num_experts))


def expert_choice_route(
    logits_TE: Tensor, *, top_k: int, mask_T: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Each expert takes the C real tokens with the highest scores for it.

    Args:
        logits_TE: router logits (any float dtype; computed in fp32).
        top_k: the average number of experts per token (the paper's capacity factor c).
        mask_T: bool, True for real tokens; padded tokens are never chosen and do not count in T.
    Returns:
        expert_ids_TE (long): e where expert e chose token t, else -1 (K = E slots per token);
        weights_TE (fp32): the token's softmax score for e where chosen, else 0 (paper eq. 2, G);
        scores_TE (fp32): softmax over experts for every token (S in the paper).
    Ties between tokens go to the lower token index (a stable sort), on every device.
    """
    T, E = logits_TE.shape
    scores_TE = logits_TE.float().softmax(-1)
    rank_TE = scores_TE.detach()
    num_real = T
    if mask_T is not None:
        keep_T = mask_T.reshape(-1).bool()
        rank_TE = rank_TE.masked_fill(~keep_T[:, None], float("-inf"))
        num_real = int(keep_T.sum())
    capacity = expert_choice_capacity(num_real, top_k, E)
    # Per expert (column), tokens by descending score; stable, so equal scores keep token order.
    order_TE = torch.sort(rank_TE, dim=0, descending=True, stable=True).indices
    chosen_TE = torch.zeros_like(rank_TE, dtype=torch.bool)
    chosen_TE.scatter_(0, order_TE[:capacity], True)
    experts_TE = torch.arange(E, device=logits_TE.device).expand(T, E)
    ids_TE = torch.where(chosen_TE, experts_TE, -1)
    weights_TE = scores_TE * chosen_TE
    return ids_TE, weights_TE, scores_TE


class ExpertChoiceRouter(LinearGateRouter):
    """Linear gate + `expert_choice_route`; fills a RoutingDecision with K = E slots per token.

    `expert_ids_TK[t, e]` is e if expert e chose token t and -1 otherwise; `weights_TK[t, e]` is the
    gating score there. `counts_E` is C for every expert (fewer only if there are fewer real tokens).
    """

    def route(
        self, x_TD: Tensor, *, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None
    ) -> RoutingDecision:
        logits_TE = self.logits(x_TD)
        ids_TE, weights_TE, scores_TE = expert_choice_route(
            logits_TE, top_k=self.config.top_k, mask_T=mask_T
        )
        return RoutingDecision(ids_TE, weights_TE, logits_TE, scores_TE,
                               counts_from_ids(ids_TE, self.config.num_experts))

    def weights_for(self, x_TD: Tensor, expert_ids_TK: Tensor) -> RoutingDecision:
        """Replay: the recorded (T, E) choice, weights = current softmax scores where chosen."""
        E = self.config.num_experts
        if expert_ids_TK.dim() != 2 or expert_ids_TK.shape[1] != E:
            raise ValueError(
                f"expert-choice replay needs a decision with K = num_experts = {E} slots per token "
                f"(as expert_choice records it); got expert ids of shape {tuple(expert_ids_TK.shape)}"
            )
        logits_TE = self.logits(x_TD)
        scores_TE = logits_TE.softmax(-1)
        weights_TE = scores_TE.gather(1, expert_ids_TK.clamp_min(0)) * (expert_ids_TK >= 0)
        return RoutingDecision(expert_ids_TK, weights_TE, logits_TE, scores_TE,
                               counts_from_ids(expert_ids_TK, E))
