"""Switch Transformer (Fedus et al. 2021): a T5-style encoder-decoder with top-1 MoE layers.

T5 pieces: RMS-style LayerNorm without bias, no biases anywhere, unscaled attention with a bucketed
relative position bias computed in the first layer of each stack and shared, ReLU MLPs. Every
`*_sparse_step`-th feed-forward is a moekit MoELayer (top-1, fixed capacity per sequence). Names
mirror transformers' SwitchTransformersForConditionalGeneration (encoder.block.{i}.layer.{j}...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig, check, check_choice
from moekit.experts.activations import plain
from moekit.layer import MoELayer
from moekit.model.norm import RMSNorm
from moekit.types import ModelOutput, RoutingDecision

# Letters beyond the legend in moekit.types: Q query positions, K key positions, P past length,
# A head dim d_kv, U relative-position buckets.


@dataclass(frozen=True, kw_only=True)
class SwitchConfig:
    """A Switch Transformer; fields follow transformers' SwitchTransformersConfig.

    Differences: sparse layers are given by `encoder_sparse_step` / `decoder_sparse_step` (0: none,
    1: every layer, k: layers i with i % k == 1, transformers' placement) instead of the number of
    sparse layers; `capacity_factor` may replace the fixed `expert_capacity` (both None: dropless).
    """

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_decoder_layers: int | None = None  # None: as many as num_layers
    num_heads: int = 12
    num_experts: int = 8
    expert_capacity: int | None = 64  # slots per expert in each sequence
    capacity_factor: float | None = None
    encoder_sparse_step: int = 2
    decoder_sparse_step: int = 2
    router_bias: bool = False
    router_jitter_noise: float = 0.01
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    router_z_loss_coef: float = 0.001
    router_aux_loss_coef: float = 0.001
    dense_act_fn: Literal["relu", "gelu", "silu"] = "relu"
    tie_word_embeddings: bool = True
    pad_token_id: int = 0
    decoder_start_token_id: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                     "num_experts", "relative_attention_num_buckets",
                     "relative_attention_max_distance"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value,
                  "must be a positive integer")
        check(self.num_decoder_layers is None or (isinstance(self.num_decoder_layers, int)
                                                  and self.num_decoder_layers >= 1),
              "num_decoder_layers", self.num_decoder_layers, "must be a positive integer or None")
        for name in ("encoder_sparse_step", "decoder_sparse_step"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, name, value,
                  "must be an integer >= 0 (0: no sparse layers, 1: all, k: layers i % k == 1)")
        check(self.relative_attention_num_buckets >= 4, "relative_attention_num_buckets",
              self.relative_attention_num_buckets, "must be >= 4 (half exact, half log-spaced, "
              "and halved again for the encoder's two directions)")
        check_choice(self.dense_act_fn, "dense_act_fn", ("relu", "gelu", "silu"))
        check(0 <= self.dropout_rate < 1, "dropout_rate", self.dropout_rate, "must be in [0, 1)")
        check(self.layer_norm_epsilon > 0, "layer_norm_epsilon", self.layer_norm_epsilon, "must be > 0")
        for name in ("pad_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            check(isinstance(value, int) and 0 <= value < self.vocab_size, name, value,
                  f"must be a token id in [0, vocab_size={self.vocab_size})")
        check(self.expert_capacity is None or (isinstance(self.expert_capacity, int)
                                               and self.expert_capacity >= 1),
              "expert_capacity", self.expert_capacity, "must be a positive integer or None")
        check(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor",
              self.capacity_factor, "must be > 0 or None")
        check(self.expert_capacity is None or self.capacity_factor is None, "capacity_factor",
              self.capacity_factor, "set either expert_capacity or capacity_factor (or neither "
              "for dropless routing), not both")
        check(0 <= self.router_jitter_noise < 1, "router_jitter_noise", self.router_jitter_noise,
              "must be in [0, 1)")
        for name in ("router_z_loss_coef", "router_aux_loss_coef"):
            check(getattr(self, name) >= 0, name, getattr(self, name), "must be >= 0")

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers if self.num_decoder_layers is not None else self.num_layers

    def is_sparse(self, i: int, *, decoder: bool) -> bool:
        """transformers' placement: every layer for step 1, layers with i % step == 1 otherwise."""
        step = self.decoder_sparse_step if decoder else self.encoder_sparse_step
        return step == 1 or (step > 1 and i % step == 1)

    def moe_config(self) -> MoEConfig:
        """The top-1 MoE feed-forward: softmax probabilities, the chosen one scales the expert."""
        return MoEConfig(
            d_model=self.d_model, d_ff=self.d_ff, num_experts=self.num_experts, top_k=1,
            router="topk", normalize_topk=False, router_bias=self.router_bias,
            jitter_eps=self.router_jitter_noise, capacity_factor=self.capacity_factor,
            expert_capacity=self.expert_capacity, capacity_group="sequence",
            drop_policy="position", activation=self.dense_act_fn,
            load_balance_coef=self.router_aux_loss_coef, z_loss_coef=self.router_z_loss_coef,
            load_balance_granularity="sequence",
        )

def relative_position_bucket(rel_QK: Tensor, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """T5's bucket of each relative position (key - query): exact up to num_buckets / 2 (per
    direction), log-spaced beyond, everything past max_distance in the last bucket. Long (Q, K)."""
    buckets = torch.zeros_like(rel_QK)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel_QK > 0).long() * num_buckets
        rel_QK = rel_QK.abs()
    else:
        rel_QK = -torch.clamp(rel_QK, max=0)  # the decoder only sees the past
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel_QK.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return buckets + torch.where(rel_QK < max_exact, rel_QK, large)


class Attention(nn.Module):
    """T5 attention: q, k, v, o without biases, no 1/sqrt(d) scaling, an additive bias per head."""

    def __init__(self, config: SwitchConfig, *, relative_bias: bool, decoder: bool) -> None:
        super().__init__()
        D, inner = config.d_model, config.num_heads * config.d_kv
        self.config, self.decoder = config, decoder
        self.q, self.k, self.v = (nn.Linear(D, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, D, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets,
                                                        config.num_heads)

    def compute_bias(self, q_len: int, k_len: int, past: int = 0) -> Tensor:
        """(1, H, Q, K) position bias for queries at positions past.. past+q_len-1."""
        cfg = self.config
        device = self.relative_attention_bias.weight.device
        rel_QK = (torch.arange(k_len, device=device)[None, :]
                  - torch.arange(q_len, device=device)[:, None] - past)
        bucket_QK = relative_position_bucket(
            rel_QK, bidirectional=not self.decoder, num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance)
        return self.relative_attention_bias(bucket_QK).permute(2, 0, 1)[None]

    def project_kv(self, kv_BKD: Tensor) -> tuple[Tensor, Tensor]:
        B, K, _ = kv_BKD.shape
        H, A = self.config.num_heads, self.config.d_kv
        return (self.k(kv_BKD).view(B, K, H, A).transpose(1, 2),
                self.v(kv_BKD).view(B, K, H, A).transpose(1, 2))

    def forward(self, x_BQD: Tensor, k_BHKA: Tensor, v_BHKA: Tensor, bias_BHQK: Tensor) -> Tensor:
        B, Q, _ = x_BQD.shape
        H, A = self.config.num_heads, self.config.d_kv
        q_BHQA = self.q(x_BQD).view(B, Q, H, A).transpose(1, 2)
        # T5 folds 1/sqrt(d_kv) into the initialisation of q, so the scores are not scaled.
        scores_BHQK = q_BHQA @ k_BHKA.transpose(2, 3) + bias_BHQK
        probs_BHQK = F.dropout(scores_BHQK.softmax(-1), self.config.dropout_rate, self.training)
        return self.o((probs_BHQK @ v_BHKA).transpose(1, 2).reshape(B, Q, H * A))


class SelfAttentionLayer(nn.Module):
    """x + dropout(attention(norm(x))) over x itself, after any cached keys and values."""

    def __init__(self, config: SwitchConfig, *, relative_bias: bool, decoder: bool) -> None:
        super().__init__()
        self.SelfAttention = Attention(config, relative_bias=relative_bias, decoder=decoder)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, cast_to="weight")
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x_BSD: Tensor, bias_BHQK: Tensor, past_kv: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns the new hidden states and the keys/values of past + new positions."""
        n_BSD = self.layer_norm(x_BSD)
        k_BHKA, v_BHKA = self.SelfAttention.project_kv(n_BSD)
        if past_kv is not None:
            k_BHKA, v_BHKA = torch.cat([past_kv[0], k_BHKA], dim=2), torch.cat([past_kv[1], v_BHKA], dim=2)
        out_BSD = self.SelfAttention(n_BSD, k_BHKA, v_BHKA, bias_BHQK)
        return x_BSD + self.dropout(out_BSD), (k_BHKA, v_BHKA)


class CrossAttentionLayer(nn.Module):
    """x + dropout(attention(norm(x))) over the encoder output's keys and values."""

    def __init__(self, config: SwitchConfig) -> None:
        super().__init__()
        self.EncDecAttention = Attention(config, relative_bias=False, decoder=True)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, cast_to="weight")
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x_BSD: Tensor, kv: tuple[Tensor, Tensor], bias_BHQK: Tensor) -> Tensor:
        return x_BSD + self.dropout(self.EncDecAttention(self.layer_norm(x_BSD), *kv, bias_BHQK))


class DenseActDense(nn.Module):
    """The dense T5 feed-forward: wo(dropout(act(wi(x)))), no biases."""

    def __init__(self, config: SwitchConfig) -> None:
        super().__init__()
        self.activation = config.dense_act_fn
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x_BSD: Tensor) -> Tensor:
        return self.wo(self.dropout(plain(self.wi(x_BSD), self.activation)))


class FeedForwardLayer(nn.Module):
    """x + dropout(mlp(norm(x))), where mlp is dense or an MoELayer; a dropped token adds 0."""

    def __init__(self, config: SwitchConfig, *, sparse: bool) -> None:
        super().__init__()
        self.mlp = MoELayer(config.moe_config()) if sparse else DenseActDense(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, cast_to="weight")
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x_BSD: Tensor, mask_BS: Tensor | None) -> tuple[Tensor, Any]:
        h_BSD = self.layer_norm(x_BSD)
        if isinstance(self.mlp, MoELayer):
            out = self.mlp(h_BSD, mask=mask_BS)
            return x_BSD + self.dropout(out.y), out
        return x_BSD + self.dropout(self.mlp(h_BSD)), None


class Block(nn.Module):
    """layer[0] self-attention, layer[1] cross-attention (decoder only), layer[-1] feed-forward."""

    def __init__(self, config: SwitchConfig, i: int, *, decoder: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [SelfAttentionLayer(config, relative_bias=i == 0, decoder=decoder)]
        if decoder:
            layers.append(CrossAttentionLayer(config))
        layers.append(FeedForwardLayer(config, sparse=config.is_sparse(i, decoder=decoder)))
        self.layer = nn.ModuleList(layers)


@dataclass
class SwitchDecoderCache:
    """Decoder state for incremental decoding: the encoder output and mask, per-layer self-attention
    keys/values (grown each step) and cross-attention keys/values (computed once)."""

    encoder_hidden_BKD: Tensor
    encoder_mask_BK: Tensor | None
    self_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    cross_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        """Decoder positions already processed."""
        return self.self_kv[0][0].shape[2] if self.self_kv else 0


def additive_mask(allowed_BQK: Tensor, bias: Tensor) -> Tensor:
    """bias where attention is allowed, the dtype's most negative value elsewhere: (B, H, Q, K)."""
    return bias.masked_fill(~allowed_BQK[:, None], torch.finfo(bias.dtype).min)


class Stack(nn.Module):
    """The encoder or the decoder: blocks, a final norm; position bias from block 0, shared."""

    def __init__(self, config: SwitchConfig, *, decoder: bool) -> None:
        super().__init__()
        n_layers = config.decoder_layers if decoder else config.num_layers
        self.config, self.decoder = config, decoder
        self.block = nn.ModuleList(Block(config, i, decoder=decoder) for i in range(n_layers))
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, cast_to="weight")
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(
        self,
        x_BSD: Tensor,
        mask_BS: Tensor | None,
        *,
        cache: SwitchDecoderCache | None = None,
        encoder_hidden_BKD: Tensor | None = None,
        encoder_mask_BK: Tensor | None = None,
    ) -> tuple[Tensor, list[Any]]:
        """Returns the normed hidden states and each block's MoEOutput (None for dense blocks).

        mask_BS: True for real tokens. For the decoder with a cache, it covers past + new tokens.
        """
        B, S, _ = x_BSD.shape
        past = cache.length if cache is not None else 0
        if mask_BS is not None and tuple(mask_BS.shape) != (B, past + S):
            raise ValueError(f"the attention mask has shape {tuple(mask_BS.shape)}; expected {(B, past + S)} "
                             f"(batch, {past} cached + {S} new positions)")
        # Position bias of block 0, shared by every block (T5), with the masks folded in.
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(S, past + S, past=past)
        allowed_BQK = torch.ones(B, S, past + S, dtype=torch.bool, device=x_BSD.device)
        if mask_BS is not None:
            allowed_BQK = allowed_BQK & mask_BS.bool()[:, None, :]
        if self.decoder:
            q_pos_Q1 = torch.arange(S, device=x_BSD.device)[:, None] + past
            allowed_BQK = allowed_BQK & (torch.arange(past + S, device=x_BSD.device)[None, :] <= q_pos_Q1)
        self_bias_BHQK = additive_mask(allowed_BQK, position_bias.to(x_BSD.dtype))
        if self.decoder:
            K = encoder_hidden_BKD.shape[1]
            enc_allowed_BQK = torch.ones(B, S, K, dtype=torch.bool, device=x_BSD.device)
            if encoder_mask_BK is not None:
                enc_allowed_BQK = enc_allowed_BQK & encoder_mask_BK.bool()[:, None, :]
            cross_bias_BHQK = additive_mask(enc_allowed_BQK, x_BSD.new_zeros(1, 1, S, K))
        new_mask_BS = None if mask_BS is None else mask_BS[:, past:]

        h_BSD = self.dropout(x_BSD)
        moe_outputs = []
        for i, block in enumerate(self.block):
            past_kv = cache.self_kv[i] if cache is not None and i < len(cache.self_kv) else None
            h_BSD, kv = block.layer[0](h_BSD, self_bias_BHQK, past_kv)
            if self.decoder:
                cross = block.layer[1]
                if cache is not None and i < len(cache.cross_kv):
                    cross_kv = cache.cross_kv[i]  # the encoder output's keys/values: computed once
                else:
                    cross_kv = cross.EncDecAttention.project_kv(encoder_hidden_BKD)
                h_BSD = cross(h_BSD, cross_kv, cross_bias_BHQK)
            if cache is not None:
                if past_kv is None:
                    cache.self_kv.append(kv)
                    cache.cross_kv.append(cross_kv)
                else:
                    cache.self_kv[i] = kv
            h_BSD, moe_out = block.layer[-1](h_BSD, new_mask_BS)
            moe_outputs.append(moe_out)
        return self.dropout(self.final_layer_norm(h_BSD)), moe_outputs


class SwitchTransformer(nn.Module):
    """Encoder-decoder LM: shared embedding, encoder and decoder stacks, (tied) LM head."""

    def __init__(self, config: SwitchConfig) -> None:
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, decoder=False)
        self.decoder = Stack(config, decoder=True)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.d_model, config.vocab_size, bias=False))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' SwitchTransformers initialisation (T5: attention scaling lives in q)."""
        D, F, H, A = self.config.d_model, self.config.d_ff, self.config.num_heads, self.config.d_kv
        nn.init.normal_(self.shared.weight, std=1.0)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=1.0)
        for m in self.modules():
            if isinstance(m, Attention):
                nn.init.normal_(m.q.weight, std=(D * A) ** -0.5)
                nn.init.normal_(m.k.weight, std=D**-0.5)
                nn.init.normal_(m.v.weight, std=D**-0.5)
                nn.init.normal_(m.o.weight, std=(H * A) ** -0.5)
                if hasattr(m, "relative_attention_bias"):
                    nn.init.normal_(m.relative_attention_bias.weight, std=D**-0.5)
            elif isinstance(m, DenseActDense):
                nn.init.normal_(m.wi.weight, std=D**-0.5)
                nn.init.normal_(m.wo.weight, std=F**-0.5)
            elif isinstance(m, MoELayer):
                nn.init.normal_(m.router.gate.weight, std=1.0)
                if m.router.gate.bias is not None:
                    nn.init.zeros_(m.router.gate.bias)
                m.experts.reset_parameters(std=D**-0.5)

    def encode(self, input_ids_BS: Tensor, attention_mask_BS: Tensor | None = None) -> tuple[Tensor, list[Any]]:
        """Encoder hidden states (B, S, D) and the encoder blocks' MoE outputs."""
        self._check_ids(input_ids_BS, "input_ids_BS")
        return self.encoder(self.shared(input_ids_BS), attention_mask_BS)

    def shift_right(self, labels_BS: Tensor) -> Tensor:
        """Decoder inputs for teacher forcing: start token, then labels[:-1] (-100 -> pad)."""
        shifted_BS = labels_BS.new_full(labels_BS.shape, self.config.decoder_start_token_id)
        shifted_BS[:, 1:] = labels_BS[:, :-1]
        return shifted_BS.masked_fill(shifted_BS == -100, self.config.pad_token_id)

    def forward(
        self,
        input_ids_BS: Tensor | None,
        decoder_input_ids_BS: Tensor | None = None,
        labels_BS: Tensor | None = None,
        *,
        attention_mask_BS: Tensor | None = None,
        decoder_attention_mask_BS: Tensor | None = None,
        cache: SwitchDecoderCache | None = None,
        use_cache: bool = False,
    ) -> ModelOutput:
        """Encode `input_ids_BS` (skipped when `cache` holds the encoder output) and decode.

        Args:
            input_ids_BS, decoder_input_ids_BS: long token ids. Without decoder inputs, `labels_BS`
                shifted right are used (teacher forcing).
            labels_BS: long targets, -100 ignored by the loss.
            attention_mask_BS / decoder_attention_mask_BS: True for real tokens; with a cache, the
                decoder mask covers past and new tokens.
            cache / use_cache: incremental decoding; the updated cache is returned in the output.
        Returns:
            ModelOutput(logits (B, S, V), loss (mean cross-entropy) or None, aux_loss (router
            losses weighted by the config's coefficients, summed over sparse layers) or None,
            routing (encoder blocks then decoder blocks; None for dense blocks), cache).
        """
        if decoder_input_ids_BS is None:
            if labels_BS is None:
                raise ValueError("give decoder_input_ids_BS, or labels_BS to derive them by shifting right")
            decoder_input_ids_BS = self.shift_right(labels_BS)
        self._check_ids(decoder_input_ids_BS, "decoder_input_ids_BS")
        enc_moe: list[Any] = []
        if cache is None:
            if input_ids_BS is None:
                raise ValueError("input_ids_BS is needed unless a cache holds the encoder output")
            encoder_hidden_BKD, enc_moe = self.encode(input_ids_BS, attention_mask_BS)
            if use_cache:
                cache = SwitchDecoderCache(encoder_hidden_BKD, attention_mask_BS)
        else:
            encoder_hidden_BKD, attention_mask_BS = cache.encoder_hidden_BKD, cache.encoder_mask_BK

        hidden_BSD, dec_moe = self.decoder(
            self.shared(decoder_input_ids_BS), decoder_attention_mask_BS, cache=cache,
            encoder_hidden_BKD=encoder_hidden_BKD, encoder_mask_BK=attention_mask_BS)
        if self.lm_head is None:
            # Mesh TensorFlow / T5: rescale before projecting on the tied embedding.
            logits_BSV = (hidden_BSD * self.config.d_model**-0.5) @ self.shared.weight.t()
        else:
            logits_BSV = self.lm_head(hidden_BSD)

        loss = None
        if labels_BS is not None:
            if labels_BS.shape != decoder_input_ids_BS.shape:
                raise ValueError(f"labels_BS has shape {tuple(labels_BS.shape)}; expected "
                                 f"{tuple(decoder_input_ids_BS.shape)} like decoder_input_ids_BS")
            loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=-100)
        moe_outs = enc_moe + dec_moe
        layers = [(blk.layer[-1].mlp, out) for blk, out in
                  zip(list(self.encoder.block) + list(self.decoder.block), moe_outs) if out is not None]
        aux_loss = torch.stack([mlp.aux_loss(out.aux_losses) for mlp, out in layers]).sum() if layers else None
        routing: list[RoutingDecision | None] = [None if o is None else o.decision for o in moe_outs]
        aux_named: dict[str, Tensor] = {}
        for _, out in layers:
            for name, value in out.aux_losses.items():
                aux_named[name] = value if name not in aux_named else aux_named[name] + value
        return ModelOutput(logits=logits_BSV, loss=loss, aux_loss=aux_loss, routing=routing, cache=cache,
                           aux_losses=aux_named)

    def _check_ids(self, ids: Tensor, name: str) -> None:
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise TypeError(f"{name} must be an integer tensor of shape (B, S); got {ids.dtype} "
                            f"{tuple(ids.shape)}")
