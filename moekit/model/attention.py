"""Multi-head and grouped-query attention with RoPE, and the masked softmax core every variant shares.

Options (one ModelConfig field each): q/k/v/o biases, QK-norm per head (Qwen3; Hunyuan after
RoPE) or over the full projection (OLMoE) or parameter-free L2 (Llama 4), QKV clipping (DBRX),
sliding window, attention sinks (gpt-oss), logit soft-capping (Grok-1), cross-layer KV sharing
(Hunyuan-Large CLA). Submodule names follow transformers (q_proj, k_proj, v_proj, o_proj, q_norm,
k_norm, sinks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.kernels import cpu as cpu_kernels
from moekit.model.cache import KVCache
from moekit.model.config import ModelConfig
from moekit.model.linear import project, project_many
from moekit.model.norm import RMSNorm, l2_norm
from moekit.model.rope import apply_rope


def additive_mask(
    q_pos_S: Tensor,
    k_pos_T: Tensor,
    *,
    window: int | None,
    key_mask_BT: Tensor | None,
    dtype: torch.dtype,
    chunk: int | None = None,
) -> Tensor:
    """(B or 1, 1, S, T) float mask: 0 where query i may see key j, the dtype's minimum elsewhere.

    q_pos_S is (S,), or (B, S) when each row has its own positions (a `RowCache`).

    Causal (j <= i); with a window, also j > i - window (transformers' sliding_window_overlay);
    with a chunk, also j // chunk == i // chunk (Llama 4's chunked attention); padding keys
    (key_mask False) are hidden. A finite minimum, not -inf, keeps rows with no
    visible key (padding queries) free of NaN, as transformers does.
    """
    q_pos = q_pos_S[..., None]  # (S, 1), or (B, S, 1) for per-row positions
    allowed_ST = k_pos_T <= q_pos
    if window is not None:
        allowed_ST = allowed_ST & (k_pos_T > q_pos - window)
    if chunk is not None:
        allowed_ST = allowed_ST & (k_pos_T // chunk == q_pos // chunk)
    allowed = allowed_ST[None, None] if q_pos_S.dim() == 1 else allowed_ST[:, None]
    if key_mask_BT is not None:
        allowed = allowed & key_mask_BT[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=q_pos_S.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def attend(
    q_BHSd: Tensor,
    k_BKTd: Tensor,
    v_BKTe: Tensor,
    mask_B1ST: Tensor,
    *,
    scale: float,
    softcap: float | None = None,
    sinks_H: Tensor | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v with K <= H key/value heads (GQA). Returns (B, H, S, e).

    Each group of H / K query heads shares one key/value head (head h uses kv head h // (H/K)).
    Soft-capping (Grok-1): c * tanh(logits / c) before the mask. Sinks (gpt-oss): one learned
    logit per head joins the softmax and is dropped after it, so rows may sum to less than one.
    The softmax runs in fp32 (transformers' eager attention).
    """
    H, K = q_BHSd.shape[1], k_BKTd.shape[1]
    if q_BHSd.shape[2] == 1 and softcap is None and sinks_H is None and not torch.is_grad_enabled():
        if _kernel_attends(q_BHSd, k_BKTd, v_BKTe, mask_B1ST):  # one call, no copies
            return cpu_kernels.attend_one(q_BHSd, k_BKTd, v_BKTe, mask_B1ST, scale)
        if q_BHSd.shape[0] == 1:
            return attend_one(q_BHSd, k_BKTd, v_BKTe, mask_B1ST, scale=scale)
    if K != H:
        k_BKTd = k_BKTd.repeat_interleave(H // K, dim=1)
        v_BKTe = v_BKTe.repeat_interleave(H // K, dim=1)
    if softcap is None and sinks_H is None:
        return F.scaled_dot_product_attention(q_BHSd, k_BKTd, v_BKTe, attn_mask=mask_B1ST, scale=scale)
    logits_BHST = (q_BHSd @ k_BKTd.transpose(-1, -2)) * scale
    if softcap is not None:
        logits_BHST = softcap * torch.tanh(logits_BHST / softcap)
    logits_BHST = logits_BHST + mask_B1ST
    if sinks_H is not None:
        B, _, S, _ = logits_BHST.shape
        sink_BHS1 = sinks_H.to(logits_BHST.dtype).reshape(1, H, 1, 1).expand(B, H, S, 1)
        logits_BHST = torch.cat((logits_BHST, sink_BHS1), dim=-1)
        logits_BHST = logits_BHST - logits_BHST.amax(-1, keepdim=True)
        probs_BHST = logits_BHST.float().softmax(-1)[..., :-1]
    else:
        probs_BHST = logits_BHST.float().softmax(-1)
    return probs_BHST.to(v_BKTe.dtype) @ v_BKTe


def _kernel_attends(q_BH1d: Tensor, k_BKTd: Tensor, v_BKTe: Tensor, mask_B11T: Tensor) -> bool:
    return (k_BKTd.stride(-1) == 1 and v_BKTe.stride(-1) == 1 and mask_B11T.shape[0] in (1, q_BH1d.shape[0])
            and cpu_kernels.supports(q_BH1d, k_BKTd, v_BKTe))


def attend_one(q_BH1d: Tensor, k_BKTd: Tensor, v_BKTe: Tensor, mask_B11T: Tensor, *, scale: float) -> Tensor:
    """`attend` for one query per sequence (a decode step), without gradients. The CPU kernel where
    it runs: one call for every sequence and head, reading the strided cache rows in place (a batch
    of 16 on the benchmark model: 0.6 ms per layer in the fused SDPA kernel, a few tens of us here).
    Otherwise small batched products in fp32 (instead of the fused kernel, whose fixed cost
    dominates at one query, and of bf16 products, slow on CPUs without native bf16); `attend`
    sends a batch there only with the kernel, since these products would copy strided rows. The
    query heads of a group share their K/V head through a reshape, not a copy. Returns (B, H, 1, e)
    in q's dtype."""
    B, H, _, d = q_BH1d.shape
    K = k_BKTd.shape[1]
    if _kernel_attends(q_BH1d, k_BKTd, v_BKTe, mask_B11T):
        return cpu_kernels.attend_one(q_BH1d, k_BKTd, v_BKTe, mask_B11T, scale)  # one call, no copies
    dtype = q_BH1d.dtype
    q_BKGd = q_BH1d.float().view(B, K, H // K, d)  # G = H / K query heads per K/V head
    logits_BKGT = torch.matmul(q_BKGd, k_BKTd.float().transpose(-1, -2)) * scale
    logits_BKGT = logits_BKGT + mask_B11T.float()  # (B|1, 1, 1, T) broadcasts over K and G
    out_BKGe = torch.matmul(logits_BKGT.softmax(-1), v_BKTe.float())
    return out_BKGe.view(B, H, 1, -1).to(dtype)


class Attention(nn.Module):
    """MHA / GQA over the keys of this layer (or, with KV sharing, of an earlier layer).

    Forward: x (B, S, D), cos/sin (S, R) or None (NoPE), the additive mask (B|1, 1, S, T), the
    cache and the K/V of the source layer when this layer shares it. Returns (y (B, S, D), (k, v)).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        D, H, K, hd = config.d_model, config.n_heads, config.kv_heads, config.dim_head
        self.owns_kv = config.kv_source(layer_idx) == layer_idx
        self.q_proj = nn.Linear(D, H * hd, bias=config.qkv_bias)
        if self.owns_kv:
            self.k_proj = nn.Linear(D, K * hd, bias=config.qkv_bias)
            self.v_proj = nn.Linear(D, K * hd, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=config.o_bias)
        if config.qk_norm in ("head", "head_after_rope"):
            self.q_norm = RMSNorm(hd, config.norm_eps)
            self.k_norm = RMSNorm(hd, config.norm_eps)
        elif config.qk_norm == "full":
            self.q_norm = RMSNorm(H * hd, config.norm_eps)
            self.k_norm = RMSNorm(K * hd, config.norm_eps)
        self.sinks = nn.Parameter(torch.zeros(H)) if config.attn_sinks else None
        self.scale = config.attn_scale if config.attn_scale is not None else hd**-0.5
        self.interleaved = config.rope is not None and config.rope.interleaved
        # Sliding-window layers need at most window - 1 past keys later (none if others share them).
        window = config.layer_window(layer_idx)
        self.cache_keep = window - 1 if window is not None and config.kv_share_every == 1 else None

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
        B, S, _ = x_BSD.shape
        H, K, hd = cfg.n_heads, cfg.kv_heads, cfg.dim_head
        if self.owns_kv:
            q, k, v = project_many([self.q_proj, self.k_proj, self.v_proj], x_BSD)
        else:
            q = project(self.q_proj, x_BSD)
        if cfg.qk_norm == "full":
            q = self.q_norm(q)  # OLMoE: RMSNorm over all heads at once, before the head split
        if cfg.clip_qkv is not None:
            q = q.clamp(-cfg.clip_qkv, cfg.clip_qkv)
        q_BHSd = q.view(B, S, H, hd).transpose(1, 2)
        if cfg.qk_norm == "head":
            q_BHSd = self.q_norm(q_BHSd)
        if cos_sin is not None:
            q_BHSd = apply_rope(q_BHSd, *cos_sin, interleaved=self.interleaved)
            if cfg.qk_norm == "l2":
                q_BHSd = l2_norm(q_BHSd, cfg.norm_eps)  # Llama 4: L2 norm after RoPE, RoPE layers only
        if cfg.qk_norm == "head_after_rope":
            q_BHSd = self.q_norm(q_BHSd)  # Hunyuan: per-head RMSNorm after RoPE

        if self.owns_kv:
            if cfg.qk_norm == "full":
                k = self.k_norm(k)
            if cfg.clip_qkv is not None:
                k, v = k.clamp(-cfg.clip_qkv, cfg.clip_qkv), v.clamp(-cfg.clip_qkv, cfg.clip_qkv)
            k_BKSd = k.view(B, S, K, hd).transpose(1, 2)
            v_BKSd = v.view(B, S, K, hd).transpose(1, 2)
            if cfg.qk_norm == "head":
                k_BKSd = self.k_norm(k_BKSd)
            if cos_sin is not None:
                k_BKSd = apply_rope(k_BKSd, *cos_sin, interleaved=self.interleaved)
                if cfg.qk_norm == "l2":
                    k_BKSd = l2_norm(k_BKSd, cfg.norm_eps)
            if cfg.qk_norm == "head_after_rope":
                k_BKSd = self.k_norm(k_BKSd)
            if cache is not None:
                k_BKSd, v_BKSd = cache.append(self.layer_idx, k_BKSd, v_BKSd, dim=2, keep=self.cache_keep)
        else:
            if shared_kv is None:
                raise ValueError(f"layer {self.layer_idx} shares K/V with layer "
                                 f"{cfg.kv_source(self.layer_idx)} but none was passed")
            k_BKSd, v_BKSd = shared_kv
        # A trimmed (sliding-window) cache holds the last keys only: use the mask's matching columns.
        mask_B1ST = mask_B1ST[..., -k_BKSd.shape[2]:]
        out_BHSd = attend(q_BHSd, k_BKSd, v_BKSd, mask_B1ST, scale=self.scale,
                          softcap=cfg.attn_logit_softcap, sinks_H=self.sinks)
        y_BSD = project(self.o_proj, out_BHSd.transpose(1, 2).reshape(B, S, H * hd))
        return y_BSD, (k_BKSd, v_BKSd)
