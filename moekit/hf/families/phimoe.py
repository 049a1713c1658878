"""phimoe: Phi-3.5-MoE, a SparseMixer top-2 router, LayerNorms with bias, an optional LM-head bias."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.configs import act, common, common_to_hf, moe_of, rope_from_hf, unsupported
from moekit.hf.family import Family, mixtral_rules
from moekit.model.config import ModelConfig


def to_moekit(hf: dict) -> ModelConfig:
    if hf.get("num_experts_per_tok", 2) != 2:
        raise unsupported("phimoe", "num_experts_per_tok", hf["num_experts_per_tok"],
                          "transformers' sparsemixer always picks 2 experts")
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                    num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 2),
                    router="sparsemixer", sparsemixer_eps=hf.get("router_jitter_noise", 0.01),
                    jitter_eps=hf.get("input_jitter_noise", 0.0),
                    activation=act(hf, "phimoe"), load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    bias = hf.get("attention_bias", False)
    fields = common(hf)
    fields["norm_eps"] = hf.get("rms_norm_eps", 1e-5)
    return ModelConfig(**fields, d_ff=hf["intermediate_size"], moe=moe, qkv_bias=bias, o_bias=bias,
                       norm="layernorm", norm_bias=True, lm_head_bias=hf.get("lm_head_bias", False),
                       sliding_window=hf.get("sliding_window"), rope=rope_from_hf(hf, 1e6))


def to_hf(cfg: ModelConfig) -> dict:
    moe = moe_of(cfg)
    return dict(common_to_hf(cfg), intermediate_size=moe.d_ff, num_local_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_coef,
                router_jitter_noise=moe.sparsemixer_eps, input_jitter_noise=moe.jitter_eps,
                attention_bias=cfg.qkv_bias, lm_head_bias=cfg.lm_head_bias, sliding_window=cfg.sliding_window)


FAMILY = Family("phimoe", "PhimoeForCausalLM", to_moekit, to_hf, **mixtral_rules("router"))
