"""Hugging Face `config.json` <-> moekit `ModelConfig`, one pair of functions per model_type.

`to_moekit(hf)` reads the fields transformers 5.23 reads for that family (with its defaults) and
raises on settings moekit does not reproduce; `to_hf(cfg)` writes a config.json transformers
rebuilds the same model from. Routing maps onto `MoEConfig` as the family's router computes it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moekit.config import MoEConfig
from moekit.model.config import MLAConfig, ModelConfig, RopeConfig, layer_ids
from moekit.model.encoder_decoder import SwitchConfig
from moekit.model.mamba import MambaConfig

_ROPE_FIELDS = {  # transformers rope_parameters key -> RopeConfig field
    "rope_theta": "theta", "factor": "factor", "original_max_position_embeddings": "original_max_position",
    "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim", "attention_factor": "attention_factor", "truncate": "truncate",
    "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
    "short_factor": "short_factor", "long_factor": "long_factor", "short_mscale": "short_mscale",
    "long_mscale": "long_mscale", "partial_rotary_factor": "partial_rotary",
}
_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}


def unsupported(model_type: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json of model_type={model_type!r}: {field}={value!r} is not supported "
                      f"by moekit ({why})")


def _act(hf: dict, model_type: str) -> str:
    act = hf.get("hidden_act", "silu")
    if act not in _ACTS:
        raise unsupported(model_type, "hidden_act", act, f"gated activations {sorted(_ACTS)} only")
    return _ACTS[act]


def rope_from_hf(hf: dict, default_theta: float = 10000.0) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    params.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    if "partial_rotary_factor" in hf:
        params.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
    kind = params.pop("rope_type", params.pop("type", "default"))
    kwargs = {_ROPE_FIELDS[k]: (tuple(v) if isinstance(v, list) else v)
              for k, v in params.items() if k in _ROPE_FIELDS and v is not None}
    scaling = "none" if kind == "default" else kind
    if scaling == "yarn" and "original_max_position" not in kwargs:
        # transformers' yarn default: the pre-extension length is max_position_embeddings / factor
        kwargs["original_max_position"] = int(hf["max_position_embeddings"] / kwargs.get("factor", 1.0))
    return RopeConfig(scaling=scaling, **kwargs)


def rope_to_hf(rope: RopeConfig | None) -> dict:
    if rope is None:
        return {}
    out: dict[str, Any] = {"rope_type": "default" if rope.scaling == "none" else rope.scaling}
    default = RopeConfig(scaling="none")
    for hf_key, field in _ROPE_FIELDS.items():
        value = getattr(rope, field)
        if field == "theta" or (rope.scaling != "none" and value is not None and field != "partial_rotary"):
            out[hf_key] = list(value) if isinstance(value, tuple) else value
        elif field == "partial_rotary" and value != default.partial_rotary:
            out[hf_key] = value
    if rope.scaling == "none":
        out = {k: out[k] for k in ("rope_type", "rope_theta", "partial_rotary_factor") if k in out}
    return {"rope_parameters": out}


def _common(hf: dict, model_type: str) -> dict[str, Any]:
    """The Llama-style fields every decoder family shares."""
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"), max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
    )


def _common_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_head,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", **rope_to_hf(cfg.rope),
    )


def _moe(cfg: ModelConfig) -> MoEConfig:
    if cfg.moe is None:
        raise ValueError("this model_type needs an MoE model (ModelConfig.moe is None)")
    return cfg.moe


def _sparse_layers(hf: dict) -> tuple[int, ...]:
    """Qwen-MoE: layer i is MoE unless in mlp_only_layers, and only when (i + 1) % step == 0."""
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    return tuple(i for i in range(hf["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0)


def _no_sliding(hf: dict, model_type: str) -> None:
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise unsupported(model_type, "use_sliding_window", True, "Qwen's per-layer sliding window")


# ---- mixtral -------------------------------------------------------------------------------
def mixtral_to_moekit(hf: dict) -> ModelConfig:
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                    num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 2),
                    activation=_act(hf, "mixtral"), load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    window = hf.get("sliding_window")
    return ModelConfig(**_common(hf, "mixtral"), d_ff=hf["intermediate_size"], moe=moe,
                       rope=rope_from_hf(hf, 1e6), sliding_window=window)


def mixtral_to_hf(cfg: ModelConfig) -> dict:
    moe = _moe(cfg)
    return dict(_common_to_hf(cfg), intermediate_size=moe.d_ff, num_local_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_coef,
                sliding_window=cfg.sliding_window)


# ---- qwen2_moe / qwen3_moe -------------------------------------------------------------------
def qwen2_moe_to_moekit(hf: dict) -> ModelConfig:
    _no_sliding(hf, "qwen2_moe")
    shared = hf.get("shared_expert_intermediate_size") or 0
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["moe_intermediate_size"],
                    num_experts=hf["num_experts"], top_k=hf.get("num_experts_per_tok", 4),
                    normalize_topk=hf.get("norm_topk_prob", False), activation=_act(hf, "qwen2_moe"),
                    num_shared_experts=1 if shared else 0, shared_d_ff=shared or None,
                    shared_expert_gate=bool(shared), load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    return ModelConfig(**_common(hf, "qwen2_moe"), d_ff=hf["intermediate_size"], moe=moe,
                       moe_layers=_sparse_layers(hf), qkv_bias=hf.get("qkv_bias", True),
                       rope=rope_from_hf(hf))


def _qwen_moe_to_hf(cfg: ModelConfig) -> dict:
    """The fields qwen2_moe and qwen3_moe configs share: widths, routing, which layers are sparse."""
    moe = _moe(cfg)
    moe_ids = layer_ids(cfg.moe_layers, cfg.n_layers)
    return dict(_common_to_hf(cfg), intermediate_size=cfg.d_ff or moe.d_ff, moe_intermediate_size=moe.d_ff,
                num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                norm_topk_prob=moe.normalize_topk, router_aux_loss_coef=moe.load_balance_coef,
                decoder_sparse_step=1, mlp_only_layers=[i for i in range(cfg.n_layers) if i not in moe_ids],
                use_sliding_window=False)


def qwen2_moe_to_hf(cfg: ModelConfig) -> dict:
    return dict(_qwen_moe_to_hf(cfg), shared_expert_intermediate_size=_moe(cfg).shared_width,
                qkv_bias=cfg.qkv_bias)


def qwen3_moe_to_moekit(hf: dict) -> ModelConfig:
    _no_sliding(hf, "qwen3_moe")
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["moe_intermediate_size"],
                    num_experts=hf.get("num_experts", hf.get("num_local_experts")),
                    top_k=hf.get("num_experts_per_tok", 8), normalize_topk=hf.get("norm_topk_prob", True),
                    activation=_act(hf, "qwen3_moe"), load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    bias = hf.get("attention_bias", False)
    return ModelConfig(**_common(hf, "qwen3_moe"), d_ff=hf["intermediate_size"], moe=moe,
                       moe_layers=_sparse_layers(hf), qkv_bias=bias, o_bias=bias, qk_norm="head",
                       rope=rope_from_hf(hf))


def qwen3_moe_to_hf(cfg: ModelConfig) -> dict:
    return dict(_qwen_moe_to_hf(cfg), attention_bias=cfg.qkv_bias)


# ---- olmoe ---------------------------------------------------------------------------------
def olmoe_to_moekit(hf: dict) -> ModelConfig:
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], num_experts=hf["num_experts"],
                    top_k=hf.get("num_experts_per_tok", 8), normalize_topk=hf.get("norm_topk_prob", False),
                    activation=_act(hf, "olmoe"), load_balance_coef=hf.get("router_aux_loss_coef", 0.01))
    bias = hf.get("attention_bias", False)
    return ModelConfig(**_common(hf, "olmoe"), d_ff=hf["intermediate_size"], moe=moe, qkv_bias=bias,
                       o_bias=bias, qk_norm="full", clip_qkv=hf.get("clip_qkv"), rope=rope_from_hf(hf))


def olmoe_to_hf(cfg: ModelConfig) -> dict:
    moe = _moe(cfg)
    return dict(_common_to_hf(cfg), intermediate_size=moe.d_ff, num_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, norm_topk_prob=moe.normalize_topk,
                router_aux_loss_coef=moe.load_balance_coef, attention_bias=cfg.qkv_bias,
                clip_qkv=cfg.clip_qkv)


# ---- deepseek_v2 / deepseek_v3 -------------------------------------------------------------
def _mla(hf: dict) -> MLAConfig:
    return MLAConfig(q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                     qk_nope_head_dim=hf["qk_nope_head_dim"], qk_rope_head_dim=hf["qk_rope_head_dim"],
                     v_head_dim=hf["v_head_dim"])


def _deepseek(hf: dict, model_type: str, **routing: Any) -> ModelConfig:
    if hf.get("attention_bias"):
        raise unsupported(model_type, "attention_bias", True, "MLA projections have no biases in moekit")
    if hf.get("mlp_bias"):
        raise unsupported(model_type, "mlp_bias", True, "expert MLP biases in DeepSeek layers")
    shared = hf.get("n_shared_experts") or 0
    F = hf["moe_intermediate_size"]
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=F, num_experts=hf["n_routed_experts"],
                    top_k=hf["num_experts_per_tok"], activation=_act(hf, model_type),
                    routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
                    num_shared_experts=shared, shared_d_ff=shared * F if shared else None, **routing)
    rope = rope_from_hf(hf)
    # V2 always rotates interleaved pairs (complex multiply); V3 when rope_interleave (its default).
    if model_type == "deepseek_v2" or hf.get("rope_interleave", True):
        rope = RopeConfig(**{**rope.__dict__, "interleaved": True})
    common = _common(hf, model_type)
    common.update(n_kv_heads=None, head_dim=None)
    return ModelConfig(**common, d_ff=hf["intermediate_size"], moe=moe,
                       moe_layers=f"from:{hf.get('first_k_dense_replace', 0)}", mla=_mla(hf), rope=rope)


def _groups(hf: dict) -> dict[str, Any]:
    n, k = hf.get("n_group") or 1, hf.get("topk_group") or 1
    return {} if n <= 1 or k >= n else {"num_groups": n, "topk_groups": k}


def deepseek_v3_to_moekit(hf: dict) -> ModelConfig:
    # DeepSeek-V3 router: sigmoid scores, selection bias e_score_correction_bias, groups scored by
    # their top-2 sum, optional renormalisation, then routed_scaling_factor.
    return _deepseek(hf, "deepseek_v3", score_func="sigmoid", expert_bias=True, group_score="top2_sum",
                     normalize_topk=hf.get("norm_topk_prob", True), **_groups(hf))


def deepseek_v2_to_moekit(hf: dict) -> ModelConfig:
    # transformers' DeepSeek-V2 router never renormalises (norm_topk_prob is ignored); groups by max.
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise unsupported("deepseek_v2", "topk_method", method, "greedy or group_limited_greedy")
    groups = _groups(hf) if method == "group_limited_greedy" else {}
    return _deepseek(hf, "deepseek_v2", normalize_topk=False, group_score="max", **groups)


def _deepseek_to_hf(cfg: ModelConfig) -> dict:
    moe, mla = _moe(cfg), cfg.mla
    if mla is None:
        raise ValueError("deepseek model_types need multi-head latent attention (ModelConfig.mla)")
    moe_ids = layer_ids(cfg.moe_layers, cfg.n_layers)
    first = min(moe_ids) if moe_ids else cfg.n_layers
    if tuple(moe_ids) != tuple(range(first, cfg.n_layers)):
        raise ValueError(f"moe_layers={cfg.moe_layers!r} cannot be written as DeepSeek's "
                         f"first_k_dense_replace; use 'from:K'")
    out = dict(_common_to_hf(cfg), intermediate_size=cfg.d_ff or moe.d_ff, moe_intermediate_size=moe.d_ff,
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


def deepseek_v3_to_hf(cfg: ModelConfig) -> dict:
    return _deepseek_to_hf(cfg)


def deepseek_v2_to_hf(cfg: ModelConfig) -> dict:
    moe = _moe(cfg)
    return dict(_deepseek_to_hf(cfg), topk_method="group_limited_greedy" if moe.num_groups else "greedy")


# ---- phimoe -------------------------------------------------------------------------------
def phimoe_to_moekit(hf: dict) -> ModelConfig:
    # Phi-3.5-MoE: sparsemixer top-2 router, LayerNorms with bias, optional LM-head bias.
    if hf.get("num_experts_per_tok", 2) != 2:
        raise unsupported("phimoe", "num_experts_per_tok", hf["num_experts_per_tok"],
                          "transformers' sparsemixer always picks 2 experts")
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                    num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 2),
                    router="sparsemixer", sparsemixer_eps=hf.get("router_jitter_noise", 0.01),
                    jitter_eps=hf.get("input_jitter_noise", 0.0),
                    activation=_act(hf, "phimoe"), load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    bias = hf.get("attention_bias", False)
    common = _common(hf, "phimoe")
    common["norm_eps"] = hf.get("rms_norm_eps", 1e-5)
    return ModelConfig(**common, d_ff=hf["intermediate_size"], moe=moe, qkv_bias=bias, o_bias=bias,
                       norm="layernorm", norm_bias=True, lm_head_bias=hf.get("lm_head_bias", False),
                       sliding_window=hf.get("sliding_window"), rope=rope_from_hf(hf, 1e6))


def phimoe_to_hf(cfg: ModelConfig) -> dict:
    moe = _moe(cfg)
    return dict(_common_to_hf(cfg), intermediate_size=moe.d_ff, num_local_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_coef,
                router_jitter_noise=moe.sparsemixer_eps, input_jitter_noise=moe.jitter_eps,
                attention_bias=cfg.qkv_bias, lm_head_bias=cfg.lm_head_bias, sliding_window=cfg.sliding_window)


# ---- dbrx ---------------------------------------------------------------------------------
def dbrx_to_moekit(hf: dict) -> ModelConfig:
    attn, ffn = hf.get("attn_config") or {}, hf.get("ffn_config") or {}
    act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    if p not in (None, 1, 1.0):
        raise unsupported("dbrx", "ffn_config.moe_normalize_expert_weights", p, "only the p=1 norm (a plain "
                          "renormalisation) or None")
    # DBRX router: softmax, top-k, weights divided by their p=1 norm (their sum).
    moe = MoEConfig(d_model=hf["d_model"], d_ff=ffn.get("ffn_hidden_size", 3584),
                    num_experts=ffn.get("moe_num_experts", 4), top_k=ffn.get("moe_top_k", 1),
                    normalize_topk=p is not None, jitter_eps=ffn.get("moe_jitter_eps") or 0.0,
                    activation=_act({"hidden_act": act}, "dbrx"),
                    load_balance_coef=ffn.get("moe_loss_weight", 0.01))
    rope_hf = {**hf, "max_position_embeddings": hf.get("max_seq_len", 2048)}
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["d_model"], n_layers=hf["n_layers"],
                       n_heads=hf["n_heads"], n_kv_heads=attn.get("kv_n_heads", 1),
                       max_seq_len=hf.get("max_seq_len", 2048),
                       moe=moe, clip_qkv=attn.get("clip_qkv"), norm="layernorm", norm_eps=1e-5,
                       rope=rope_from_hf(rope_hf, attn.get("rope_theta", 10000.0)),
                       tie_embeddings=hf.get("tie_word_embeddings", False))


def dbrx_to_hf(cfg: ModelConfig) -> dict:
    moe = _moe(cfg)
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


# ---- granitemoe ----------------------------------------------------------------------------
def granitemoe_to_moekit(hf: dict) -> ModelConfig:
    # GraniteMoe router: top-k of the logits, softmax over the k selected.
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                    num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 2),
                    softmax_after_topk=True, activation=_act(hf, "granitemoe"),
                    load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    bias = hf.get("attention_bias", False)
    return ModelConfig(**_common(hf, "granitemoe"), d_ff=hf["intermediate_size"], moe=moe, qkv_bias=bias,
                       o_bias=bias, rope=rope_from_hf(hf), attn_scale=hf.get("attention_multiplier", 1.0),
                       embedding_multiplier=hf.get("embedding_multiplier", 1.0),
                       residual_multiplier=hf.get("residual_multiplier", 1.0),
                       logits_scaling=hf.get("logits_scaling", 1.0))


def granitemoe_to_hf(cfg: ModelConfig) -> dict:
    moe = _moe(cfg)
    return dict(_common_to_hf(cfg), intermediate_size=moe.d_ff, num_local_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_coef,
                attention_bias=cfg.qkv_bias, embedding_multiplier=cfg.embedding_multiplier,
                residual_multiplier=cfg.residual_multiplier, logits_scaling=cfg.logits_scaling,
                attention_multiplier=cfg.attn_scale if cfg.attn_scale is not None else cfg.dim_head**-0.5)


# ---- gpt_oss -------------------------------------------------------------------------------
def gpt_oss_to_moekit(hf: dict) -> ModelConfig:
    for name, want in (("swiglu_limit", 7.0), ("swiglu_alpha", 1.702)):
        if hf.get(name, want) != want:
            raise unsupported("gpt_oss", name, hf[name], f"moekit's clamped_swiglu uses {want}")
    # gpt-oss router: linear with bias, top-k of the logits, softmax over the k selected.
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                    num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok", 4),
                    softmax_after_topk=True, router_bias=True, activation="clamped_swiglu",
                    expert_mlp_bias=True, load_balance_coef=hf.get("router_aux_loss_coef", 0.9))
    L = hf["num_hidden_layers"]
    default = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)]
    types = hf.get("layer_types") or default
    bias = hf.get("attention_bias", True)
    return ModelConfig(**_common(hf, "gpt_oss"), d_ff=hf["intermediate_size"], moe=moe, qkv_bias=bias,
                       o_bias=bias, attn_sinks=True, sliding_window=hf.get("sliding_window"),
                       sliding_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
                       rope=rope_from_hf(hf, 150000.0))


def gpt_oss_to_hf(cfg: ModelConfig) -> dict:
    moe = _moe(cfg)
    sliding = layer_ids(cfg.sliding_layers, cfg.n_layers) if cfg.sliding_window else ()
    return dict(_common_to_hf(cfg), intermediate_size=moe.d_ff, num_local_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.load_balance_coef,
                attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window,
                layer_types=["sliding_attention" if i in sliding else "full_attention"
                             for i in range(cfg.n_layers)],
                swiglu_limit=7.0, swiglu_alpha=1.702)


# ---- jamba ---------------------------------------------------------------------------------
def jamba_to_moekit(hf: dict) -> ModelConfig:
    # Jamba router: softmax, top-k, weights left unnormalised.
    moe = MoEConfig(d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], num_experts=hf["num_experts"],
                    top_k=hf.get("num_experts_per_tok", 2), normalize_topk=False,
                    activation=_act(hf, "jamba"),
                    load_balance_coef=hf.get("router_aux_loss_coef", 0.001))
    mamba = MambaConfig(d_model=hf["hidden_size"], d_state=hf.get("mamba_d_state", 16),
                        d_conv=hf.get("mamba_d_conv", 4), expand=hf.get("mamba_expand", 2),
                        dt_rank=None if hf.get("mamba_dt_rank", "auto") == "auto" else hf["mamba_dt_rank"],
                        conv_bias=hf.get("mamba_conv_bias", True), bias=hf.get("mamba_proj_bias", False),
                        norm_eps=hf.get("rms_norm_eps", 1e-6))
    period = f"every:{hf.get('expert_layer_period', 2)}:{hf.get('expert_layer_offset', 1)}"
    attn = f"every:{hf.get('attn_layer_period', 8)}:{hf.get('attn_layer_offset', 4)}"
    return ModelConfig(**_common(hf, "jamba"), d_ff=hf["intermediate_size"], moe=moe, moe_layers=period,
                       attention_layers=attn, mamba=mamba, rope=None)


def _period(spec, n_layers: int, name: str) -> tuple[int, int]:
    ids = layer_ids(spec, n_layers)
    if isinstance(spec, str) and spec.startswith("every:"):
        nums = [int(x) for x in spec.split(":")[1:]]
        return (nums[0], nums[1] if len(nums) == 2 else nums[0] - 1)
    raise ValueError(f"{name}={spec!r} (layers {ids}) cannot be written as Jamba's period/offset; "
                     f"use 'every:N:O'")


def jamba_to_hf(cfg: ModelConfig) -> dict:
    moe, mamba = _moe(cfg), cfg.mamba
    if mamba is None:
        raise ValueError("jamba needs ModelConfig.mamba")
    expert_period, expert_offset = _period(cfg.moe_layers, cfg.n_layers, "moe_layers")
    attn_period, attn_offset = _period(cfg.attention_layers, cfg.n_layers, "attention_layers")
    out = _common_to_hf(cfg)
    out.pop("rope_parameters", None)
    return dict(out, intermediate_size=moe.d_ff, num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                router_aux_loss_coef=moe.load_balance_coef, expert_layer_period=expert_period,
                expert_layer_offset=expert_offset, attn_layer_period=attn_period,
                attn_layer_offset=attn_offset,
                mamba_d_state=mamba.d_state, mamba_d_conv=mamba.d_conv, mamba_expand=mamba.expand,
                mamba_dt_rank=mamba.dt_rank if mamba.dt_rank is not None else "auto",
                mamba_conv_bias=mamba.conv_bias, mamba_proj_bias=mamba.bias)


# ---- switch_transformers (encoder-decoder) -------------------------------------------------
def switch_to_moekit(hf: dict) -> SwitchConfig:
    return SwitchConfig.from_transformers(hf)


def switch_to_hf(cfg: SwitchConfig) -> dict:
    if cfg.capacity_factor is not None:
        raise ValueError(f"capacity_factor={cfg.capacity_factor} cannot be written for transformers' Switch "
                         f"Transformers, which has a fixed expert_capacity; set expert_capacity instead")

    def n_sparse(n_layers: int, step: int, name: str) -> int:
        # transformers derives the step back as n_layers // num_sparse (0 sparse layers -> step n_layers)
        n = n_layers // step if step > 0 else 0
        if (n_layers // n if n else n_layers) != step and n:
            raise ValueError(f"{name}={step} with {n_layers} layers cannot be written as transformers' "
                             f"num_sparse_*_layers")
        return n

    fields = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "num_experts",
              "expert_capacity", "router_bias", "router_jitter_noise", "relative_attention_num_buckets",
              "relative_attention_max_distance", "dropout_rate", "layer_norm_epsilon", "router_z_loss_coef",
              "router_aux_loss_coef", "dense_act_fn", "tie_word_embeddings", "pad_token_id",
              "decoder_start_token_id")
    out: dict[str, Any] = {f: getattr(cfg, f) for f in fields}
    return dict(out, num_decoder_layers=cfg.decoder_layers, is_encoder_decoder=True,
                num_sparse_encoder_layers=n_sparse(cfg.num_layers, cfg.encoder_sparse_step,
                                                   "encoder_sparse_step"),
                num_sparse_decoder_layers=n_sparse(cfg.decoder_layers, cfg.decoder_sparse_step,
                                                   "decoder_sparse_step"))


TO_MOEKIT: dict[str, Callable[[dict], ModelConfig | SwitchConfig]] = {
    "mixtral": mixtral_to_moekit, "qwen3_moe": qwen3_moe_to_moekit, "qwen2_moe": qwen2_moe_to_moekit,
    "olmoe": olmoe_to_moekit, "deepseek_v3": deepseek_v3_to_moekit, "deepseek_v2": deepseek_v2_to_moekit,
    "granitemoe": granitemoe_to_moekit, "gpt_oss": gpt_oss_to_moekit, "jamba": jamba_to_moekit,
    "phimoe": phimoe_to_moekit, "dbrx": dbrx_to_moekit, "switch_transformers": switch_to_moekit,
}
TO_HF: dict[str, Callable[[Any], dict]] = {
    "mixtral": mixtral_to_hf, "qwen3_moe": qwen3_moe_to_hf, "qwen2_moe": qwen2_moe_to_hf,
    "olmoe": olmoe_to_hf, "deepseek_v3": deepseek_v3_to_hf, "deepseek_v2": deepseek_v2_to_hf,
    "granitemoe": granitemoe_to_hf, "gpt_oss": gpt_oss_to_hf, "jamba": jamba_to_hf,
    "phimoe": phimoe_to_hf, "dbrx": dbrx_to_hf, "switch_transformers": switch_to_hf,
}
