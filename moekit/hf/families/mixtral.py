"""mixtral: softmax top-k over experts with renormalised weights (Mixtral 8x7B / 8x22B)."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.configs import act, common, common_to_hf, moe_of, rope_from_hf
from moekit.hf.family import Family, mixtral_rules
from moekit.model.config import ModelConfig


def to_moekit(hf: dict) -> ModelConfig:
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                    num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 2),
                    activation=act(hf, "mixtral"), load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    return ModelConfig(**common(hf), d_ff=hf["intermediate_size"], moe=moe, rope=rope_from_hf(hf, 1e6),
                       sliding_window=hf.get("sliding_window"))


def to_hf(cfg: ModelConfig) -> dict:
    moe = moe_of(cfg)
    return dict(common_to_hf(cfg), intermediate_size=moe.d_ff, num_local_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_coef,
                sliding_window=cfg.sliding_window)


FAMILY = Family("mixtral", "MixtralForCausalLM", to_moekit, to_hf, **mixtral_rules("gate"))
