"""qwen3_moe: Qwen3-MoE, softmax top-k with renormalised weights and per-head QK-norm."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.configs import act, common, no_sliding, rope_from_hf, sparse_layers
from moekit.hf.families.qwen2_moe import qwen_moe_to_hf
from moekit.hf.family import Family, qwen_rules
from moekit.model.config import ModelConfig


def to_moekit(hf: dict) -> ModelConfig:
    no_sliding(hf, "qwen3_moe")
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["moe_intermediate_size"],
                    num_experts=hf.get("num_experts", hf.get("num_local_experts")),
                    top_k=hf.get("num_experts_per_tok", 8), normalize_topk=hf.get("norm_topk_prob", True),
                    activation=act(hf, "qwen3_moe"), load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    bias = hf.get("attention_bias", False)
    return ModelConfig(**common(hf), d_ff=hf["intermediate_size"], moe=moe,
                       moe_layers=sparse_layers(hf), qkv_bias=bias, o_bias=bias, qk_norm="head",
                       rope=rope_from_hf(hf))


def to_hf(cfg: ModelConfig) -> dict:
    return dict(qwen_moe_to_hf(cfg), attention_bias=cfg.qkv_bias)


FAMILY = Family("qwen3_moe", "Qwen3MoeForCausalLM", to_moekit, to_hf, **qwen_rules())
