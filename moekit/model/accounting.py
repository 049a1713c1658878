"""Parameter, FLOP and memory accounting of built models (works on the meta device).

Counts come from the modules: total = every parameter once (tied weights once); active = total
minus the routed experts a token does not visit, (E - k) / E of every MoE layer's expert tensors.
`num_params(config)` / `active_params(config)` count the module any moekit config builds; they
live here, not on the configs, so that the torch-free configs never import the modules back.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from moekit.layer import MoELayer
from moekit.model.moa import MixtureOfAttention

if TYPE_CHECKING:
    from moekit.config import MoEConfig
    from moekit.model.config import ModelConfig
    from moekit.model.encoder_decoder import SwitchConfig
    from moekit.model.mamba import MambaConfig

BYTES_PER_PARAM = {"bf16": 2.0, "int8": 1.0, "int4": 0.5}


def meta_build(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a module on the meta device: exact shapes, no memory, no init cost (nor warnings)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory()


def moe_layer_params(config: "MoEConfig", *, active: bool = False) -> int:
    """Parameters of the MoE layer `config` builds (active: those one token touches)."""
    from moekit.soft_layer import make_moe_layer

    layer = meta_build(lambda: make_moe_layer(config))
    return count_params(layer) - (inactive_expert_params(layer) if active else 0)


def embedding_and_head_params(config: "ModelConfig") -> int:
    """The embedding matrix plus the LM head's own parameters (its bias only, when tied)."""
    V, D = config.vocab_size, config.d_model
    return V * D * (1 if config.tie_embeddings else 2) + (V if config.lm_head_bias else 0)


def decoder_params(config: "ModelConfig", *, active: bool = False, embedding: bool = True,
                   lm_head: bool = True) -> int:
    """Parameters of the MoETransformer `config` builds.

    active: count only what one token touches (top_k of each layer's routed experts).
    embedding / lm_head: include the embedding matrix / the LM head (a tied head's matrix is the
    embedding: counted once when both are included, and as the head when only lm_head is).
    """
    from moekit.model.transformer import MoETransformer

    model = meta_build(lambda: MoETransformer(config))
    V, D = config.vocab_size, config.d_model
    head = V * D + (V if config.lm_head_bias else 0)
    core = count_params(model) - embedding_and_head_params(config)
    if active:
        core -= inactive_expert_params(model)
    total = core + (V * D if embedding else 0) + (head if lm_head else 0)
    return total - (V * D if config.tie_embeddings and embedding and lm_head else 0)


def num_params(config: "MoEConfig | ModelConfig | MambaConfig | SwitchConfig") -> int:
    """Parameters of the module `config` builds (a tied head counted once), counted on the meta device."""
    from moekit.config import MoEConfig
    from moekit.model.config import ModelConfig
    from moekit.model.encoder_decoder import SwitchConfig, SwitchTransformer
    from moekit.model.mamba import MambaConfig, MambaMixer

    if isinstance(config, MoEConfig):
        return moe_layer_params(config)
    if isinstance(config, ModelConfig):
        return decoder_params(config)
    if isinstance(config, MambaConfig):
        return count_params(meta_build(lambda: MambaMixer(config)))
    if isinstance(config, SwitchConfig):
        return count_params(meta_build(lambda: SwitchTransformer(config)))
    raise TypeError(f"num_params takes a moekit config, not {type(config).__name__}")


def active_params(config: "MoEConfig | ModelConfig", *, embedding: bool = True, lm_head: bool = True) -> int:
    """Parameters one token touches: routed experts count top_k of E.

    For a ModelConfig, `embedding` counts the embedding matrix (one row is read; the convention
    counts it all) and `lm_head` the LM head (a tied head's V x D matrix is counted here even
    though it is the embedding, since the head multiplies by all of it).
    """
    from moekit.config import MoEConfig

    if isinstance(config, MoEConfig):
        return moe_layer_params(config, active=True)
    return decoder_params(config, active=True, embedding=embedding, lm_head=lm_head)


def count_params(module: nn.Module) -> int:
    """Parameters of a module, shared (tied) tensors counted once."""
    return sum(p.numel() for p in module.parameters())


def inactive_expert_params(module: nn.Module) -> int:
    """Routed-expert parameters one token does not use: (E - k) / E of each MoE layer's experts
    (and of each mixture-of-attention layer's q/o projections)."""
    total = 0
    for layer in module.modules():
        if isinstance(layer, MoELayer):
            E, k = layer.config.num_experts, layer.config.top_k
            total += count_params(layer.experts) * (E - k) // E
        elif isinstance(layer, MixtureOfAttention):
            E, k = layer.config.num_experts, layer.config.top_k
            total += (layer.w_q_EDA.numel() + layer.w_o_EAD.numel()) * (E - k) // E
    return total


@dataclass(frozen=True)
class ParamCounts:
    """Counts of one built model.

    Attributes:
        total: all parameters.
        active: parameters one token touches, counting the embedding and the LM head.
        active_no_embed: the same without the embedding matrix and the LM head (for tied models
            the shared matrix is excluded once).
        embedding: embedding + untied LM head parameters (the part `active_no_embed` leaves out).
    """

    total: int
    active: int
    active_no_embed: int
    embedding: int


def param_counts(model: nn.Module, *, embedding_params: int) -> ParamCounts:
    """Counts of a built model whose embedding and (untied) LM head hold `embedding_params`."""
    total = count_params(model)
    active = total - inactive_expert_params(model)
    return ParamCounts(total=total, active=active, active_no_embed=active - embedding_params,
                       embedding=embedding_params)


def weight_memory(params: int) -> dict[str, float]:
    """Bytes the weights need stored in bf16, int8 and 4-bit (no quantisation scales counted)."""
    return {fmt: params * b for fmt, b in BYTES_PER_PARAM.items()}


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M' (K, M, B, T); bytes with unit='B' -> '2.47 GB' (powers of 1000)."""
    if unit == "B":
        for suffix, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if n >= scale:
                return f"{n / scale:.2f} {suffix}"
        return f"{n:.0f} B"
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(int(n))
