"""What every family's `config.json` translation shares: the Llama-style fields, RoPE, activations.

Each family module (`moekit/hf/families/<model_type>.py`) reads the fields transformers 5.23 reads
for it (with its defaults) and raises on settings moekit does not reproduce. `ConfigJson` makes a
missing required field (`hf["hidden_size"]`) a ValueError naming the file and the field.
"""

from __future__ import annotations

from typing import Any

from moekit.config import MoEConfig
from moekit.model.config import ModelConfig, RopeConfig

_ROPE_FIELDS = {  # transformers rope_parameters key -> RopeConfig field
    "rope_theta": "theta", "factor": "factor", "original_max_position_embeddings": "original_max_position",
    "beta_fast": "beta_fast", "beta_slow": "beta_slow", "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim", "attention_factor": "attention_factor", "truncate": "truncate",
    "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
    "short_factor": "short_factor", "long_factor": "long_factor", "short_mscale": "short_mscale",
    "long_mscale": "long_mscale", "partial_rotary_factor": "partial_rotary",
}
_ACTS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu", "gelu_new": "geglu"}


class ConfigJson(dict):
    """A config.json dict whose missing required fields raise ValueError (not KeyError)."""

    def __init__(self, data: dict, *, source: str = "config.json", model_type: str = "?") -> None:
        super().__init__(data)
        self.source, self.model_type = source, model_type

    def __missing__(self, key: str) -> Any:
        raise ValueError(f"{self.source}: model_type={self.model_type!r} needs the field {key!r}, which is "
                         f"missing; the file is incomplete or not this family's config")


def unsupported(model_type: str, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"config.json of model_type={model_type!r}: {field}={value!r} is not supported "
                      f"by moekit ({why})")


def _where(hf: dict) -> str:
    return getattr(hf, "source", "config.json")


def flag(hf: dict, name: str, default: bool) -> bool:
    """A boolean field of config.json; "no", 0 or null are not booleans and are refused."""
    value = hf.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"{_where(hf)}: {name}={value!r} must be true or false")
    return value


def mapping(hf: dict, name: str) -> dict:
    """An optional object-valued field of config.json (absent or null: empty)."""
    value = hf.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{_where(hf)}: {name} must be a JSON object (or absent), not "
                         f"{type(value).__name__} {value!r}")
    return value


def act(hf: dict, model_type: str) -> str:
    name = hf.get("hidden_act", "silu")
    if name not in _ACTS:
        raise unsupported(model_type, "hidden_act", name, f"gated activations {sorted(_ACTS)} only")
    return _ACTS[name]


def rope_from_hf(hf: dict, default_theta: float = 10000.0) -> RopeConfig:
    params = {**mapping(hf, "rope_scaling"), **mapping(hf, "rope_parameters")}
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


def common(hf: dict) -> dict[str, Any]:
    """The Llama-style fields every decoder family shares."""
    return dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"), max_seq_len=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=flag(hf, "tie_word_embeddings", False),
    )


def common_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_head,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", **rope_to_hf(cfg.rope),
    )


def moe_of(cfg: ModelConfig) -> MoEConfig:
    if cfg.moe is None:
        raise ValueError("this model_type needs an MoE model (ModelConfig.moe is None)")
    return cfg.moe


def sparse_layers(hf: dict) -> tuple[int, ...]:
    """Qwen-MoE: layer i is MoE unless in mlp_only_layers, and only when (i + 1) % step == 0."""
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or [])
    return tuple(i for i in range(hf["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0)


def no_sliding(hf: dict, model_type: str) -> None:
    if hf.get("use_sliding_window") and hf.get("sliding_window"):
        raise unsupported(model_type, "use_sliding_window", True, "Qwen's per-layer sliding window")


