"""Token-choice top-k routing: every token picks its k best experts.

One router covers the token-choice family by configuration: softmax or sigmoid scores, softmax
before or after the top-k, renormalisation and a routed scaling factor (Mixtral, DBRX, Qwen-MoE,
OLMoE, DeepSeek-V2/V3), Switch (k=1), noisy top-k gating (Shazeer et al. 2017), Switch jitter,
group-limited selection (DeepSeek-V2/V3) and the aux-loss-free selection bias (DeepSeek-V3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.kernels import cpu as cpu_kernels
from moekit.losses import expert_bias_update
from moekit.routing.base import LinearGateRouter, counts_from_ids, gate_logits
from moekit.types import RoutingDecision


def stable_topk(scores_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k along the last dim with ties broken towards the lower index, on every device.

    `torch.topk` promises no order among equal values. Rather than a full stable sort (2-3x slower
    at E >= 64), fp32 scores become unique int64 keys: the float's bits mapped to an integer of the
    same order, shifted up, with (E - 1 - index) in the low bits; `topk` on the keys is then exact.
    """
    if k == 1:
        # argmax returns the first maximal index.
        ids_T1 = scores_TE.argmax(dim=-1, keepdim=True)
        return scores_TE.gather(-1, ids_T1), ids_T1
    E = scores_TE.shape[-1]
    if scores_TE.dtype == torch.float64 or E > _MAX_KEY_EXPERTS or scores_TE.numel() <= _SORT_MAX_SCORES:
        # (a decode step's few tokens: one sort costs less than the key's handful of small ops)
        values_TE, ids_TE = torch.sort(scores_TE, dim=-1, descending=True, stable=True)
        return values_TE[..., :k], ids_TE[..., :k]
    scores32_TE = scores_TE.float()
    scores32_TE = torch.where(scores32_TE == 0, 0.0, scores32_TE)  # -0.0 ties with +0.0, as in sort
    bits = scores32_TE.contiguous().view(torch.int32)
    # Two's-complement bits order negative floats backwards: flip their magnitude bits.
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    rank_E = (_MAX_KEY_EXPERTS - 1) - torch.arange(E, device=scores_TE.device)
    ids_TK = (ordered * _MAX_KEY_EXPERTS + rank_E).topk(k, dim=-1).indices
    return scores_TE.gather(-1, ids_TK), ids_TK


_MAX_KEY_EXPERTS = 1 << 16  # index bits of the int64 keys in stable_topk
_SORT_MAX_SCORES = 4096  # up to this many scores stable_topk sorts


def expert_scores(logits_TE: Tensor, score_func: str) -> Tensor:
    """Per-expert scores in fp32: softmax over experts, or independent sigmoids."""
    logits_TE = logits_TE.float()
    return logits_TE.softmax(-1) if score_func == "softmax" else logits_TE.sigmoid()


def balance_probs(scores_TE: Tensor, score_func: str) -> Tensor:
    """Scores the balance loss uses: softmax as is; sigmoid normalised per token (DeepSeek-V3 eq. 18)."""
    return scores_TE if score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)


def chosen_weights(
    logits_TE: Tensor,
    scores_TE: Tensor,
    expert_ids_TK: Tensor,
    *,
    softmax_after_topk: bool = False,
    normalize_topk: bool = True,
    routed_scaling_factor: float = 1.0,
) -> Tensor:
    """Combine weights (fp32) of the chosen experts; slots with id -1 get weight 0.

    softmax_after_topk: softmax over the chosen logits only (Mixtral); otherwise the chosen scores,
    renormalised to sum to 1 when `normalize_topk`. Then times `routed_scaling_factor`.
    """
    used_TK = expert_ids_TK >= 0
    safe_TK = expert_ids_TK.clamp_min(0)
    if softmax_after_topk:
        weights_TK = logits_TE.gather(1, safe_TK).masked_fill(~used_TK, float("-inf")).softmax(-1)
        weights_TK = weights_TK.nan_to_num(0.0)  # a token with no slot at all
    else:
        weights_TK = scores_TE.gather(1, safe_TK) * used_TK
        if normalize_topk:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return weights_TK * routed_scaling_factor


def group_limited_mask(
    scores_TE: Tensor, *, num_groups: int, topk_groups: int, group_score: str
) -> Tensor:
    """Boolean (T, E) mask of experts in each token's best `topk_groups` groups.

    A group is scored by its best expert ("max", DeepSeek-V2) or its best two ("top2_sum",
    DeepSeek-V3); ties between groups go to the lower group id.
    """
    T, E = scores_TE.shape
    grouped_TGe = scores_TE.view(T, num_groups, E // num_groups)
    if group_score == "max":
        group_TG = grouped_TGe.amax(-1)
    else:
        group_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)
    _, keep_Tg = stable_topk(group_TG, topk_groups)
    keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, keep_Tg, True)
    return keep_TG.repeat_interleave(E // num_groups, dim=1)


def group_limited(num_groups: int | None, topk_groups: int | None) -> bool:
    """True when selection is limited to each token's best `topk_groups` of `num_groups` groups."""
    return num_groups is not None and topk_groups is not None and topk_groups < num_groups


def topk_route(
    logits_TE: Tensor,
    *,
    top_k: int,
    score_func: str = "softmax",
    softmax_after_topk: bool = False,
    normalize_topk: bool = True,
    routed_scaling_factor: float = 1.0,
    selection_bias_E: Tensor | None = None,
    num_groups: int | None = None,
    topk_groups: int | None = None,
    group_score: str = "max",
) -> tuple[Tensor, Tensor, Tensor]:
    """Pick each token's top-k experts and their combine weights.

    Args:
        logits_TE: router logits (any float dtype; computed in fp32).
        selection_bias_E: added to the scores for selection only (aux-loss-free balancing); the
            combine weights come from the unbiased scores.
    Returns:
        expert_ids_TK (long), weights_TK (fp32), probs_TE (fp32 scores for the balance loss:
        softmax, or the sigmoid scores normalised per token as in DeepSeek-V3 eq. 18).
    """
    logits_TE = logits_TE.float()
    scores_TE = expert_scores(logits_TE, score_func)
    select_TE = scores_TE if selection_bias_E is None else scores_TE + selection_bias_E.float()
    if group_limited(num_groups, topk_groups):
        keep_TE = group_limited_mask(
            select_TE, num_groups=num_groups, topk_groups=topk_groups, group_score=group_score
        )
        select_TE = select_TE.masked_fill(~keep_TE, float("-inf"))
    _, ids_TK = stable_topk(select_TE, top_k)
    weights_TK = chosen_weights(logits_TE, scores_TE, ids_TK, softmax_after_topk=softmax_after_topk,
                                normalize_topk=normalize_topk, routed_scaling_factor=routed_scaling_factor)
    return ids_TK, weights_TK, balance_probs(scores_TE, score_func)


# Tokens up to which, without autograd and out of training, routing runs as one CPU kernel call.
KERNEL_MAX_TOKENS = 16


class TopKRouter(LinearGateRouter):
    """Linear gate + `topk_route`. Holds the gate, the optional noise gate and selection bias."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__(config)
        D, E = config.d_model, config.num_experts
        self.noise_gate = nn.Linear(D, E, bias=False) if config.noisy_gating else None
        if config.noisy_gating:
            nn.init.zeros_(self.noise_gate.weight)  # type: ignore[union-attr]
        # Aux-loss-free balancing bias: a buffer (no gradient), saved with the model.
        self.register_buffer(
            "expert_bias", torch.zeros(E, dtype=torch.float32) if config.expert_bias else None
        )

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits in fp32, with jitter and noise in training mode only."""
        cfg = self.config
        if self.training and cfg.jitter_eps > 0:
            # Switch Transformer: multiplicative jitter on the router input.
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - cfg.jitter_eps, 1 + cfg.jitter_eps)
        logits_TE = gate_logits(self.gate, x_TD)
        if self.training and self.noise_gate is not None:
            # Shazeer et al. 2017 eq. 4: H(x) = x W_g + N(0,1) * softplus(x W_noise).
            noise_std_TE = F.softplus(F.linear(x_TD.float(), self.noise_gate.weight.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        return logits_TE

    def route(
        self, x_TD: Tensor, *, token_ids_T: Tensor | None = None, mask_T: Tensor | None = None
    ) -> RoutingDecision:
        cfg = self.config
        if (not self.training and x_TD.shape[0] <= KERNEL_MAX_TOKENS and x_TD.dim() == 2
                and not group_limited(cfg.num_groups, cfg.topk_groups)
                and self.gate.weight.is_contiguous() and cpu_kernels.supports(x_TD, self.gate.weight)):
            # a decode step's few tokens: the whole of `topk_route` in one kernel call
            ids_TK, weights_TK, logits_TE, probs_TE, counts_E = cpu_kernels.topk_route(
                x_TD, self.gate.weight, self.gate.bias, top_k=cfg.top_k, score_func=cfg.score_func,
                softmax_after_topk=cfg.softmax_after_topk, normalize_topk=cfg.normalize_topk,
                routed_scaling_factor=cfg.routed_scaling_factor, selection_bias_E=self.expert_bias)
            return RoutingDecision(ids_TK, weights_TK, logits_TE, probs_TE, counts_E)
        logits_TE = self.logits(x_TD)
        ids_TK, weights_TK, probs_TE = topk_route(
            logits_TE,
            top_k=cfg.top_k,
            score_func=cfg.score_func,
            softmax_after_topk=cfg.softmax_after_topk,
            normalize_topk=cfg.normalize_topk,
            routed_scaling_factor=cfg.routed_scaling_factor,
            selection_bias_E=self.expert_bias,
            num_groups=cfg.num_groups,
            topk_groups=cfg.topk_groups,
            group_score=cfg.group_score,
        )
        return RoutingDecision(ids_TK, weights_TK, logits_TE, probs_TE,
                               counts_from_ids(ids_TK, cfg.num_experts))

    def weights_for(self, x_TD: Tensor, expert_ids_TK: Tensor) -> RoutingDecision:
        cfg = self.config
        logits_TE = self.logits(x_TD)
        scores_TE = expert_scores(logits_TE, cfg.score_func)
        weights_TK = chosen_weights(logits_TE, scores_TE, expert_ids_TK,
                                    softmax_after_topk=cfg.softmax_after_topk,
                                    normalize_topk=cfg.normalize_topk,
                                    routed_scaling_factor=cfg.routed_scaling_factor)
        return RoutingDecision(expert_ids_TK, weights_TK, logits_TE, balance_probs(scores_TE, cfg.score_func),
                               counts_from_ids(expert_ids_TK, cfg.num_experts))

    @torch.no_grad()
    def update_bias(self, counts_E: Tensor, scale: float = 1.0) -> None:
        """Aux-loss-free update (DeepSeek-V3 sec. 2.1.2): b_i += rate * sign(mean load - load_i), with
        rate = scale x bias_update_rate."""
        if self.expert_bias is None:
            raise ValueError("update_bias needs a router built with expert_bias=True")
        self.expert_bias.copy_(
            expert_bias_update(self.expert_bias, counts_E, rate=self.config.bias_update_rate * scale)
        )
