"""The decoder-only MoE language model: embedding, blocks, final norm, LM head, losses.

`MoETransformer(config)(tokens_BS, targets_BS=..., cache=..., mask_BS=...)` returns logits, the
next-token loss, the coefficient-weighted sum of the MoE aux losses and every layer's routing.
Parameter names follow transformers (model.embed_tokens, model.layers.{i}..., model.norm, lm_head).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.inputs import bool_mask, check_token_range
from moekit.layer import MoELayer, RoutedLayer
from moekit.model.attention import additive_mask
from moekit.model.block import DecoderLayer
from moekit.model.cache import KVCache, RowCache
from moekit.model.config import ModelConfig
from moekit.model.init import INIT_STD, init_decoder
from moekit.model.linear import project
from moekit.model.norm import make_norm
from moekit.model.one_token import step_for
from moekit.model.rope import rope_cos_sin, row_cos_sin
from moekit.traits import ROUTER_TRAITS, batch_ranked_warning, generation_error
from moekit.types import ModelOutput, RoutingDecision

IGNORE_INDEX = -100


class DecoderStack(nn.Module):
    """embed_tokens, layers and the final norm (transformers' `model.` prefix)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layers))
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps, config.norm_bias)


class MoETransformer(nn.Module):
    """A decoder-only language model built from a ModelConfig.

    Forward:
        tokens_BS: long (B, S).
        targets_BS: long (B, S), already shifted (logits[:, t] predicts targets[:, t]); -100 = ignore.
        cache: a KVCache (from `new_cache`) to decode incrementally; updated in place. Or a RowCache
            (`SlotStore.view`): each row continues its own sequence at its own position (batching).
        mask_BS: bool (B, S), False for padding tokens (hidden from attention, routed nowhere); an
            integer 0/1 mask is converted, any other mask refused (moekit/inputs.py).
        Token ids and targets outside [0, vocab_size) are refused (targets may be -100).
        logits_to_keep: N > 0 runs the LM head on the last N positions only (logits (B, N, V)).
        Returns ModelOutput(logits (B, S, V), loss, aux_loss (None without MoE layers), routing
        (one RoutingDecision per layer, None for dense layers), cache, aux_losses (unweighted, by
        name), attention_routing (mixture of attention)).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.moe is not None and ROUTER_TRAITS[config.moe.router].causal == "batch":
            warnings.warn(batch_ranked_warning(config.moe.router), stacklevel=2)
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=config.lm_head_bias)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self, std: float = INIT_STD) -> None:
        """Initialise every weight by moekit's policy (`moekit.model.init.init_decoder`)."""
        init_decoder(self, std)

    def new_cache(self) -> KVCache:
        return KVCache.empty(self.config.n_layers)

    def save_pretrained(self, path: str, *, max_shard_size: int | str = "5GB", layout: str = "split",
                        model_type: str | None = None, overwrite: bool = False) -> list[str]:
        """Write a Hugging Face checkpoint directory; see `moekit.hf.save.save_pretrained`."""
        # imported here: the checkpoint writer sits above the model (it never imports this module)
        from moekit.hf.save import save_pretrained

        return save_pretrained(self, path, max_shard_size=max_shard_size, layout=layout,  # type: ignore[arg-type]
                               model_type=model_type, overwrite=overwrite)

    def moe_layers(self) -> list[MoELayer]:
        """The feed-forward MoE layers in depth order (one per non-None entry of ModelOutput.routing)."""
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoELayer)]

    def routed_layers(self) -> list[RoutedLayer]:
        """Every routed layer (mixture-of-attention and feed-forward MoE) in forward order."""
        return [m for m in self.modules() if isinstance(m, RoutedLayer)]

    @torch.no_grad()
    def update_expert_biases(self, scale: float = 1.0) -> None:
        """Aux-loss-free balancing step on every routed layer (MoE or mixture of attention) whose
        router has an expert bias, at `scale` x each layer's bias_update_rate."""
        for layer in self.routed_layers():
            if getattr(layer.router, "expert_bias", None) is not None:
                layer.update_expert_bias(scale)

    def forward(
        self,
        tokens_BS: Tensor,
        targets_BS: Tensor | None = None,
        cache: KVCache | None = None,
        mask_BS: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        cfg = self.config
        mask_BS = bool_mask(mask_BS, "mask_BS")
        self._check_inputs(tokens_BS, targets_BS, mask_BS, cache)
        if not isinstance(logits_to_keep, int) or logits_to_keep < 0 or (
                logits_to_keep and targets_BS is not None):
            raise ValueError(f"logits_to_keep={logits_to_keep!r} is invalid: must be an integer >= 0 (0 "
                             "keeps all positions), and 0 when targets are given")
        B, S = tokens_BS.shape
        if (isinstance(cache, RowCache) and B == S == 1 and targets_BS is None and mask_BS is None
                and not torch.is_grad_enabled() and tokens_BS.device.type == "cpu"):
            step = step_for(self)  # one sequence's decode token: a fixed list of kernel calls
            if step is not None:
                return step(tokens_BS, cache)
        device = tokens_BS.device
        start = cache.position if cache is not None else 0
        x_BSD = self.model.embed_tokens(tokens_BS)
        if cfg.embedding_multiplier != 1.0:
            x_BSD = x_BSD * cfg.embedding_multiplier

        key_mask_BT = mask_BS
        q_pos_S = torch.arange(start, start + S, device=device)
        k_pos_T = torch.arange(0, start + S, device=device)
        if isinstance(cache, RowCache):
            # Independent sequences at their own positions (the batching engine's slots).
            if mask_BS is not None:
                raise ValueError("mask_BS is not supported with a RowCache: its rows are unpadded sequences")
            q_pos_S = cache.query_positions(S)  # (B, S) here
            k_pos_T = torch.arange(0, int(q_pos_S.max()) + 1, device=device)
        elif cache is not None:
            if mask_BS is not None or cache.key_mask_BT is not None:
                old = cache.key_mask_BT if cache.key_mask_BT is not None else torch.ones(
                    B, start, dtype=torch.bool, device=device)
                new = torch.ones(B, S, dtype=torch.bool, device=device) if mask_BS is None else mask_BS.bool()
                cache.key_mask_BT = torch.cat((old, new), dim=1)
            key_mask_BT = cache.key_mask_BT
        masks: dict[tuple[int | None, int | None], Tensor] = {}
        cos_sin = None
        if cfg.rope is not None:
            rot = cfg.rotary_dim
            if q_pos_S.dim() == 1:
                cos_sin = rope_cos_sin(cfg.rope, rot, q_pos_S, max_seq_len=cfg.max_seq_len, dtype=x_BSD.dtype)
            else:
                cos_sin = row_cos_sin(cfg, q_pos_S, dtype=x_BSD.dtype)

        routing: list[RoutingDecision | None] = []
        attention_routing: list[RoutingDecision | None] = []
        aux_named: dict[str, Tensor] = {}
        aux_total: Tensor | None = None
        kv_by_layer: dict[int, tuple[Tensor, Tensor]] = {}
        for i, layer in enumerate(self.model.layers):
            mask_B1ST = None
            if layer.is_attention:
                kind = (cfg.layer_window(i), cfg.layer_chunk(i))
                if kind not in masks:
                    masks[kind] = additive_mask(q_pos_S, k_pos_T, window=kind[0], chunk=kind[1],
                                                key_mask_BT=key_mask_BT, dtype=x_BSD.dtype)
                mask_B1ST = masks[kind]
            out = layer(
                x_BSD,
                cos_sin=cos_sin if cfg.uses_rope(i) else None,
                mask_B1ST=mask_B1ST,
                mask_BS=mask_BS,
                token_ids_BS=tokens_BS,
                cache=cache,
                shared_kv=kv_by_layer.get(cfg.kv_source(i)),
            )
            x_BSD = out.x
            if out.kv is not None and cfg.kv_source(i) == i and cfg.kv_share_every > 1:
                kv_by_layer[i] = out.kv
            routing.append(out.decision)
            attention_routing.append(out.attention_decision)
            for name, value in out.aux_losses.items():
                aux_named[name] = value if name not in aux_named else aux_named[name] + value
            if out.aux_loss is not None:
                aux_total = out.aux_loss if aux_total is None else aux_total + out.aux_loss
        if isinstance(cache, RowCache):
            cache.commit()
        elif cache is not None:
            cache.position, cache.batch_size = start + S, B

        if logits_to_keep:
            x_BSD = x_BSD[:, -logits_to_keep:]  # the LM head only where logits are wanted
        logits_BSV = project(self.lm_head, self.model.norm(x_BSD))
        if cfg.logits_scaling != 1.0:
            logits_BSV = logits_BSV / cfg.logits_scaling
        loss = None if targets_BS is None else lm_loss(logits_BSV, targets_BS)
        return ModelOutput(logits=logits_BSV, loss=loss, aux_loss=aux_total, routing=routing, cache=cache,
                           aux_losses=aux_named, attention_routing=attention_routing)

    def _check_inputs(self, tokens_BS: Tensor, targets_BS: Tensor | None, mask_BS: Tensor | None,
                      cache: KVCache | None) -> None:
        cfg = self.config
        if tokens_BS.dim() != 2 or tokens_BS.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"tokens_BS must be an integer tensor (batch, seq); got "
                             f"{tuple(tokens_BS.shape)} {tokens_BS.dtype}")
        for name, t in (("targets_BS", targets_BS), ("mask_BS", mask_BS)):
            if t is not None and tuple(t.shape) != tuple(tokens_BS.shape):
                raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {tuple(tokens_BS.shape)} "
                                 "like tokens_BS")
        check_token_range(tokens_BS, cfg.vocab_size, "tokens_BS")
        if targets_BS is not None:
            check_token_range(targets_BS, cfg.vocab_size, "targets_BS", ignore_index=IGNORE_INDEX)
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (from model.new_cache()), not {type(cache).__name__}")
        if cache is not None and cfg.moe is not None and (err := generation_error(cfg.moe.router)):
            raise ValueError(err)
        if cache is not None and len(cache.layers) != self.config.n_layers:
            raise ValueError(f"cache has {len(cache.layers)} layers; this model has {self.config.n_layers}")
        if cache is not None and cache.batch_size not in (None, tokens_BS.shape[0]):
            raise ValueError(f"cache holds {cache.batch_size} sequences but tokens_BS has "
                             f"{tokens_BS.shape[0]}; start a new one with model.new_cache()")


def lm_loss(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    """Mean next-token cross-entropy (fp32) over targets != -100; 0 (with a gradient path) if none."""
    logits_TV = logits_BSV.reshape(-1, logits_BSV.shape[-1]).float()
    targets_T = targets_BS.reshape(-1)
    total = F.cross_entropy(logits_TV, targets_T, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (targets_T != IGNORE_INDEX).sum().clamp_min(1)
    return total / count
