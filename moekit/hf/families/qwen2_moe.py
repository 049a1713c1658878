"""qwen2_moe: Qwen1.5/2-MoE, softmax top-k plus one shared expert behind a sigmoid gate.

`qwen_moe_to_hf` holds the fields qwen2_moe and qwen3_moe share.
"""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.configs import act, common, common_to_hf, moe_of, no_sliding, rope_from_hf, sparse_layers
from moekit.hf.family import MOE, Family, qwen_rules
from moekit.model.config import ModelConfig, layer_ids

_SHARED = {MOE + f"shared_expert.{p}_proj.weight": MOE + f"shared_experts.{p}_proj.weight"
           for p in ("gate", "up", "down")}


def to_moekit(hf: dict) -> ModelConfig:
    no_sliding(hf, "qwen2_moe")
    shared = hf.get("shared_expert_intermediate_size") or 0
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["moe_intermediate_size"],
                    num_experts=hf["num_experts"], top_k=hf.get("num_experts_per_tok", 4),
                    normalize_topk=hf.get("norm_topk_prob", False), activation=act(hf, "qwen2_moe"),
                    num_shared_experts=1 if shared else 0, shared_d_ff=shared or None,
                    shared_expert_gate=bool(shared), load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    return ModelConfig(**common(hf), d_ff=hf["intermediate_size"], moe=moe,
                       moe_layers=sparse_layers(hf), qkv_bias=hf.get("qkv_bias", True),
                       rope=rope_from_hf(hf))


def qwen_moe_to_hf(cfg: ModelConfig) -> dict:
    """The fields qwen2_moe and qwen3_moe configs share: widths, routing, which layers are sparse."""
    moe = moe_of(cfg)
    moe_ids = layer_ids(cfg.moe_layers, cfg.n_layers)
    return dict(common_to_hf(cfg), intermediate_size=cfg.d_ff or moe.d_ff, moe_intermediate_size=moe.d_ff,
                num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                norm_topk_prob=moe.normalize_topk, router_aux_loss_coef=moe.load_balance_coef,
                decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.n_layers) if i not in moe_ids],
                use_sliding_window=False)


def to_hf(cfg: ModelConfig) -> dict:
    return dict(qwen_moe_to_hf(cfg), shared_expert_intermediate_size=moe_of(cfg).shared_width,
                qkv_bias=cfg.qkv_bias)


FAMILY = Family("qwen2_moe", "Qwen2MoeForCausalLM", to_moekit, to_hf, **qwen_rules(_SHARED))
