"""Mixture of attention heads (MoA; Zhang et al. 2022, as JetMoE uses it), built from MoELayer's parts.

Each token's router picks top_k of E attention experts; expert e owns a query projection
w_q_EDA[e] (D -> A = n_kv_heads * head_dim) and an output projection w_o_EAD[e]. All experts share
one K/V projection, so a token has top_k * n_kv_heads query heads over n_kv_heads K/V heads (slot
j's head h reads K/V head h). As in MoELayer, the router's decision is sorted by expert
(`SortDispatcher`), both projections run as one grouped GEMM each, and `combine` applies the
routing weights in fp32; the loads, aux losses and bias updates are those of `RoutedLayer`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from moekit.dispatch.sort import SortDispatcher
from moekit.experts.grouped import grouped_matmul
from moekit.layer import RoutedLayer
from moekit.model.attention import attend
from moekit.model.cache import KVCache
from moekit.model.config import ModelConfig
from moekit.model.linear import project
from moekit.model.rope import apply_rope
from moekit.types import RoutingDecision


class MixtureOfAttention(RoutedLayer):
    """JetMoE's MoA. `config` is the router's MoEConfig (ModelConfig.moa); `model_config` the model's.

    Forward as `Attention`, returning (y_BSD, (K, V), decision, aux losses by name).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        assert config.moa is not None
        super().__init__(config.moa)
        self.model_config, self.layer_idx = config, layer_idx
        D, E, A = config.d_model, config.moa.num_experts, config.kv_heads * config.dim_head
        self.dispatcher = SortDispatcher()
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
        mask_BS: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor], RoutingDecision, dict[str, Tensor]]:
        cfg = self.model_config
        B, S, D = x_BSD.shape
        K, hd, k = cfg.kv_heads, cfg.dim_head, self.config.top_k
        A = K * hd
        x_TD = x_BSD.reshape(-1, D)
        T = x_TD.shape[0]
        mask_T = None if mask_BS is None else mask_BS.reshape(-1)
        decision = self.router(x_TD, mask_T=mask_T)

        # Queries: rows sorted by expert, one grouped GEMM; slot j of token t lands at row t*k + j
        # (slots routed nowhere, i.e. padding, stay zero).
        x_RD, counts_E, plan = self.dispatcher.dispatch(x_TD, decision)
        assert plan.slot_index_R is not None
        q_RA = grouped_matmul(x_RD, self.w_q_EDA, counts_E)
        q_TKA = x_TD.new_zeros(T * k, A).index_copy(0, plan.slot_index_R, q_RA).view(T, k, A)
        q_BHSd = q_TKA.view(B, S, k * K, hd).transpose(1, 2)
        k_BSA, v_BSA = project(self.kv_proj, x_BSD).chunk(2, dim=-1)
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
        out_RA = out_BHSd.transpose(1, 2).reshape(T * k, A).index_select(0, plan.slot_index_R)
        y_TD = self.dispatcher.combine(grouped_matmul(out_RA, self.w_o_EAD, counts_E), plan)
        y_BSD = (y_TD + self.bias).view(B, S, D)
        self.count_loads(decision)
        return y_BSD, (k_BKSd, v_BKSd), decision, self.aux_losses(decision, mask_T, B)
