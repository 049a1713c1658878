"""What deepseek_v2 and deepseek_v3 share: multi-head latent attention, shared experts, dense first
layers, group-limited routing and routed_scaling_factor (a helper module, not a family)."""

from __future__ import annotations

from typing import Any

from moekit.config import MoEConfig
from moekit.hf.configs import act, common, common_to_hf, moe_of, rope_from_hf, unsupported
from moekit.model.config import MLAConfig, ModelConfig, RopeConfig, layer_ids


def _mla(hf: dict) -> MLAConfig:
    return MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                     qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                     v_head_dim=hf["v_head_dim"])


def deepseek_to_moekit(hf: dict, model_type: str, **routing: Any) -> ModelConfig:
    if hf.get("attention_bias"):
        raise unsupported(model_type, "attention_bias", True, "MLA projections have no biases in moekit")
    if hf.get("mlp_bias"):
        raise unsupported(model_type, "mlp_bias", True, "expert MLP biases in DeepSeek layers")
    shared = hf.get("n_shared_experts") or 0
    F = hf["moe_intermediate_size"]
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=F, num_experts=hf["n_routed_experts"],
                    top_k=hf["num_experts_per_tok"], activation=act(hf, model_type),
                    routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
                    num_shared_experts=shared, shared_d_ff=shared * F if shared else None, **routing)
    rope = rope_from_hf(hf)
    # V2 always rotates interleaved pairs (complex multiply); V3 when rope_interleave (its default).
    if model_type == "deepseek_v2" or hf.get("rope_interleave", True):
        rope = RopeConfig(**{**rope.__dict__, "interleaved": True})
    fields = common(hf)
    fields.update(n_kv_heads=None, head_dim=None)
    return ModelConfig(**fields, d_ff=hf["intermediate_size"], moe=moe,
                       moe_layers=f"from:{hf.get('first_k_dense_replace', 0)}", mla=_mla(hf), rope=rope)


def groups(hf: dict) -> dict[str, Any]:
    n, k = hf.get("n_group") or 1, hf.get("topk_group") or 1
    return {} if n <= 1 or k >= n else {"num_groups": n, "topk_groups": k}


def deepseek_to_hf(cfg: ModelConfig) -> dict:
    moe, mla = moe_of(cfg), cfg.mla
    if mla is None:
        raise ValueError("deepseek model_types need multi-head latent attention (ModelConfig.mla)")
    moe_ids = layer_ids(cfg.moe_layers, cfg.n_layers)
    first = min(moe_ids) if moe_ids else cfg.n_layers
    if tuple(moe_ids) != tuple(range(first, cfg.n_layers)):
        raise ValueError(f"moe_layers={cfg.moe_layers!r} cannot be written as DeepSeek's "
                         f"first_k_dense_replace; use 'from:K'")
    out = dict(common_to_hf(cfg), intermediate_size=cfg.d_ff or moe.d_ff, moe_intermediate_size=moe.d_ff,
               n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
               n_shared_experts=moe.num_shared_experts, routed_scaling_factor=moe.routed_scaling_factor,
               first_k_dense_replace=first, n_group=moe.num_groups or 1, topk_group=moe.topk_groups or 1,
               q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
               qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
               v_head_dim=mla.v_head_dim, head_dim=mla.qk_rope_head_dim,
               num_key_value_heads=cfg.n_heads, norm_topk_prob=moe.normalize_topk,
               rope_interleave=bool(cfg.rope and cfg.rope.interleaved))
    if moe.shared_width and moe.shared_width != moe.num_shared_experts * moe.d_ff:
        raise ValueError("DeepSeek's shared experts are n_shared_experts * moe_intermediate_size wide; "
                         f"shared_d_ff={moe.shared_d_ff} is not")
    return out
