"""The catalog: a preset for each famous MoE architecture, buildable on the meta device, counted, scalable.

Names are exactly those of /work/shared/specs/model_specs.json (plus short aliases; lookups ignore
case and punctuation). `get(name).build()` instantiates the full model on the meta device (no
memory); `get(name).scaled()` is the same structure at a tiny size that trains on CPU in seconds;
`get(name).info()` gives parameters, experts, layers, context, FLOPs and weight memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.model.accounting import (count_params, embedding_and_head_params, inactive_expert_params,
                                     param_counts, weight_memory)
from moekit.model.block import DecoderLayer
from moekit.model.config import MLAConfig, ModelConfig, RopeConfig, layer_ids
from moekit.model.encoder_decoder import SwitchConfig, SwitchTransformer
from moekit.model.mamba import MambaConfig
from moekit.model.transformer import MoETransformer

FLOPS_CONTEXT = 4096  # keys each token attends to in the FLOP estimate (capped by windows and chunks)


@dataclass(frozen=True)
class Preset:
    """One named architecture.

    Attributes:
        name: the name in model_specs.json.
        config: a ModelConfig (decoder-only) or a SwitchConfig (encoder-decoder).
        aliases: short names (`get` also accepts them).
        hf_id: the checkpoint the numbers come from ("" if none is public).
        context: context length of an encoder-decoder preset (decoder-only presets use the
            config's max_seq_len; see `context_length`).
        notes: where the preset departs from the published model.
    """

    name: str
    config: ModelConfig | SwitchConfig
    aliases: tuple[str, ...] = ()
    hf_id: str = ""
    context: int = 0
    notes: str = ""

    @property
    def context_length(self) -> int:
        return self.config.max_seq_len if isinstance(self.config, ModelConfig) else self.context

    def build(self, device: str | torch.device = "meta") -> nn.Module:
        """The model, on the meta device by default (shapes only, no memory)."""
        with torch.device(device):
            if isinstance(self.config, SwitchConfig):
                return SwitchTransformer(self.config)
            return MoETransformer(self.config)

    def scaled(self, *, d_model: int = 32, n_layers: int | None = None, num_experts: int = 8,
               vocab_size: int = 128) -> "Preset":
        """The same structure (layer pattern, attention type, routing, options) at a tiny size."""
        if isinstance(self.config, SwitchConfig):
            small: ModelConfig | SwitchConfig = scale_switch(self.config, d_model=d_model, n_layers=n_layers,
                                                             num_experts=num_experts, vocab_size=vocab_size)
        else:
            small = scale_config(self.config, d_model=d_model, n_layers=n_layers, num_experts=num_experts,
                                 vocab_size=vocab_size)
        return replace(self, name=f"{self.name} (scaled)", config=small, aliases=())

    def info(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Counts and costs from the built module (built on meta unless given).

        Keys: name, total_params, active_params (per token, counting embedding and LM head),
        active_params_no_embedding (without both), embedding_params, experts {routed, top_k,
        shared}, layers {total, moe, dense, attention, mamba}, context, flops_per_token (forward;
        Mamba scans and routers' softmax not counted), weight_bytes {bf16, int8, int4}, hf_id, notes.
        """
        model = model if model is not None else self.build()
        cfg = self.config
        if isinstance(cfg, SwitchConfig):
            embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_word_embeddings else 2)
            moe: MoEConfig | None = cfg.moe_config()
            n_enc, n_dec = cfg.num_layers, cfg.decoder_layers
            moe_count = sum(cfg.is_sparse(i, decoder=False) for i in range(n_enc)) + sum(
                cfg.is_sparse(i, decoder=True) for i in range(n_dec))
            layers = {"total": n_enc + n_dec, "encoder": n_enc, "decoder": n_dec, "moe": moe_count,
                      "dense": n_enc + n_dec - moe_count,
                      "attention": n_enc + n_dec, "mamba": 0}
            keys = min(self.context_length, FLOPS_CONTEXT)
            # encoder self-attention, decoder self- and cross-attention: QK^T and AV per key
            attn_flops = 2 * cfg.num_heads * cfg.d_kv * 2 * keys * (n_enc + 2 * n_dec)
            head_flops = 2 * cfg.vocab_size * cfg.d_model
        else:
            embed = embedding_and_head_params(cfg)
            moe = cfg.moe
            moe_ids = layer_ids(cfg.moe_layers, cfg.n_layers)
            attn_ids = layer_ids(cfg.attention_layers, cfg.n_layers)
            layers = {"total": cfg.n_layers, "moe": len(moe_ids), "dense": cfg.n_layers - len(moe_ids),
                      "attention": len(attn_ids), "mamba": cfg.n_layers - len(attn_ids)}
            attn_flops = sum(attention_flops(cfg, i) for i in attn_ids)
            head_flops = 2 * cfg.vocab_size * cfg.d_model
        counts = param_counts(model, embedding_params=embed)
        experts = {"routed": moe.num_experts if moe else 0, "top_k": moe.top_k if moe else 0,
                   "shared": moe.num_shared_experts if moe else 0}
        return {
            "name": self.name,
            "total_params": counts.total,
            "active_params": counts.active,
            "active_params_no_embedding": counts.active_no_embed,
            "embedding_params": counts.embedding,
            "experts": experts,
            "layers": layers,
            "context": self.context_length,
            # 2 FLOPs per multiply-add: matmuls over the active non-embedding weights, the LM head,
            # and attention over min(window, FLOPS_CONTEXT) keys.
            "flops_per_token": 2 * counts.active_no_embed + head_flops + attn_flops,
            "weight_bytes": weight_memory(counts.total),
            "hf_id": self.hf_id,
            "notes": self.notes,
        }


    def layer_table(self, model: nn.Module | None = None) -> list[dict[str, Any]]:
        """One row per top-level piece (embedding, each block, final norm, head) of the built module:
        name, kind, params, active params, and for decoder blocks the mixer's (attention or Mamba)
        and the feed-forward's share of params."""
        model = model if model is not None else self.build()
        rows = []
        if isinstance(self.config, SwitchConfig):
            assert isinstance(model, SwitchTransformer)
            pieces: list[tuple[str, nn.Module, str]] = [("shared", model.shared, "embedding")]
            for stack_name, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
                for i, block in enumerate(stack.block):
                    sparse = self.config.is_sparse(i, decoder=stack_name == "decoder")
                    kind = ("self+cross attention" if stack_name == "decoder" else "self attention") + (
                        f" | MoE {self.config.num_experts}e top-1" if sparse else " | dense MLP")
                    pieces.append((f"{stack_name}.block.{i}", block, kind))
                pieces.append((f"{stack_name}.final_layer_norm", stack.final_layer_norm, "norm"))
            if model.lm_head is not None:
                pieces.append(("lm_head", model.lm_head, "LM head"))
        else:
            assert isinstance(model, MoETransformer)
            cfg = self.config
            pieces = [("model.embed_tokens", model.model.embed_tokens, "embedding")]
            for i, layer in enumerate(model.model.layers):
                pieces.append((f"model.layers.{i}", layer, describe_layer(cfg, i)))
            pieces.append(("model.norm", model.model.norm, "norm"))
            pieces.append(("lm_head", model.lm_head, "LM head (tied)" if cfg.tie_embeddings else "LM head"))
        for name, module, kind in pieces:
            params = count_params(module)
            if kind.startswith("LM head (tied)"):
                params -= module.weight.numel()  # the embedding's matrix, counted above
            row: dict[str, Any] = {"name": name, "kind": kind, "params": params,
                                   "active": params - inactive_expert_params(module)}
            if isinstance(module, DecoderLayer):
                mixer = module.self_attn if module.is_attention else module.mamba
                row.update(mixer_params=count_params(mixer), ffn_params=count_params(module.mlp))
            rows.append(row)
        return rows


def describe_layer(cfg: ModelConfig, i: int) -> str:
    """A one-line description of block i, e.g. 'GQA 32q/8kv, window 128 | MoE 32e top-4'."""
    if cfg.is_attention(i):
        if cfg.mla is not None:
            mixer = f"MLA {cfg.n_heads}h, kv_lora {cfg.mla.kv_lora_rank}"
        else:
            kind = "MHA" if cfg.kv_heads == cfg.n_heads else ("MQA" if cfg.kv_heads == 1 else "GQA")
            mixer = f"{kind} {cfg.n_heads}q/{cfg.kv_heads}kv"
            if cfg.kv_source(i) != i:
                mixer += f", K/V of layer {cfg.kv_source(i)}"
        if cfg.layer_window(i) is not None:
            mixer += f", window {cfg.layer_window(i)}"
        if cfg.layer_chunk(i) is not None:
            mixer += f", chunk {cfg.layer_chunk(i)}"
        if cfg.rope is not None and not cfg.uses_rope(i):
            mixer += ", NoPE"
    else:
        mixer = "Mamba"
    if cfg.is_moe(i):
        assert cfg.moe is not None
        ffn = f"MoE {cfg.moe.num_experts}e top-{cfg.moe.top_k}"
        if cfg.moe.num_shared_experts:
            ffn += f" + {cfg.moe.num_shared_experts} shared"
        if cfg.moe.dense_residual_d_ff:
            ffn += " + dense residual"
        if cfg.moe_parallel:
            ffn = f"{ffn} parallel to attention + residual MLP {cfg.d_ff}"
    else:
        ffn = f"dense MLP {cfg.d_ff}"
    return f"{mixer} | {ffn}"


def attention_flops(cfg: ModelConfig, i: int) -> int:
    """QK^T and AV FLOPs of one token in attention layer i, over min(window, chunk, FLOPS_CONTEXT) keys."""
    keys = min(FLOPS_CONTEXT, cfg.max_seq_len, cfg.layer_window(i) or FLOPS_CONTEXT,
               cfg.layer_chunk(i) or FLOPS_CONTEXT)
    if cfg.mla is not None:
        per_key = cfg.mla.qk_head_dim + cfg.mla.v_head_dim
    else:
        per_key = 2 * cfg.dim_head
    return 2 * cfg.n_heads * per_key * keys


# ---- scaling down --------------------------------------------------------------------------
def _spec_layers(spec: Any) -> int:
    """Fewest layers that still show the pattern of a LayerSpec."""
    if isinstance(spec, tuple):
        return max(spec) + 1 if spec else 1
    if spec.startswith("every:"):
        return int(spec.split(":")[1])
    if spec.startswith("from:"):
        return int(spec.split(":")[1]) + 1
    return 1


def _scale_spec(spec: Any, n_layers: int) -> Any:
    return tuple(i for i in spec if i < n_layers) if isinstance(spec, tuple) else spec


def scale_moe(moe: MoEConfig, *, d_model: int, num_experts: int) -> MoEConfig:
    """A small MoEConfig with the same routing, expert kind and shared/dense parts."""
    E = min(moe.num_experts, num_experts)
    top_k = min(moe.top_k, max(1, E // 2))
    changes: dict[str, Any] = dict(d_model=d_model, d_ff=16, num_experts=E, top_k=top_k)
    if moe.num_groups is not None:
        groups = 4 if E % 4 == 0 and moe.num_groups >= 4 else (2 if E % 2 == 0 else 1)
        kept = min(moe.topk_groups or 1, max(1, groups // 2 + 1), groups)
        changes.update(num_groups=groups, topk_groups=kept)
        per_group = E // groups
        changes["top_k"] = min(top_k, changes["topk_groups"] * per_group)
        if moe.group_score == "top2_sum" and per_group < 2:
            changes.update(num_groups=None, topk_groups=None)
    if moe.shared_d_ff is not None:
        changes["shared_d_ff"] = 16 * max(1, round(moe.shared_d_ff / moe.d_ff))
    if moe.dense_residual_d_ff is not None:
        changes["dense_residual_d_ff"] = 2 * d_model
    if moe.hash_vocab_size is not None:
        changes["hash_vocab_size"] = 128
    return replace(moe, **changes)


def scale_config(cfg: ModelConfig, *, d_model: int = 32, n_layers: int | None = None, num_experts: int = 8,
                 vocab_size: int = 128) -> ModelConfig:
    """A tiny ModelConfig with cfg's structure: layer patterns, attention options, routing."""
    if n_layers is None:
        specs = (cfg.moe_layers, cfg.attention_layers, cfg.sliding_layers, cfg.nope_layers)
        n_layers = max([2, cfg.kv_share_every] + [_spec_layers(s) for s in specs])
        n_layers = min(n_layers, cfg.n_layers)
    n_heads = 4
    group = cfg.n_heads // cfg.kv_heads
    n_kv = max(1, n_heads // group) if cfg.n_kv_heads is not None else None
    head_dim = 8 if cfg.head_dim is not None else None
    rope = cfg.rope
    if rope is not None and rope.scaling == "longrope":
        rot = int((head_dim or d_model // n_heads) * rope.partial_rotary) // 2
        rope = replace(rope, short_factor=(1.0,) * rot, long_factor=(2.0,) * rot)
    mla = None
    if cfg.mla is not None:
        mla = MLAConfig(q_lora_rank=None if cfg.mla.q_lora_rank is None else 16, kv_lora_rank=16,
                        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    moa = None
    if cfg.moa is not None:
        width = (n_kv or n_heads) * (head_dim or d_model // n_heads)
        moa = replace(cfg.moa, d_model=d_model, d_ff=width, num_experts=min(cfg.moa.num_experts, num_experts))
    mamba = None
    if cfg.mamba is not None:
        mamba = replace(cfg.mamba, d_model=d_model, d_state=4, dt_rank=None)
    return replace(
        cfg,
        vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, max_seq_len=min(cfg.max_seq_len, 256),
        d_ff=None if cfg.d_ff is None else 2 * d_model,
        moe=None if cfg.moe is None else scale_moe(cfg.moe, d_model=d_model, num_experts=num_experts),
        moe_layers=_scale_spec(cfg.moe_layers, n_layers),
        attention_layers=_scale_spec(cfg.attention_layers, n_layers),
        sliding_layers=_scale_spec(cfg.sliding_layers, n_layers),
        nope_layers=_scale_spec(cfg.nope_layers, n_layers),
        sliding_window=None if cfg.sliding_window is None else min(cfg.sliding_window, 4),
        attention_chunk=None if cfg.attention_chunk is None else min(cfg.attention_chunk, 4),
        rope=rope, mla=mla, moa=moa, mamba=mamba,
    )


def scale_switch(cfg: SwitchConfig, *, d_model: int = 32, n_layers: int | None = None, num_experts: int = 8,
                 vocab_size: int = 128) -> SwitchConfig:
    steps = [s for s in (cfg.encoder_sparse_step, cfg.decoder_sparse_step) if s > 0]
    n = n_layers if n_layers is not None else max([2] + steps)
    return replace(cfg, vocab_size=vocab_size, d_model=d_model, d_kv=8, num_heads=4, d_ff=2 * d_model,
                   num_layers=n, num_decoder_layers=n, num_experts=min(cfg.num_experts, num_experts),
                   relative_attention_num_buckets=8, relative_attention_max_distance=16)


# ---- the presets ---------------------------------------------------------------------------
def _moe(d: int, d_ff: int, E: int, k: int, **kw: Any) -> MoEConfig:
    return MoEConfig(d_model=d, d_ff=d_ff, num_experts=E, top_k=k, **kw)


def _deepseek_v2(*, vocab: int, d: int, L: int, H: int, q_lora: int | None, d_ff: int, moe_ff: int, E: int,
                 groups: int | None, topk_groups: int | None, scale: float) -> ModelConfig:
    # DeepSeek-V2 config.json: YaRN x40 from 4096 with mscale = mscale_all_dim = 0.707.
    return ModelConfig(
        vocab_size=vocab, d_model=d, n_layers=L, n_heads=H, max_seq_len=163840, d_ff=d_ff, norm_eps=1e-6,
        moe=_moe(d, moe_ff, E, 6, num_shared_experts=2, normalize_topk=False, routed_scaling_factor=scale,
                 num_groups=groups, topk_groups=topk_groups, group_score="max", load_balance_coef=0.001,
                 load_balance_granularity="sequence"),
        moe_layers="from:1",
        mla=MLAConfig(q_lora_rank=q_lora, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                      v_head_dim=128),
        rope=RopeConfig(theta=10000.0, scaling="yarn", factor=40.0, original_max_position=4096, beta_fast=32,
                        beta_slow=1, mscale=0.707, mscale_all_dim=0.707, interleaved=True),
    )


def _deepseek_v3(*, vocab: int, H: int, E: int, first_dense: int, groups: int | None, topk_groups: int | None,
                 scale: float, theta: float, rope_scaling: bool, context: int, eps: float) -> ModelConfig:
    d = 7168
    rope = RopeConfig(theta=theta, interleaved=True)
    if rope_scaling:
        rope = RopeConfig(theta=theta, scaling="yarn", factor=40.0, original_max_position=4096, beta_fast=32,
                          beta_slow=1, mscale=1.0, mscale_all_dim=1.0, interleaved=True)
    return ModelConfig(
        vocab_size=vocab, d_model=d, n_layers=61, n_heads=H, max_seq_len=context, d_ff=18432, norm_eps=eps,
        moe=_moe(d, 2048, E, 8, num_shared_experts=1, score_func="sigmoid", expert_bias=True,
                 normalize_topk=True, routed_scaling_factor=scale, num_groups=groups, topk_groups=topk_groups,
                 group_score="top2_sum", load_balance_coef=0.0001, load_balance_granularity="sequence"),
        moe_layers=f"from:{first_dense}",
        mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                      v_head_dim=128),
        rope=rope,
    )


def _mixtral(*, vocab: int, d: int, L: int, H: int, d_ff: int, context: int, coef: float) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=L, n_heads=H, n_kv_heads=8, head_dim=128,
                       max_seq_len=context, moe=_moe(d, d_ff, 8, 2, load_balance_coef=coef),
                       rope=RopeConfig(theta=1e6))


def _jamba(*, d: int, L: int, H: int, d_ff: int, dt_rank: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=65536, d_model=d, n_layers=L, n_heads=H, n_kv_heads=8, max_seq_len=262144, d_ff=d_ff,
        norm_eps=1e-6, moe=_moe(d, d_ff, 16, 2, load_balance_coef=0.001), moe_layers="every:2:1",
        attention_layers="every:8:4", rope=None,
        mamba=MambaConfig(d_model=d, d_state=16, d_conv=4, expand=2, dt_rank=dt_rank, conv_bias=True,
                          bias=False),
    )


def _qwen2(*, d: int, L: int, H: int, kv: int, moe_ff: int, E: int, k: int, shared: int,
           context: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=151936, d_model=d, n_layers=L, n_heads=H, n_kv_heads=kv, max_seq_len=context,
        norm_eps=1e-6,
        qkv_bias=True, rope=RopeConfig(theta=1e6),
        moe=_moe(d, moe_ff, E, k, normalize_topk=False, num_shared_experts=1, shared_d_ff=shared,
                 shared_expert_gate=True, load_balance_coef=0.001),
    )


def _qwen3(*, d: int, L: int, H: int, moe_ff: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=151936, d_model=d, n_layers=L, n_heads=H, n_kv_heads=4, head_dim=128, max_seq_len=40960,
        norm_eps=1e-6, qk_norm="head", rope=RopeConfig(theta=1e6),
        moe=_moe(d, moe_ff, 128, 8, normalize_topk=True, load_balance_coef=0.001),
    )


def _gpt_oss(*, L: int, E: int) -> ModelConfig:
    d = 2880
    return ModelConfig(
        vocab_size=201088, d_model=d, n_layers=L, n_heads=64, n_kv_heads=8, head_dim=64, max_seq_len=131072,
        qkv_bias=True, o_bias=True, attn_sinks=True, sliding_window=128, sliding_layers="every:2:0",
        rope=RopeConfig(theta=150000.0, scaling="yarn", factor=32.0, original_max_position=4096,
                        beta_fast=32.0, beta_slow=1.0, truncate=False),
        moe=_moe(d, 2880, E, 4, activation="clamped_swiglu", expert_mlp_bias=True, router_bias=True,
                 softmax_after_topk=True),
    )


def _llama4(*, E: int, moe_layers: str, qk_norm: str, context: int, rope: RopeConfig) -> ModelConfig:
    d = 5120
    return ModelConfig(
        vocab_size=202048, d_model=d, n_layers=48, n_heads=40, n_kv_heads=8, head_dim=128,
        max_seq_len=context,
        d_ff=16384, moe=_moe(d, 8192, E, 1, score_func="sigmoid", normalize_topk=False, num_shared_experts=1,
                             load_balance_coef=0.001),
        moe_layers=moe_layers, qk_norm=qk_norm, nope_layers="every:4", rope=rope,  # type: ignore[arg-type]
        attention_chunk=8192,
    )


def _granite(*, vocab: int, d: int, L: int, H: int, E: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab, d_model=d, n_layers=L, n_heads=H, n_kv_heads=8, max_seq_len=4096, norm_eps=1e-6,
        tie_embeddings=True, embedding_multiplier=12.0, attn_scale=0.015625, residual_multiplier=0.22,
        logits_scaling=6.0, rope=RopeConfig(theta=10000.0),
        moe=_moe(d, 512, E, 8, load_balance_coef=0.001),
    )


def _presets() -> list[Preset]:
    P = Preset
    return [
        P("Switch-C 2048", SwitchConfig(
            vocab_size=32128, d_model=2080, d_kv=64, num_heads=30, d_ff=6144, num_layers=15,
            num_decoder_layers=15,
            num_experts=2048, expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1,
            router_jitter_noise=0.01, tie_word_embeddings=False),
          ("switch-c", "switch-c-2048"), "google/switch-c-2048", context=512,
          notes="15 + 15 layers as the t5x gin (HF config says 12 decoder layers); untied output "
          "layer as the gin; "
          "context = the 512-token pretraining inputs (relative positions have no hard limit)."),
        P("Switch-Base-8", SwitchConfig(
            vocab_size=32128, d_model=768, d_kv=64, num_heads=12, d_ff=3072, num_layers=12,
            num_decoder_layers=12,
            num_experts=8, expert_capacity=64, encoder_sparse_step=2, decoder_sparse_step=2),
          ("switch-base-8", "switch-base"), "google/switch-base-8", context=512,
          notes="context = 512-token pretraining inputs."),
        P("GLaM (64B/64E)", ModelConfig(
            vocab_size=256000, d_model=8192, n_layers=64, n_heads=128, head_dim=128, max_seq_len=1024,
            d_ff=32768, ffn_activation="geglu", tie_embeddings=True, rope=None,
            moe=_moe(8192, 32768, 64, 2, activation="gelu", load_balance_coef=0.01), moe_layers="every:2"),
          ("glam", "glam-64b-64e"), "",
          "Per-layer relative position bias not modelled (no positional encoding); MoE on odd layers; "
          "context 1024 (the paper's training length)."),
        P("Grok-1", ModelConfig(
            vocab_size=131072, d_model=6144, n_layers=64, n_heads=48, n_kv_heads=8, head_dim=128,
            max_seq_len=8192,
            post_norms=True, tie_embeddings=True, embedding_multiplier=78.38367176906169,
            logits_scaling=1 / 0.5773502691896257, attn_scale=0.08838834764831845, attn_logit_softcap=30.0,
            rope=RopeConfig(theta=10000.0), moe=_moe(6144, 32768, 8, 2, activation="geglu")),
          ("grok-1", "grok"), "xai-org/grok-1",
          "Attention logits soft-capped at 30 and tanh-approximate GELU in the gated experts, as "
          "xai-org/grok-1's model.py (jax.nn.gelu's default)."),
        P("DBRX", ModelConfig(
            vocab_size=100352, d_model=6144, n_layers=40, n_heads=48, n_kv_heads=8, max_seq_len=32768,
            norm="layernorm", clip_qkv=8.0, rope=RopeConfig(theta=500000.0),
            moe=_moe(6144, 10752, 16, 4, jitter_eps=0.01, load_balance_coef=0.05)),
          ("dbrx", "dbrx-base"), "databricks/dbrx-base", "Fused Wqkv kept as separate q/k/v projections."),
        P("Mixtral 8x7B", _mixtral(vocab=32000, d=4096, L=32, H=32, d_ff=14336, context=32768, coef=0.02),
          ("mixtral-8x7b", "mixtral"), "mistralai/Mixtral-8x7B-v0.1"),
        P("Mixtral 8x22B", _mixtral(vocab=32768, d=6144, L=56, H=48, d_ff=16384, context=65536, coef=0.001),
          ("mixtral-8x22b",), "mistralai/Mixtral-8x22B-v0.1"),
        P("Snowflake Arctic", ModelConfig(
            vocab_size=32000, d_model=7168, n_layers=35, n_heads=56, n_kv_heads=8, max_seq_len=4096,
            rope=RopeConfig(theta=10000.0), d_ff=7168, moe_parallel=True,
            moe=_moe(7168, 4864, 128, 2, load_balance_coef=0.001)),
          ("arctic", "snowflake-arctic"), "Snowflake/snowflake-arctic-base",
          "Dropless routing instead of capacity factor 1."),
        P("Skywork-MoE", ModelConfig(
            vocab_size=65532, d_model=4608, n_layers=52, n_heads=36, n_kv_heads=36, max_seq_len=8192,
            norm_eps=1e-6,
            rope=RopeConfig(theta=10000.0), moe=_moe(4608, 12288, 16, 2)),
          ("skywork-moe", "skywork"), "Skywork/Skywork-MoE-Base",
          "Gating logit normalisation (moe_use_logits_norm) not modelled: plain softmax top-2 router."),
        P("Jamba 1.5 Large", _jamba(d=8192, L=72, H=64, d_ff=24576, dt_rank=512),
          ("jamba-1.5-large", "jamba-large"), "ai21labs/AI21-Jamba-1.5-Large"),
        P("Jamba 1.5 Mini", _jamba(d=4096, L=32, H=32, d_ff=14336, dt_rank=256),
          ("jamba-1.5-mini", "jamba-mini", "jamba"), "ai21labs/AI21-Jamba-1.5-Mini"),
        P("DeepSeek-V2", _deepseek_v2(vocab=102400, d=5120, L=60, H=128, q_lora=1536, d_ff=12288, moe_ff=1536,
                                      E=160, groups=8, topk_groups=3, scale=16.0),
          ("deepseek-v2",), "deepseek-ai/DeepSeek-V2",  "YaRN parameters from the DeepSeek-V2 config.json."),
        P("DeepSeek-V2.5", _deepseek_v2(vocab=102400, d=5120, L=60, H=128, q_lora=1536, d_ff=12288,
                                        moe_ff=1536,
                                        E=160, groups=8, topk_groups=3, scale=16.0),
          ("deepseek-v2.5",), "deepseek-ai/DeepSeek-V2.5",  "Same architecture as DeepSeek-V2."),
        P("DeepSeek-V2-Lite", _deepseek_v2(vocab=102400, d=2048, L=27, H=16, q_lora=None, d_ff=10944,
                                           moe_ff=1408,
                                           E=64, groups=None, topk_groups=None, scale=1.0),
          ("deepseek-v2-lite",), "deepseek-ai/DeepSeek-V2-Lite"),
        P("DeepSeek-V3", _deepseek_v3(vocab=129280, H=128, E=256, first_dense=3, groups=8, topk_groups=4,
                                      scale=2.5, theta=10000.0, rope_scaling=True, context=163840, eps=1e-6),
          ("deepseek-v3",), "deepseek-ai/DeepSeek-V3", 
          "The multi-token-prediction module (num_nextn_predict_layers=1, ~14B) is not built."),
        P("Hunyuan-Large", ModelConfig(
            vocab_size=128512, d_model=6400, n_layers=64, n_heads=80, n_kv_heads=8, max_seq_len=262144,
            tie_embeddings=True, kv_share_every=2, qk_norm="head_after_rope",
            rope=RopeConfig(theta=10000.0, scaling="ntk_alpha", factor=100000.0),
            moe=_moe(6400, 18304, 16, 1, num_shared_experts=1)),
          ("hunyuan-large", "hunyuan"), "tencent/Tencent-Hunyuan-Large",
          "Dropless routing (the config's capacity factor 1.0 is not applied)."),
        P("Qwen1.5-MoE-A2.7B", _qwen2(d=2048, L=24, H=16, kv=16, moe_ff=1408, E=60, k=4, shared=5632,
                                      context=8192),
          ("qwen1.5-moe", "qwen1.5-moe-a2.7b"), "Qwen/Qwen1.5-MoE-A2.7B"),
        P("Qwen2-57B-A14B", _qwen2(d=3584, L=28, H=28, kv=4, moe_ff=2560, E=64, k=8, shared=20480,
                                   context=131072),
          ("qwen2-57b", "qwen2-57b-a14b", "qwen2-moe"), "Qwen/Qwen2-57B-A14B"),
        P("Qwen3-30B-A3B", _qwen3(d=2048, L=48, H=32, moe_ff=768),
          ("qwen3-30b", "qwen3-30b-a3b", "qwen3-moe"), "Qwen/Qwen3-30B-A3B"),
        P("Qwen3-235B-A22B", _qwen3(d=4096, L=94, H=64, moe_ff=1536),
          ("qwen3-235b", "qwen3-235b-a22b"), "Qwen/Qwen3-235B-A22B"),
        P("OLMoE-1B-7B", ModelConfig(
            vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, max_seq_len=4096, qk_norm="full",
            rope=RopeConfig(theta=10000.0),
            moe=_moe(2048, 1024, 64, 8, normalize_topk=False, load_balance_coef=0.01)),
          ("olmoe", "olmoe-1b-7b"), "allenai/OLMoE-1B-7B-0924"),
        P("gpt-oss-20b", _gpt_oss(L=24, E=32), ("gpt-oss-20b",), "openai/gpt-oss-20b", 
          "Model card counts the LM head but not the embedding in 'active'."),
        P("gpt-oss-120b", _gpt_oss(L=36, E=128), ("gpt-oss-120b", "gpt-oss"), "openai/gpt-oss-120b",
          "Model card counts the LM head but not the embedding in 'active'."),
        P("Llama 4 Scout", _llama4(E=16, moe_layers="all", qk_norm="l2", context=10485760, rope=RopeConfig(
            theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position=8192)),
          ("llama4-scout", "llama-4-scout"), "meta-llama/Llama-4-Scout-17B-16E",
          "Text model only; NoPE layers' attention temperature tuning not modelled; the router's "
          "sigmoid weight scales the expert output (Llama 4 scales its input)."),
        P("Llama 4 Maverick", _llama4(E=128, moe_layers="every:2", qk_norm="none", context=1048576,
                                      rope=RopeConfig(theta=500000.0)),
          ("llama4-maverick", "llama-4-maverick"), "meta-llama/Llama-4-Maverick-17B-128E",
          "Text model only; NoPE layers' attention temperature tuning not modelled; the router's "
          "sigmoid weight scales the expert output (Llama 4 scales its input)."),
        P("Kimi K2", _deepseek_v3(vocab=163840, H=64, E=384, first_dense=1, groups=None, topk_groups=None,
                                  scale=2.827, theta=50000.0, rope_scaling=False, context=131072, eps=1e-5),
          ("kimi-k2",), "moonshotai/Kimi-K2-Base", 
          "MLA dims as DeepSeek-V3; context 128K from the model card (the spec gives no max_position)."),
        P("Phi-3.5-MoE", ModelConfig(
            vocab_size=32064, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=131072,
            norm="layernorm", norm_bias=True, qkv_bias=True, o_bias=True, lm_head_bias=True,
            rope=RopeConfig(theta=10000.0),
            moe=_moe(4096, 6400, 16, 2, router="sparsemixer", load_balance_coef=0.0)),
          ("phi-3.5-moe", "phimoe"), "microsoft/Phi-3.5-MoE-instruct",
          "LongRoPE tables not included (plain RoPE); SparseMixer router with its inference-time "
          "routing (training uses the same forward, not Gumbel sampling)."),
        P("JetMoE-8B", ModelConfig(
            vocab_size=32000, d_model=2048, n_layers=24, n_heads=32, n_kv_heads=16, head_dim=128,
            max_seq_len=4096, tie_embeddings=True, rope=RopeConfig(theta=10000.0),
            moa=_moe(2048, 2048, 8, 2, softmax_after_topk=True),
            moe=_moe(2048, 5632, 8, 2, softmax_after_topk=True)),
          ("jetmoe", "jetmoe-8b"), "jetmoe/jetmoe-8b",
          "The MLP MoE's d-sized output bias is not modelled (2048 params per layer)."),
        P("Granite 3.0 1B-A400M", _granite(vocab=49152, d=1024, L=24, H=16, E=32),
          ("granite-1b", "granite-3.0-1b-a400m"), "ibm-granite/granite-3.0-1b-a400m-base"),
        P("Granite 3.0 3B-A800M", _granite(vocab=49155, d=1536, L=32, H=24, E=40),
          ("granite-3b", "granite-3.0-3b-a800m"), "ibm-granite/granite-3.0-3b-a800m-base"),
    ]


PRESETS: dict[str, Preset] = {p.name: p for p in _presets()}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", name.lower())


def names() -> list[str]:
    return list(PRESETS)


def get(name: str) -> Preset:
    """A preset by its exact name, an alias, or either up to case and punctuation."""
    if name in PRESETS:
        return PRESETS[name]
    key = _key(name)
    for preset in PRESETS.values():
        if key == _key(preset.name) or key in {_key(a) for a in preset.aliases}:
            return preset
    close = [p.name for p in PRESETS.values() if key and (key in _key(p.name) or _key(p.name) in key)]
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"no catalog preset named {name!r}{hint or '.'} Known: {', '.join(PRESETS)}")


__all__ = ["PRESETS", "Preset", "get", "names", "scale_config", "scale_moe"]
