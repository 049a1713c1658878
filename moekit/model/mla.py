"""Multi-head latent attention (DeepSeek-V2 sec. 2.1; DeepSeek-V3, Kimi K2).

Keys and values are rebuilt from a shared low-rank latent c_kv (kv_lora_rank wide) plus one
decoupled RoPE key shared by all heads; the cache holds only (c_kv, k_rope), which is MLA's point.
Queries come from a plain projection or a low-rank pair (q_lora_rank). Names follow transformers'
DeepseekV3Attention (q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.model.attention import attend
from moekit.model.cache import KVCache
from moekit.model.config import ModelConfig
from moekit.model.linear import project
from moekit.model.norm import RMSNorm
from moekit.model.rope import apply_rope, softmax_scale_factor

# transformers builds the latent RMSNorms with their default eps, whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """Latent attention. Forward as `Attention`; returns (y (B, S, D), (latent_BTc, k_rope_BTr))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        assert config.mla is not None
        m = config.mla
        self.config, self.layer_idx = config, layer_idx
        D, H = config.d_model, config.n_heads
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, m.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * m.v_head_dim, D, bias=False)
        # YaRN with mscale_all_dim also sharpens the softmax (DeepSeek-V2/V3 configs).
        self.scale = (config.attn_scale if config.attn_scale is not None else m.qk_head_dim**-0.5) \
            * softmax_scale_factor(config.rope)

    def forward(
        self,
        x_BSD: Tensor,
        *,
        cos_sin: tuple[Tensor, Tensor] | None,
        mask_B1ST: Tensor,
        cache: KVCache | None = None,
        shared_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        cfg = self.config
        m = cfg.mla
        assert m is not None
        B, S, _ = x_BSD.shape
        H, nope, rope_d, vd = cfg.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        if m.q_lora_rank is None:
            q = project(self.q_proj, x_BSD)
        else:
            q = project(self.q_b_proj, self.q_a_layernorm(project(self.q_a_proj, x_BSD)))
        q_BHSq = q.view(B, S, H, nope + rope_d).transpose(1, 2)
        q_nope_BHSn, q_rot_BHSr = q_BHSq.split([nope, rope_d], dim=-1)

        latent_BSc, k_rot_BSr = project(self.kv_a_proj_with_mqa, x_BSD).split([m.kv_lora_rank, rope_d],
                                                                             dim=-1)
        latent_BSc = self.kv_a_layernorm(latent_BSc)
        k_rot_B1Sr = k_rot_BSr[:, None]
        interleaved = cfg.rope.interleaved if cfg.rope is not None else False
        if cos_sin is not None:
            q_rot_BHSr = apply_rope(q_rot_BHSr, *cos_sin, interleaved=interleaved)
            k_rot_B1Sr = apply_rope(k_rot_B1Sr, *cos_sin, interleaved=interleaved)
        latent_BTc, k_rot_BTr = latent_BSc, k_rot_B1Sr[:, 0]
        if cache is not None:
            latent_BTc, k_rot_BTr = cache.append(self.layer_idx, latent_BSc, k_rot_B1Sr[:, 0], dim=1)
        T = latent_BTc.shape[1]

        kv_BHTx = project(self.kv_b_proj, latent_BTc).view(B, T, H, nope + vd).transpose(1, 2)
        k_nope_BHTn, v_BHTv = kv_BHTx.split([nope, vd], dim=-1)
        k_BHTq = torch.cat((k_nope_BHTn, k_rot_BTr[:, None].expand(B, H, T, rope_d)), dim=-1)
        q_BHSq = torch.cat((q_nope_BHSn, q_rot_BHSr), dim=-1)
        out_BHSv = attend(q_BHSq, k_BHTq, v_BHTv, mask_B1ST, scale=self.scale,
                          softcap=cfg.attn_logit_softcap)
        y_BSD = project(self.o_proj, out_BHSv.transpose(1, 2).reshape(B, S, H * vd))
        return y_BSD, (latent_BTc, k_rot_BTr)
