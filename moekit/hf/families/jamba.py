"""jamba: Jamba, Mamba and attention layers interleaved by period/offset, MoE every other layer,
softmax top-k with unnormalised weights."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.configs import act, common, common_to_hf, moe_of
from moekit.hf.family import L, MOE, Family, fused_experts, per_expert, renames
from moekit.model.config import ModelConfig, layer_ids
from moekit.model.mamba import MambaConfig

_COMMON = renames({
    "model.final_layernorm.weight": "model.norm.weight",
    L + "pre_ff_layernorm.weight": L + "post_attention_layernorm.weight",
    L + "feed_forward.router.weight": MOE + "router.gate.weight",
    **{L + f"feed_forward.{p}_proj.weight": MOE + f"{p}_proj.weight" for p in ("gate", "up", "down")},
})


def to_moekit(hf: dict) -> ModelConfig:
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], num_experts=hf["num_experts"],
                    top_k=hf.get("num_experts_per_tok", 2), normalize_topk=False,
                    activation=act(hf, "jamba"),
                    load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    mamba = MambaConfig(d_model=hf["hidden_size"], d_state=hf.get("mamba_d_state", 16),
                        d_conv=hf.get("mamba_d_conv", 4), expand=hf.get("mamba_expand", 2),
                        dt_rank=None if hf.get("mamba_dt_rank", "auto") == "auto" else hf["mamba_dt_rank"],
                        conv_bias=hf.get("mamba_conv_bias", True), bias=hf.get("mamba_proj_bias", False),
                        norm_eps=hf.get("rms_norm_eps", 1e-6))
    period = f"every:{hf.get('expert_layer_period', 2)}:{hf.get('expert_layer_offset', 1)}"
    attn = f"every:{hf.get('attn_layer_period', 8)}:{hf.get('attn_layer_offset', 4)}"
    return ModelConfig(**common(hf), d_ff=hf["intermediate_size"], moe=moe, moe_layers=period,
                       attention_layers=attn, mamba=mamba, rope=None)


def _period(spec, n_layers: int, name: str) -> tuple[int, int]:
    ids = layer_ids(spec, n_layers)
    if isinstance(spec, str) and spec.startswith("every:"):
        nums = [int(x) for x in spec.split(":")[1:]]
        return (nums[0], nums[1] if len(nums) == 2 else nums[0] - 1)
    raise ValueError(f"{name}={spec!r} (layers {ids}) cannot be written as Jamba's period/offset; "
                     f"use 'every:N:O'")


def to_hf(cfg: ModelConfig) -> dict:
    moe, mamba = moe_of(cfg), cfg.mamba
    if mamba is None:
        raise ValueError("jamba needs ModelConfig.mamba")
    expert_period, expert_offset = _period(cfg.moe_layers, cfg.n_layers, "moe_layers")
    attn_period, attn_offset = _period(cfg.attention_layers, cfg.n_layers, "attention_layers")
    out = common_to_hf(cfg)
    out.pop("rope_parameters", None)
    return dict(out, intermediate_size=moe.d_ff, num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                router_aux_loss_coef=moe.load_balance_coef, expert_layer_period=expert_period,
                expert_layer_offset=expert_offset, attn_layer_period=attn_period,
                attn_layer_offset=attn_offset,
                mamba_d_state=mamba.d_state, mamba_d_conv=mamba.d_conv, mamba_expand=mamba.expand,
                mamba_dt_rank=mamba.dt_rank if mamba.dt_rank is not None else "auto",
                mamba_conv_bias=mamba.conv_bias, mamba_proj_bias=mamba.bias)


FAMILY = Family("jamba", "JambaForCausalLM", to_moekit, to_hf, common=_COMMON,
                split=per_expert(L + "feed_forward.experts.", "gate_proj", "up_proj", "down_proj"),
                fused=fused_experts(L + "feed_forward.experts.gate_up_proj", L + "feed_forward.experts.down_proj"))
