"""gpt_oss: gpt-oss, a biased linear router, top-k then softmax over the k selected, clamped SwiGLU
experts with biases, attention sinks and alternating sliding-window layers."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.configs import common, common_to_hf, moe_of, rope_from_hf, unsupported
from moekit.hf.family import MOE, Family, renames
from moekit.hf.rules import Fused
from moekit.model.config import ModelConfig, layer_ids

# gpt-oss stores experts (E, in, out) already, gate and up interleaved along the last dim.
_RULES = (
    *renames({MOE + "router.weight": MOE + "router.gate.weight",
              MOE + "router.bias": MOE + "router.gate.bias",
              MOE + "experts.down_proj": MOE + "experts.w_down_EFD",
              MOE + "experts.down_proj_bias": MOE + "experts.b_down_ED"}),
    Fused(MOE + "experts.gate_up_proj", (MOE + "experts.w_gate_EDF", MOE + "experts.w_up_EDF"), dim=-1,
          interleaved=True),
    Fused(MOE + "experts.gate_up_proj_bias", (MOE + "experts.b_gate_EF", MOE + "experts.b_up_EF"), dim=-1,
          interleaved=True),
)


def to_moekit(hf: dict) -> ModelConfig:
    for name, want in (("swiglu_limit", 7.0), ("swiglu_alpha", 1.702)):
        if hf.get(name, want) != want:
            raise unsupported("gpt_oss", name, hf[name], f"moekit's clamped_swiglu uses {want}")
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                    num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 4),
                    softmax_after_topk=True, router_bias=True, activation="clamped_swiglu",
                    expert_mlp_bias=True, load_balance_coef=hf.get("router_aux_loss_coef", 0.9))
    L = hf["num_hidden_layers"]
    default = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    types = hf.get("layer_types") or default
    bias = hf.get("attention_bias", True)
    return ModelConfig(**common(hf), d_ff=hf["intermediate_size"], moe=moe, qkv_bias=bias,
                       o_bias=bias, attn_sinks=True, sliding_window=hf.get("sliding_window"),
                       sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
                       rope=rope_from_hf(hf, 150000.0))


def to_hf(cfg: ModelConfig) -> dict:
    moe = moe_of(cfg)
    sliding = layer_ids(cfg.sliding_layers, cfg.n_layers) if cfg.sliding_window else ()
    return dict(common_to_hf(cfg), intermediate_size=moe.d_ff, num_local_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_coef,
                attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window,
                layer_types=["sliding_attention" if i in sliding else "full_attention"
                             for i in range(cfg.n_layers)],
                swiglu_limit=7.0, swiglu_alpha=1.702)


FAMILY = Family("gpt_oss", "GptOssForCausalLM", to_moekit, to_hf, common=_RULES)
