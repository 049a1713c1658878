"""Configuration of a decoder-only MoE transformer: `ModelConfig` and its nested parts.

Frozen, keyword-only dataclasses that validate themselves; `num_params`/`active_params` count the
module the config builds, on the meta device (model/accounting.py). Per-layer choices (MoE or dense feed-forward, attention
or Mamba, sliding window, NoPE) are each one `LayerSpec` field, resolved by `layer_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from moekit.config import JsonConfig, MoEConfig, check, check_bools, check_choice, check_real
from moekit.model.mamba import MambaConfig
from moekit.traits import ACTIVATIONS, decoder_router_error

# Which layers a per-layer choice applies to: "all", "none", "every:N" (layers N-1, 2N-1, ...: the
# transformers `sparse_step` / `interleave_step` convention), "every:N:O" (layers i with i % N == O,
# Jamba's period/offset), "from:K" (layers K..L-1: DeepSeek's first K dense) or explicit indices.
LayerSpec = str | tuple[int, ...]
ROPE_SCALINGS = ("none", "linear", "dynamic", "ntk_alpha", "yarn", "llama3", "longrope")
NORMS = ("rmsnorm", "layernorm")
QK_NORMS = ("none", "head", "head_after_rope", "full", "l2")
FFN_ACTIVATIONS = ACTIVATIONS


def layer_ids(spec: LayerSpec, n_layers: int, field_name: str = "layers") -> tuple[int, ...]:
    """The layer indices a `LayerSpec` selects, sorted. Raises ValueError naming `field_name`."""
    help_text = ("must be 'all', 'none', 'every:N', 'every:N:O', 'from:K' or a tuple of layer "
                 f"indices in [0, {n_layers})")
    if isinstance(spec, (tuple, list)):
        ids = tuple(spec)
        check(all(isinstance(i, int) and not isinstance(i, bool) for i in ids), field_name, spec, help_text)
        check(len(ids) <= n_layers, field_name, spec,
              f"lists {len(ids)} layers but the model has n_layers={n_layers}")
        check(len(set(ids)) == len(ids), field_name, spec, "has repeated layer indices")
        check(all(0 <= i < n_layers for i in ids), field_name, spec, help_text)
        return tuple(sorted(ids))
    check(isinstance(spec, str), field_name, spec, help_text)
    if spec == "all":
        return tuple(range(n_layers))
    if spec == "none":
        return ()
    kind, _, rest = spec.partition(":")
    try:
        nums = [int(p) for p in rest.split(":")] if rest else []
    except ValueError:
        nums = []
    if kind == "every" and len(nums) in (1, 2) and nums[0] >= 1:
        step = nums[0]
        offset = nums[1] if len(nums) == 2 else step - 1
        check(0 <= offset < step, field_name, spec, "offset O of 'every:N:O' must be in [0, N)")
        return tuple(i for i in range(n_layers) if i % step == offset)
    if kind == "from" and len(nums) == 1 and nums[0] >= 0:
        check(nums[0] <= n_layers, field_name, spec, f"K must be <= n_layers={n_layers}")
        return tuple(range(nums[0], n_layers))
    check(False, field_name, spec, help_text)
    return ()


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary position embedding and its context-extension variants.

    Attributes:
        theta: base wavelength.
        scaling: "none"; "linear" (positions / factor); "dynamic" (NTK base growth past
            `original_max_position`, as transformers' dynamic type); "ntk_alpha" (static NTK base *
            alpha^(d/(d-2)), Hunyuan); "yarn" (Peng et al. 2023; DeepSeek-V3, gpt-oss); "llama3"
            (Llama 3.1 / 4 wavelength bands); "longrope" (Phi-3.5 per-dimension factors).
        factor: context extension factor (linear, dynamic, yarn, llama3); alpha for ntk_alpha.
        original_max_position: pre-extension context (dynamic, yarn, llama3, longrope).
        beta_fast / beta_slow / mscale / mscale_all_dim / attention_factor / truncate: YaRN's knobs
            with transformers' meaning; `mscale_all_dim` also rescales the softmax (DeepSeek).
        low_freq_factor / high_freq_factor: llama3 bands.
        short_factor / long_factor / short_mscale / long_mscale: longrope tables and cos/sin scales.
        partial_rotary: fraction of each head's dims that rotate (the rest pass through).
        interleaved: rotate pairs (x0, x1), (x2, x3) (DeepSeek's layout) instead of halves.
    "dynamic" and "longrope" depend on the length seen so far; as in transformers, cached keys keep
    the rotation they were made with, so decoding past the switch point differs from one full
    forward (every other scaling decodes exactly).
    """

    theta: float = 10000.0
    scaling: Literal["none", "linear", "dynamic", "ntk_alpha", "yarn", "llama3", "longrope"] = "none"
    factor: float = 1.0
    original_max_position: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    short_mscale: float | None = None
    long_mscale: float | None = None
    partial_rotary: float = 1.0
    interleaved: bool = False

    def __post_init__(self) -> None:
        check_choice(self.scaling, "rope.scaling", ROPE_SCALINGS)
        check_real(self, "theta", positive=True, prefix="rope.")
        check_real(self, "factor", positive=True, prefix="rope.")
        check_real(self, "partial_rotary", positive=True, prefix="rope.")
        check_bools(self, ("truncate", "interleaved"), prefix="rope.")
        check(0 < self.partial_rotary <= 1, "rope.partial_rotary", self.partial_rotary, "must be in (0, 1]")
        if self.scaling in ("yarn", "llama3", "longrope"):
            check(self.original_max_position is not None, "rope.original_max_position", None,
                  f"scaling={self.scaling!r} needs the pre-extension context length")
        if self.scaling == "llama3":
            check(self.high_freq_factor > self.low_freq_factor, "rope.high_freq_factor",
                  self.high_freq_factor, f"must be > low_freq_factor={self.low_freq_factor}")
        if self.scaling == "longrope":
            check(self.short_factor is not None and self.long_factor is not None, "rope.short_factor",
                  self.short_factor, "longrope needs short_factor and long_factor (one per rotary pair)")


@dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 sec. 2.1): K and V come from a shared low-rank latent.

    Attributes:
        q_lora_rank: rank of the query down-projection, or None for a plain q_proj (V2-Lite).
        kv_lora_rank: width of the cached KV latent.
        qk_nope_head_dim / qk_rope_head_dim: per-head query/key dims without / with RoPE; the RoPE
            key part is one head shared by all heads (decoupled RoPE, eq. 14).
        v_head_dim: per-head value dim.
    """

    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            check(_positive_int(getattr(self, name)), f"mla.{name}", getattr(self, name),
                  "must be a positive integer")
        check(self.qk_rope_head_dim % 2 == 0, "mla.qk_rope_head_dim", self.qk_rope_head_dim, "must be even")
        check(self.q_lora_rank is None or _positive_int(self.q_lora_rank), "mla.q_lora_rank",
              self.q_lora_rank, "must be a positive integer or None")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True, kw_only=True)
class ModelConfig(JsonConfig):
    """A decoder-only language model: embedding, L blocks, final norm, LM head.

    Shape: vocab_size, d_model, n_layers; n_heads query heads and n_kv_heads key/value heads
    (None = n_heads; GQA when fewer) of head_dim (None = d_model // n_heads); max_seq_len is the
    context length (also the reference length of dynamic RoPE).
    Feed-forward: `moe` (an MoEConfig) on the layers `moe_layers` selects; the other layers get a
    dense MLP of width d_ff with `ffn_activation` (biases if mlp_bias). moe_parallel (Snowflake
    Arctic): MoE layers run the MoE on the block input in parallel with attention, plus a dense
    residual MLP of width d_ff (with its own norm) after attention.
    Mixers: `attention_layers` are attention, the rest Mamba (`mamba` config, Jamba).
    Attention options: qkv_bias / o_bias; qk_norm "head" (RMSNorm per head before RoPE, Qwen3),
    "head_after_rope" (the same after RoPE, Hunyuan), "full" (over the whole q and k projections,
    OLMoE), "l2" (parameter-free, after RoPE, Llama 4); clip_qkv (DBRX, OLMoE);
    sliding_window on `sliding_layers`; attn_sinks (gpt-oss); kv_share_every (cross-layer KV
    sharing, Hunyuan-Large CLA: layer i reuses the K/V of layer i - i % n); attn_scale (None =
    head_dim^-0.5; Granite's attention_multiplier); attn_logit_softcap (Grok-1: c * tanh(x / c));
    rope (None = no positions, Jamba) except on `nope_layers`; attention_chunk (Llama 4): layers
    that use RoPE attend only within aligned chunks of this many tokens (NoPE layers stay global,
    as transformers' Llama 4 pairs them); mla for latent attention; moa for
    JetMoE's mixture of attention heads (router and experts from this MoEConfig; each expert owns q
    and o projections of width d_ff = n_kv_heads * head_dim, K/V are shared; n_heads = top_k *
    n_kv_heads).
    Norms: "rmsnorm" or "layernorm" (norm_bias); post_norms adds a norm after the attention and
    the feed-forward outputs (Grok-1's sandwich).
    Multipliers (Granite, Grok-1): embeddings * embedding_multiplier; each residual branch *
    residual_multiplier; logits / logits_scaling.
    Head: tie_embeddings shares the embedding matrix; lm_head_bias (Phi-3.5-MoE).
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    max_seq_len: int = 4096
    # feed-forward
    d_ff: int | None = None
    ffn_activation: Literal["swiglu", "geglu", "clamped_swiglu", "gelu", "relu", "silu"] = "swiglu"
    mlp_bias: bool = False
    moe: MoEConfig | None = None
    moe_layers: LayerSpec = "all"
    moe_parallel: bool = False
    # mixers
    attention_layers: LayerSpec = "all"
    mamba: MambaConfig | None = None
    # attention
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: Literal["none", "head", "head_after_rope", "full", "l2"] = "none"
    clip_qkv: float | None = None
    sliding_window: int | None = None
    sliding_layers: LayerSpec = "all"
    attn_sinks: bool = False
    kv_share_every: int = 1
    attn_scale: float | None = None
    attn_logit_softcap: float | None = None
    rope: RopeConfig | None = RopeConfig()
    nope_layers: LayerSpec = "none"
    attention_chunk: int | None = None
    mla: MLAConfig | None = None
    moa: MoEConfig | None = None
    # norms
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = False
    post_norms: bool = False
    # multipliers
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # head
    tie_embeddings: bool = False
    lm_head_bias: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            check(_positive_int(value), name, value, "must be a positive integer")
        for name in ("n_kv_heads", "head_dim", "d_ff", "sliding_window", "attention_chunk"):
            value = getattr(self, name)
            check(value is None or _positive_int(value), name, value, "must be a positive integer or None")
        check(_positive_int(self.kv_share_every), "kv_share_every", self.kv_share_every,
              "must be a positive integer (1 = no sharing)")
        check_choice(self.norm, "norm", NORMS)
        check_choice(self.qk_norm, "qk_norm", QK_NORMS)
        check_choice(self.ffn_activation, "ffn_activation", FFN_ACTIVATIONS)
        check_real(self, "norm_eps", positive=True)
        check_bools(self, ("mlp_bias", "moe_parallel", "qkv_bias", "o_bias", "attn_sinks", "norm_bias",
                           "post_norms", "tie_embeddings", "lm_head_bias"))
        check(not self.norm_bias or self.norm == "layernorm", "norm_bias", self.norm_bias,
              "only norm='layernorm' has a bias")
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            check_real(self, name, positive=True)
        for name in ("clip_qkv", "attn_scale", "attn_logit_softcap"):
            check_real(self, name, positive=True, optional=True)
        self._check_heads()
        self._check_layers()

    def _check_heads(self) -> None:
        if self.head_dim is None:
            check(self.d_model % self.n_heads == 0, "n_heads", self.n_heads,
                  f"must divide d_model={self.d_model} (or set head_dim explicitly)")
        kv = self.kv_heads
        check(kv <= self.n_heads and self.n_heads % kv == 0, "n_kv_heads", self.n_kv_heads,
              f"must divide n_heads={self.n_heads}")
        if self.rope is not None and self.mla is None:
            rot = int(self.dim_head * self.rope.partial_rotary)
            check(rot >= 2 and rot % 2 == 0, "rope.partial_rotary", self.rope.partial_rotary,
                  f"must rotate an even number of the head_dim={self.dim_head} dims (got {rot})")
        if self.moa is not None:
            check(self.moa.d_model == self.d_model, "moa.d_model", self.moa.d_model,
                  f"must equal d_model={self.d_model}")
            check(self.moa.router == "topk", "moa.router", self.moa.router,
                  "mixture of attention needs 'topk'")
            check(self.moa.d_ff == kv * self.dim_head, "moa.d_ff", self.moa.d_ff,
                  f"is each attention expert's q/o width and must equal n_kv_heads * head_dim = "
                  f"{kv * self.dim_head}")
            check(self.n_heads == self.moa.top_k * kv, "n_heads", self.n_heads,
                  f"with moa, must equal moa.top_k * n_kv_heads = {self.moa.top_k * kv}")
            for name, default in (("mla", None), ("qk_norm", "none"), ("attn_sinks", False),
                                  ("clip_qkv", None), ("kv_share_every", 1), ("qkv_bias", False),
                                  ("o_bias", False)):
                check(getattr(self, name) == default, name, getattr(self, name),
                      "is not supported together with moa")
        if self.mla is not None:
            check(self.n_kv_heads in (None, self.n_heads), "n_kv_heads", self.n_kv_heads,
                  "multi-head latent attention (mla) has one K/V head per query head; leave it None")
            for name, default in (("qk_norm", "none"), ("attn_sinks", False), ("clip_qkv", None),
                                  ("kv_share_every", 1), ("qkv_bias", False), ("o_bias", False)):
                check(getattr(self, name) == default, name, getattr(self, name),
                      "is not supported together with mla")

    def _check_layers(self) -> None:
        L = self.n_layers
        moe_ids = layer_ids(self.moe_layers, L, "moe_layers")
        attn_ids = layer_ids(self.attention_layers, L, "attention_layers")
        layer_ids(self.sliding_layers, L, "sliding_layers")
        layer_ids(self.nope_layers, L, "nope_layers")
        if self.moe is None:
            check(not moe_ids, "moe_layers", self.moe_layers, "selects MoE layers but moe is None; "
                  "give an MoEConfig or set moe_layers='none'")
        else:
            check(self.moe.d_model == self.d_model, "moe.d_model", self.moe.d_model,
                  f"must equal d_model={self.d_model}")
            not_causal = decoder_router_error(self.moe.router)
            check(not_causal is None, "moe.router", self.moe.router, str(not_causal))
        if self.moe_parallel:
            check(self.moe is not None and self.d_ff is not None, "moe_parallel", True,
                  "needs moe (the parallel MoE) and d_ff (the width of the dense residual MLP)")
            check(not self.post_norms, "post_norms", True, "is not supported together with moe_parallel")
        if len(moe_ids) < L:
            check(self.d_ff is not None, "d_ff", None, f"layers {sorted(set(range(L)) - set(moe_ids))[:8]} "
                  "have a dense feed-forward, which needs d_ff")
        if len(attn_ids) < L:
            check(self.mamba is not None, "mamba", None, "attention_layers leaves Mamba layers, which "
                  "need a MambaConfig")
            assert self.mamba is not None
            check(self.mamba.d_model == self.d_model, "mamba.d_model", self.mamba.d_model,
                  f"must equal d_model={self.d_model}")
        if self.kv_share_every > 1:
            for i in attn_ids:
                src = i - i % self.kv_share_every
                check(src in attn_ids, "kv_share_every", self.kv_share_every,
                      f"layer {i} would share K/V with layer {src}, which is not an attention layer")

    # ---- derived facts -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Dims of each query/key head that RoPE rotates (MLA: the decoupled RoPE part)."""
        if self.mla is not None:
            return self.mla.qk_rope_head_dim
        return int(self.dim_head * (self.rope.partial_rotary if self.rope is not None else 1.0))

    def is_moe(self, i: int) -> bool:
        return i in layer_ids(self.moe_layers, self.n_layers)

    def is_attention(self, i: int) -> bool:
        return i in layer_ids(self.attention_layers, self.n_layers)

    def layer_window(self, i: int) -> int | None:
        """Sliding window of layer i (None = full causal attention)."""
        in_sliding = i in layer_ids(self.sliding_layers, self.n_layers)
        return self.sliding_window if in_sliding else None

    def layer_chunk(self, i: int) -> int | None:
        """Attention chunk of layer i (None = unchunked): RoPE layers when attention_chunk is set."""
        return self.attention_chunk if self.uses_rope(i) else None

    def uses_rope(self, i: int) -> bool:
        return self.rope is not None and i not in layer_ids(self.nope_layers, self.n_layers)

    def kv_source(self, i: int) -> int:
        """The layer whose keys and values layer i attends over (itself unless KV is shared)."""
        return i - i % self.kv_share_every

    # ---- parameter counts (of the module this config builds, on the meta device) ----------
    # ---- serialisation -------------------------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """From `to_dict`'s output (or its JSON): nested configs and layer lists restored."""
        cls.check_fields(data)
        data = dict(data)
        nested = {"moe": MoEConfig, "moa": MoEConfig, "rope": RopeConfig, "mla": MLAConfig,
                  "mamba": MambaConfig}
        for name, sub in nested.items():
            if isinstance(data.get(name), dict):
                data[name] = sub.from_dict(data[name]) if hasattr(sub, "from_dict") else sub(
                    **_tuples(data[name]))
        for name in ("moe_layers", "attention_layers", "sliding_layers", "nope_layers"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        return cls(**data)


def _tuples(d: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples the frozen configs hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
