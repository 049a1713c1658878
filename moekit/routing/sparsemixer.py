"""SparseMixer routing as Phi-3.5-MoE runs it at inference (Liu et al. 2024, GRIN); PhiMoE uses k=2.

Each of the k slots takes the best remaining expert; its weight is a softmax over only the experts
whose logit is within a relative distance 2 * eps of that expert's ((max - s_j) / max(|s_j|, max)
<= 2 eps), so a clear winner gets weight near 1. The training-time estimator of the paper (Gumbel
sampling, Heun's third-order gradient) is not reproduced: training uses this same forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.routing.base import Router, counts_from_ids
from moekit.types import RoutingDecision


def sparsemixer_weights(logits_TE: Tensor, ids_TK: Tensor, *, eps: float) -> Tensor:
    """Combine weights (T, K) of the experts `ids_TK`, chosen slot by slot in order (fp32)."""
    scores_TE = logits_TE.float()
    remaining_TE = scores_TE
    weights = []
    for k in range(ids_TK.shape[1]):
        idx_T1 = ids_TK[:, k:k + 1]
        top_T1 = remaining_TE.gather(-1, idx_T1)
        factor_TE = scores_TE.abs().clamp(min=top_T1)
        far_TE = (top_T1 - scores_TE) / factor_TE > 2 * eps
        gates_TE = remaining_TE.masked_fill(far_TE, float("-inf")).softmax(-1)
        weights.append(gates_TE.gather(-1, idx_T1))
        remaining_TE = remaining_TE.scatter(-1, idx_T1, float("-inf"))
    return torch.cat(weights, dim=-1)


def sparsemixer_route(logits_TE: Tensor, *, top_k: int = 2, eps: float = 0.01) -> tuple[Tensor, Tensor]:
    """Expert ids (T, K), best first, and their sparsemixer weights (T, K) fp32."""
    remaining_TE = logits_TE.float()
    ids = []
    for _ in range(top_k):
        idx_T1 = remaining_TE.argmax(-1, keepdim=True)  # first maximal index on ties
        ids.append(idx_T1)
        remaining_TE = remaining_TE.scatter(-1, idx_T1, float("-inf"))
    ids_TK = torch.cat(ids, dim=-1)
    return ids_TK, sparsemixer_weights(logits_TE, ids_TK, eps=eps)


class SparseMixerRouter(Router):
    """Linear gate (no bias) + `sparsemixer_route`; `jitter_eps` jitters the input in training."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        self.gate = nn.Linear(config.d_model, config.num_experts, bias=False)

    def logits(self, x_TD: Tensor) -> Tensor:
        cfg = self.config
        if self.training and cfg.jitter_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
        return F.linear(x_TD.float(), self.gate.weight.float())

    def _decision(self, logits_TE: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> RoutingDecision:
        return RoutingDecision(ids_TK, weights_TK, logits_TE, logits_TE.softmax(-1),
                               counts_from_ids(ids_TK, self.config.num_experts))

    def route(
        self, x_TD: Tensor, *, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None
    ) -> RoutingDecision:
        logits_TE = self.logits(x_TD)
        ids_TK, weights_TK = sparsemixer_route(logits_TE, top_k=self.config.top_k,
                                               eps=self.config.sparsemixer_eps)
        return self._decision(logits_TE, ids_TK, weights_TK)

    def weights_for(self, x_TD: Tensor, expert_ids_TK: Tensor) -> RoutingDecision:
        logits_TE = self.logits(x_TD)
        weights_TK = sparsemixer_weights(logits_TE, expert_ids_TK.clamp_min(0),
                                         eps=self.config.sparsemixer_eps)
        return self._decision(logits_TE, expert_ids_TK, weights_TK * (expert_ids_TK >= 0))
