"""olmoe: OLMoE, softmax top-k (not renormalised by default), full-width QK-norm, clip_qkv."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.configs import act, common, common_to_hf, moe_of, rope_from_hf
from moekit.hf.family import Family, qwen_rules
from moekit.model.config import ModelConfig


def to_moekit(hf: dict) -> ModelConfig:
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], num_experts=hf["num_experts"],
                    top_k=hf.get("num_experts_per_tok", 8), normalize_topk=hf.get("norm_topk_prob", False),
                    activation=act(hf, "olmoe"), load_balance_coef=hf.get("router_aux_loss_coef", 0.01))
    bias = hf.get("attention_bias", False)
    return ModelConfig(**common(hf), d_ff=hf["intermediate_size"], moe=moe, qkv_bias=bias,
                       o_bias=bias, qk_norm="full", clip_qkv=hf.get("clip_qkv"), rope=rope_from_hf(hf))


def to_hf(cfg: ModelConfig) -> dict:
    moe = moe_of(cfg)
    return dict(common_to_hf(cfg), intermediate_size=moe.d_ff, num_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, norm_topk_prob=moe.normalize_topk,
                router_aux_loss_coef=moe.load_balance_coef, attention_bias=cfg.qkv_bias,
                clip_qkv=cfg.clip_qkv)


FAMILY = Family("olmoe", "OlmoeForCausalLM", to_moekit, to_hf, **qwen_rules())
