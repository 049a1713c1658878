"""Can a moekit config be written as a given model_type? Translate to config.json and back, compare.

A config.json that loads as a different model would make transformers (and moekit) compute
something else than the model that was saved, so saving refuses it and names each difference.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

from moekit.config import MoEConfig
from moekit.model.config import ModelConfig, layer_ids

# Fields that change training only (losses, noise), which config.json need not carry.
_TRAINING_ONLY = {"load_balance_coef": 0.0, "load_balance_granularity": "micro_batch", "z_loss_coef": 0.0,
                  "bias_update_rate": 0.0, "jitter_eps": 0.0}


def _moe(moe: MoEConfig | None) -> dict[str, Any] | None:
    if moe is None:
        return None
    moe = replace(moe, **_TRAINING_ONLY, shared_d_ff=moe.shared_width or None)
    return asdict(moe)


def canonical(cfg: ModelConfig) -> dict[str, Any]:
    """`cfg` as a dict with defaults resolved (head_dim, kv heads, layer sets), training-only fields
    dropped, and fields that cannot matter for it (sliding_layers without a window, d_ff when every
    layer is MoE) blanked, so two configs of the same model compare equal."""
    L = cfg.n_layers
    out = asdict(cfg)
    out.update(head_dim=cfg.dim_head, n_kv_heads=cfg.kv_heads, moe=_moe(cfg.moe))
    for name in ("moe_layers", "attention_layers", "sliding_layers", "nope_layers"):
        out[name] = layer_ids(getattr(cfg, name), L, name)
    if cfg.sliding_window is None:
        out["sliding_layers"] = None
    if len(out["moe_layers"]) == L:
        out["d_ff"] = None
    if cfg.mla is not None:
        out.update(head_dim=None, n_kv_heads=None)
    return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def differences(saved: ModelConfig, reloaded: ModelConfig) -> list[str]:
    """'field=value (loads back as other)' for every field where the two models differ."""
    a, b = _flat(canonical(saved)), _flat(canonical(reloaded))
    return [f"{k}={a.get(k)!r} (loads back as {b.get(k)!r})" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]
