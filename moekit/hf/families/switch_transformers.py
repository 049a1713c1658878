"""switch_transformers: the Switch Transformer encoder-decoder (a `SwitchTransformer`), top-1 routing
with a fixed expert capacity per sequence; encoder and decoder share one input embedding."""

from __future__ import annotations

from typing import Any

from moekit.hf.family import Family
from moekit.hf.rules import Rename, Rule, StackExperts
from moekit.model.encoder_decoder import SwitchConfig


def _stack(stack: str, ff: int) -> tuple[Rule, ...]:
    """One stack of a Switch Transformer: the feed-forward is sublayer `ff` of each block."""
    p = f"{stack}.block.{{layer}}.layer.{ff}.mlp."
    return (Rename(p + "router.classifier.weight", p + "router.gate.weight"),
            Rename(p + "router.classifier.bias", p + "router.gate.bias"),  # with router_bias
            StackExperts(p + "experts.expert_{expert}.wi.weight", p + "experts.w_in_EDF"),
            StackExperts(p + "experts.expert_{expert}.wo.weight", p + "experts.w_out_EFD"))


def to_moekit(hf: dict) -> SwitchConfig:
    """num_sparse_*_layers become sparse steps; the other fields keep transformers' names."""
    n_enc = hf.get("num_layers", 12)
    n_dec = hf.get("num_decoder_layers") or n_enc

    def step(n_layers: int, n_sparse: int) -> int:
        return n_layers // n_sparse if n_sparse > 0 else 0

    keys = set(SwitchConfig.__dataclass_fields__) - {
        "encoder_sparse_step", "decoder_sparse_step", "capacity_factor", "dense_act_fn"}
    kwargs = {k: hf[k] for k in keys if k in hf and hf[k] is not None}
    act = hf.get("dense_act_fn", "relu")
    if act not in ("relu", "gelu", "silu"):
        raise ValueError(f"dense_act_fn={act!r} is not supported; moekit's Switch has relu, gelu, silu")
    return SwitchConfig(**kwargs, dense_act_fn=act,
                        encoder_sparse_step=step(n_enc, hf.get("num_sparse_encoder_layers", 3)),
                        decoder_sparse_step=step(n_dec, hf.get("num_sparse_decoder_layers", 3)))


def to_hf(cfg: SwitchConfig) -> dict:
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


FAMILY = Family("switch_transformers", "SwitchTransformersForConditionalGeneration", to_moekit, to_hf,
                common=_stack("encoder", 1) + _stack("decoder", 2), encoder_decoder=True)
