"""Mixture of attention heads (MoA; Zhang et al. 2022, as JetMoE uses it).

Each token's router picks top_k of E attention experts; expert e owns a query projection
w_q_EDA[e] (D -> A = n_kv_heads * head_dim) and an output projection w_o_EAD[e]. All experts share
one K/V projection, so a token has top_k * n_kv_heads query heads over n_kv_heads K/V heads (slot
j's head h reads K/V head h). Outputs are weighted by the routing weights and summed, plus a bias.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit import losses
from moekit.model.attention import attend
from moekit.model.cache import KVCache
from moekit.model.config import ModelConfig
from moekit.model.rope import apply_rope
from moekit.routing.topk import TopKRouter


class MixtureOfAttention(nn.Module):
    """JetMoE's MoA. Forward as `Attention`, plus the weighted aux loss of its router (or None)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        assert config.moa is not None
        self.config, self.layer_idx = config, layer_idx
        moa = config.moa
        D, E, A = config.d_model, moa.num_experts, config.kv_heads * config.dim_head
        self.router = TopKRouter(moa)
        self.kv_proj = nn.Linear(D, 2 * A, bias=False)
        self.w_q_EDA = nn.Parameter(torch.empty(E, D, A))
        self.w_o_EAD = nn.Parameter(torch.empty(E, A, D))
        self.bias = nn.Parameter(torch.zeros(D))
        nn.init.normal_(self.w_q_EDA, std=1.0 / math.sqrt(D))
        nn.init.normal_(self.w_o_EAD, std=1.0 / math.sqrt(A))
        self.scale = config.attn_scale if config.attn_scale is not None else config.dim_head**-0.5

    def forward(
        self,
        x_BSD: Tensor,
        *,
        cos_sin: tuple[Tensor, Tensor] | None,
        mask_B1ST: Tensor,
        cache: KVCache | None = None,
        shared_kv: tuple[Tensor, Tensor] | None = None,
        mask_BS: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]:
        cfg = self.config
        assert cfg.moa is not None
        B, S, D = x_BSD.shape
        K, hd, k = cfg.kv_heads, cfg.dim_head, cfg.moa.top_k
        A = K * hd
        x_TD = x_BSD.reshape(-1, D)
        mask_T = None if mask_BS is None else mask_BS.reshape(-1)
        decision = self.router(x_TD, mask_T=mask_T)
        ids_TK, w_TK = decision.expert_ids_TK, decision.weights_TK

        # Queries: slot j of token t goes through expert ids_TK[t, j] (-1: padding, left at zero).
        q_TKA = x_TD.new_zeros(x_TD.shape[0], k, A)
        for e in range(cfg.moa.num_experts):
            t_idx, j_idx = (ids_TK == e).nonzero(as_tuple=True)
            if t_idx.numel():
                q_TKA[t_idx, j_idx] = x_TD[t_idx] @ self.w_q_EDA[e]
        q_BHSd = q_TKA.view(B, S, k * K, hd).transpose(1, 2)
        k_BSA, v_BSA = self.kv_proj(x_BSD).chunk(2, dim=-1)
        k_BKSd = k_BSA.view(B, S, K, hd).transpose(1, 2)
        v_BKSd = v_BSA.view(B, S, K, hd).transpose(1, 2)
        if cos_sin is not None:
            q_BHSd = apply_rope(q_BHSd, *cos_sin)
            k_BKSd = apply_rope(k_BKSd, *cos_sin)
        if cache is not None:
            k_BKSd, v_BKSd = cache.append(self.layer_idx, k_BKSd, v_BKSd, dim=2)
        # Slot-major heads: head j*K + h reads K/V head h (transformers' `repeat`, not repeat_interleave).
        out_BHSd = attend(q_BHSd, k_BKSd.repeat(1, k, 1, 1), v_BKSd.repeat(1, k, 1, 1), mask_B1ST,
                          scale=self.scale, softcap=cfg.attn_logit_softcap)
        out_TKA = out_BHSd.transpose(1, 2).reshape(B * S, k, A)

        y_TD = x_TD.new_zeros(x_TD.shape).float()
        for e in range(cfg.moa.num_experts):
            t_idx, j_idx = (ids_TK == e).nonzero(as_tuple=True)
            if t_idx.numel():
                y_rD = (out_TKA[t_idx, j_idx] @ self.w_o_EAD[e]).float() * w_TK[t_idx, j_idx, None]
                y_TD.index_add_(0, t_idx, y_rD)
        y_BSD = (y_TD.to(x_BSD.dtype) + self.bias).view(B, S, D)
        return y_BSD, (k_BKSd, v_BKSd), self.aux_loss(decision, mask_T, B)

    def aux_loss(self, decision, mask_T: Tensor | None, num_sequences: int) -> Tensor | None:
        """The router's balance and z losses times their coefficients (as MoELayer.aux_loss)."""
        moa = self.config.moa
        assert moa is not None
        total = None
        if moa.load_balance_coef > 0:
            total = moa.load_balance_coef * losses.load_balance_loss(
                probs_TE=decision.probs_TE, selected_TK=decision.selection_TK, mask_T=mask_T,
                num_sequences=num_sequences, granularity=moa.load_balance_granularity)
        if moa.z_loss_coef > 0:
            z = moa.z_loss_coef * losses.z_loss(logits_TE=decision.logits_TE, mask_T=mask_T)
            total = z if total is None else total + z
        return total
