"""granitemoe: Granite MoE, top-k of the logits then a softmax over the k selected, with Granite's
embedding, residual, attention and logits multipliers."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.configs import act, common, common_to_hf, moe_of, rope_from_hf
from moekit.hf.family import L, MOE, Family, fused_experts
from moekit.hf.rules import Fused, Rename
from moekit.model.config import ModelConfig

_SPLIT = (
    Rename(L + "block_sparse_moe.router.layer.weight", MOE + "router.gate.weight"),
    Fused(L + "block_sparse_moe.input_linear.weight", (MOE + "experts.w_gate_EDF", MOE + "experts.w_up_EDF"),
          dim=1, transpose=True),
    Rename(L + "block_sparse_moe.output_linear.weight", MOE + "experts.w_down_EFD", transpose=True),
)
_FUSED = (
    Rename(L + "block_sparse_moe.router.weight", MOE + "router.gate.weight"),
    *fused_experts(L + "block_sparse_moe.experts.gate_up_proj", L + "block_sparse_moe.experts.down_proj"),
)


def to_moekit(hf: dict) -> ModelConfig:
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                    num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 2),
                    softmax_after_topk=True, activation=act(hf, "granitemoe"),
                    load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    bias = hf.get("attention_bias", False)
    return ModelConfig(**common(hf), d_ff=hf["intermediate_size"], moe=moe, qkv_bias=bias,
                       o_bias=bias, rope=rope_from_hf(hf), attn_scale=hf.get("attention_multiplier", 1.0),
                       embedding_multiplier=hf.get("embedding_multiplier", 1.0),
                       residual_multiplier=hf.get("residual_multiplier", 1.0),
                       logits_scaling=hf.get("logits_scaling", 1.0))


def to_hf(cfg: ModelConfig) -> dict:
    moe = moe_of(cfg)
    return dict(common_to_hf(cfg), intermediate_size=moe.d_ff, num_local_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_coef,
                attention_bias=cfg.qkv_bias, embedding_multiplier=cfg.embedding_multiplier,
                residual_multiplier=cfg.residual_multiplier, logits_scaling=cfg.logits_scaling,
                attention_multiplier=cfg.attn_scale if cfg.attn_scale is not None else cfg.dim_head**-0.5)


FAMILY = Family("granitemoe", "GraniteMoeForCausalLM", to_moekit, to_hf, split=_SPLIT, fused=_FUSED)
