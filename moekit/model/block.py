"""One decoder block: pre-norm mixer (attention, latent attention or Mamba) and pre-norm feed-forward.

    h = x + m * [out_norm](mixer(input_layernorm(x)))
    y = h + m * [out_norm](mlp(post_attention_layernorm(h)))      (m = residual_multiplier)
Arctic's MoE layers (moe_parallel) instead run the MoE on the block input, in parallel with
attention, and a dense residual MLP after attention: y = h + residual_mlp(residual_layernorm(h)) +
mlp(post_attention_layernorm(x)). The feed-forward `mlp` is an MoELayer or a dense MLP; names
follow transformers' decoder layers (and Arctic's residual_layernorm / residual_mlp).
"""

from __future__ import annotations

from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.experts.dense import DenseMLP
from moekit.layer import MoELayer
from moekit.model.attention import Attention
from moekit.model.cache import KVCache
from moekit.model.config import ModelConfig
from moekit.model.mamba import MambaMixer
from moekit.model.mla import MLAttention
from moekit.model.moa import MixtureOfAttention
from moekit.model.norm import make_norm
from moekit.types import LayerOutput


class DecoderLayer(nn.Module):
    """Block `layer_idx` of a ModelConfig. Forward returns a LayerOutput (output, routing, aux losses, K/V)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        D = config.d_model

        def norm() -> nn.Module:
            return make_norm(config.norm, D, config.norm_eps, config.norm_bias)

        self.input_layernorm = norm()
        self.is_attention = config.is_attention(layer_idx)
        if self.is_attention:
            kind = MLAttention if config.mla is not None else (
                MixtureOfAttention if config.moa is not None else Attention)
            self.self_attn = kind(config, layer_idx)
        else:
            assert config.mamba is not None
            self.mamba = MambaMixer(config.mamba)
        self.post_attention_layernorm = norm()
        if config.is_moe(layer_idx):
            assert isinstance(config.moe, MoEConfig)
            self.mlp: nn.Module = MoELayer(config.moe)
        else:
            assert config.d_ff is not None
            self.mlp = DenseMLP(D, config.d_ff, config.ffn_activation, bias=config.mlp_bias)
        self.parallel = config.moe_parallel and config.is_moe(layer_idx)
        if self.parallel:
            assert config.d_ff is not None
            self.residual_layernorm = norm()
            self.residual_mlp = DenseMLP(D, config.d_ff, config.ffn_activation, bias=config.mlp_bias)
        if config.post_norms:
            # Grok-1's sandwich: a norm on each branch output before the residual add.
            self.attn_out_norm = norm()
            self.ffn_out_norm = norm()

    def forward(
        self,
        x_BSD: Tensor,
        *,
        cos_sin: tuple[Tensor, Tensor] | None,
        mask_B1ST: Tensor | None,
        mask_BS: Tensor | None = None,
        token_ids_BS: Tensor | None = None,
        cache: KVCache | None = None,
        shared_kv: tuple[Tensor, Tensor] | None = None,
    ) -> LayerOutput:
        cfg = self.config
        kv, attention_decision = None, None
        aux_losses: dict[str, Tensor] = {}
        aux_loss: Tensor | None = None
        block_in_BSD = x_BSD
        h_BSD = self.input_layernorm(x_BSD)
        if self.is_attention:
            assert mask_B1ST is not None
            if isinstance(self.self_attn, MixtureOfAttention):
                h_BSD, kv, attention_decision, moa_aux = self.self_attn(
                    h_BSD, cos_sin=cos_sin, mask_B1ST=mask_B1ST, cache=cache, mask_BS=mask_BS)
                aux_losses.update({f"moa/{name}": value for name, value in moa_aux.items()})
                aux_loss = self.self_attn.aux_loss(moa_aux) if moa_aux else None
            else:
                h_BSD, kv = self.self_attn(h_BSD, cos_sin=cos_sin, mask_B1ST=mask_B1ST, cache=cache,
                                           shared_kv=shared_kv)
        else:
            state = None
            if cache is not None:
                if cache.layers[self.layer_idx] is None:
                    cache.layers[self.layer_idx] = self.mamba.new_cache(x_BSD.shape[0])
                state = cache.layers[self.layer_idx]
            h_BSD = self.mamba(h_BSD, cache=state, mask_BS=mask_BS)
        if cfg.post_norms:
            h_BSD = self.attn_out_norm(h_BSD)
        x_BSD = residual_add(x_BSD, h_BSD, cfg.residual_multiplier)

        if self.parallel:
            # Arctic (parallel_attn_mlp_res): dense residual MLP after attention; the MoE below
            # reads the block input, so it can run in parallel with attention.
            x_BSD = residual_add(x_BSD, self.residual_mlp(self.residual_layernorm(x_BSD)), cfg.residual_multiplier)
            h_BSD = self.post_attention_layernorm(block_in_BSD)
        else:
            h_BSD = self.post_attention_layernorm(x_BSD)
        decision = None
        if isinstance(self.mlp, MoELayer):
            # A decoder: no token may depend on later ones (the config already refused soft MoE).
            # Decoding with a cache computes no aux losses: nothing trains on them there.
            out = self.mlp(h_BSD, mask=mask_BS, token_ids=token_ids_BS, causal=True, aux=cache is None)
            h_BSD, decision = out.y, out.decision
            if out.aux_losses:
                aux_losses.update(out.aux_losses)
                ffn_aux = self.mlp.aux_loss(out.aux_losses)
                aux_loss = ffn_aux if aux_loss is None else aux_loss + ffn_aux
        else:
            h_BSD = self.mlp(h_BSD)
        if cfg.post_norms:
            h_BSD = self.ffn_out_norm(h_BSD)
        x_BSD = residual_add(x_BSD, h_BSD, cfg.residual_multiplier)
        return LayerOutput(x=x_BSD, decision=decision, attention_decision=attention_decision,
                           aux_losses=aux_losses, aux_loss=aux_loss, kv=kv)


def residual_add(x_BSD: Tensor, h_BSD: Tensor, multiplier: float) -> Tensor:
    """x + h * multiplier (no multiply for the usual 1.0: one op less per branch per step)."""
    return x_BSD + h_BSD if multiplier == 1.0 else x_BSD + h_BSD * multiplier
