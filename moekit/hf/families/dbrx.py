"""dbrx: DBRX, softmax top-k with weights divided by their p=1 norm, fused Wqkv, experts stacked
along rows, LayerNorms, clip_qkv; its config.json nests attention and FFN settings."""

from __future__ import annotations

from moekit.config import MoEConfig
from moekit.hf.configs import act, flag, mapping, moe_of, rope_from_hf, rope_to_hf, unsupported
from moekit.hf.family import L, MOE, Family, renames
from moekit.hf.rules import Fused, Unflatten
from moekit.model.config import ModelConfig

_B = "transformer.blocks.{layer}."
_RULES = (
    *renames({"transformer.wte.weight": "model.embed_tokens.weight",
              "transformer.norm_f.weight": "model.norm.weight",
              _B + "norm_attn_norm.norm_1.weight": L + "input_layernorm.weight",
              _B + "norm_attn_norm.norm_2.weight": L + "post_attention_layernorm.weight",
              _B + "norm_attn_norm.attn.out_proj.weight": L + "self_attn.o_proj.weight",
              _B + "ffn.router.layer.weight": MOE + "router.gate.weight"}),
    Fused(_B + "norm_attn_norm.attn.Wqkv.weight",
          tuple(L + f"self_attn.{p}_proj.weight" for p in ("q", "k", "v")), dim=0),
    # experts stacked along rows: w1 / v1 (E * F, D) are (out, in) per expert, w2 (E * F, D) is (in, out)
    Unflatten(_B + "ffn.experts.mlp.w1", MOE + "experts.w_gate_EDF", transpose=True),
    Unflatten(_B + "ffn.experts.mlp.v1", MOE + "experts.w_up_EDF", transpose=True),
    Unflatten(_B + "ffn.experts.mlp.w2", MOE + "experts.w_down_EFD"),
)


def to_moekit(hf: dict) -> ModelConfig:
    attn, ffn = mapping(hf, "attn_config"), mapping(hf, "ffn_config")
    name = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    if p not in (None, 1, 1.0):
        raise unsupported("dbrx", "ffn_config.moe_normalize_expert_weights", p, "only the p=1 norm (a plain "
                          "renormalisation) or None")
    moe = MoEConfig(d_model=hf["d_model"], d_ff=ffn.get("ffn_hidden_size", 3584),
                    num_experts=ffn.get("moe_num_experts", 4), top_k=ffn.get("moe_top_k", 1),
                    normalize_topk=p is not None, jitter_eps=ffn.get("moe_jitter_eps") or 0.0,
                    activation=act({"hidden_act": name}, "dbrx"),
                    load_balance_coef=ffn.get("moe_loss_weight", 0.01))
    rope_hf = {**hf, "max_position_embeddings": hf.get("max_seq_len", 2048)}
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_layers=hf["n_layers"],
                       n_heads=hf["n_heads"], n_kv_heads=attn.get("kv_n_heads", 1),
                       max_seq_len=hf.get("max_seq_len", 2048),
                       moe=moe, clip_qkv=attn.get("clip_qkv"), norm="layernorm", norm_eps=1e-5,
                       rope=rope_from_hf(rope_hf, attn.get("rope_theta", 10000.0)),
                       tie_embeddings=flag(hf, "tie_word_embeddings", False))


def to_hf(cfg: ModelConfig) -> dict:
    moe = moe_of(cfg)
    theta = cfg.rope.theta if cfg.rope is not None else 10000.0
    return dict(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                max_seq_len=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings, **rope_to_hf(cfg.rope),
                # rope_theta in attn_config too: transformers 5.23's DbrxAttention reads it from there
                attn_config={"kv_n_heads": cfg.kv_heads, "clip_qkv": cfg.clip_qkv, "rope_theta": theta},
                ffn_config={"ffn_hidden_size": moe.d_ff, "moe_num_experts": moe.num_experts,
                            "moe_top_k": moe.top_k,
                            "moe_normalize_expert_weights": 1.0 if moe.normalize_topk else None,
                            "moe_jitter_eps": moe.jitter_eps or None,
                            "moe_loss_weight": moe.load_balance_coef,
                            "ffn_act_fn": {"name": "silu"}})


FAMILY = Family("dbrx", "DbrxForCausalLM", to_moekit, to_hf, common=_RULES)
