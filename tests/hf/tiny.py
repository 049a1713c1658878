"""Tiny random transformers models per model_type, saved to a directory, for parity tests.

No downloads: each model is built from a config with transformers, its weights perturbed so no
parameter keeps a degenerate init (zero routers or biases), and the routers scaled so routing
decisions are not knife-edge.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
           moe_intermediate_size=16, first_k_dense_replace=1, n_shared_experts=1)
CONFIGS: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                      norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=24, decoder_sparse_step=1, mlp_only_layers=[0]),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, clip_qkv=0.5, eos_token_id=1, pad_token_id=0),
    "deepseek_v3": dict(MLA, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                        q_lora_rank=24, routed_scaling_factor=2.5),
    "deepseek_v2": dict(MLA, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                        topk_method="group_limited_greedy", q_lora_rank=None, routed_scaling_factor=1.5),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
                       residual_multiplier=0.5, logits_scaling=3.0, attention_multiplier=0.3),
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, attention_bias=True, lm_head_bias=True,
                   router_jitter_noise=0.2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"]),
    "jamba": dict(num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, mamba_d_state=4, mamba_expand=2,
                  mamba_dt_rank=4, num_hidden_layers=4),
}
# DBRX names its fields differently; rope_theta in attn_config because transformers 5.23's
# DbrxAttention reads it from there.
DBRX = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
            attn_config=dict(kv_n_heads=2, clip_qkv=0.4, rope_theta=10000.0),
            ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2))
MODEL_TYPES = [*CONFIGS, "dbrx"]
# Variants that exercise config translation: case id -> (model_type, config overrides).
VARIANTS: dict[str, tuple[str, dict]] = {
    "deepseek_v3-yarn": ("deepseek_v3", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
        beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))),
    "phimoe-longrope": ("phimoe", dict(rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=16,
        short_factor=[1.0, 1.2, 1.5, 2.0], long_factor=[1.5, 2.0, 3.0, 4.0], short_mscale=1.1,
        long_mscale=1.3))),
    # Phi-3.5-MoE as published sets input_jitter_noise=0.01 (the router's training-time jitter).
    "phimoe-input-jitter": ("phimoe", dict(input_jitter_noise=0.01)),
    "qwen3_moe-tied": ("qwen3_moe", dict(tie_word_embeddings=True)),
    "mixtral-sliding": ("mixtral", dict(sliding_window=3)),
}
CASES: dict[str, tuple[str, dict]] = {**{t: (t, {}) for t in MODEL_TYPES}, **VARIANTS}


def hf_config(model_type: str, **overrides) -> transformers.PretrainedConfig:
    if model_type == "dbrx":
        return transformers.DbrxConfig(**{**DBRX, **overrides})
    return transformers.AutoConfig.for_model(model_type, **{**SMALL, **CONFIGS[model_type], **overrides})


def tiny_hf_model(model_type: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(model_type, **overrides)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)
            if _is_router(name):
                p.mul_(8.0)  # spread router logits: top-k margins far above float error
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model


def _is_router(name: str) -> bool:
    routers = (".gate.weight", ".router.weight", ".router.layer.weight")
    return any(s in name for s in routers) and "experts" not in name


def _ids(out, top_k: int) -> torch.Tensor:
    """Expert ids from a router's output: (logits, weights, ids), or DBRX's bare logits (softmax top-k)."""
    if isinstance(out, torch.Tensor):
        return out.float().softmax(-1).topk(top_k, dim=-1).indices
    return out[2]


def save_tiny(model_type: str, path: Path, overrides: dict | None = None,
              **save_kwargs) -> transformers.PreTrainedModel:
    model = tiny_hf_model(model_type, **(overrides or {}))
    model.save_pretrained(path, **save_kwargs)
    return model


def hf_router_ids(model: transformers.PreTrainedModel, tokens_BS: torch.Tensor) -> list[torch.Tensor]:
    """Expert ids (T, K) each MoE router of `model` picks for `tokens_BS`, sorted along K."""
    found: list[torch.Tensor] = []
    cfg = model.config
    top_k = cfg.ffn_config.moe_top_k if cfg.model_type == "dbrx" else cfg.num_experts_per_tok

    def hook(mod, args, out) -> None:
        ids = _ids(out, top_k)
        found.append(ids.reshape(-1, ids.shape[-1]))

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if type(m).__name__.lower().endswith("router")]
    assert hooks, f"no router modules found in {type(model).__name__}"
    try:
        with torch.no_grad():
            model(tokens_BS)
    finally:
        for h in hooks:
            h.remove()
    return [ids.sort(-1).values for ids in found]
