"""What a Hugging Face model family is: its model_type, architecture name, both config.json
translations and its key-mapping rules, in one record; plus the rule shapes families share.

Keys no rule matches keep their name (moekit names attention, norms and embeddings like
transformers). Each family has a `split` layout (what transformers' `save_pretrained` writes: per-expert
2-D weights for most families) and a `fused` layout (transformers 5's in-memory 3-D experts, e.g.
`mlp.experts.gate_up_proj` (E, 2F, D)); loading accepts both, saving writes one. A family module
under `moekit/hf/families/` builds one `Family`; `moekit/hf/families/__init__.py` lists them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from moekit.hf.configs import ConfigJson
from moekit.hf.rules import Fused, Rename, Rule, StackExperts
from moekit.model.config import ModelConfig
from moekit.model.encoder_decoder import SwitchConfig

Layout = Literal["split", "fused"]
L = "model.layers.{layer}."
MOE = L + "mlp."  # where moekit's MoELayer sits in every decoder family
_ROTARY = r".*\.rotary_emb\.inv_freq"  # derived from the config; older checkpoints store it


@dataclass(frozen=True)
class Family:
    """One model_type.

    Args:
        model_type: config.json's `model_type`.
        architecture: config.json's `architectures` entry (the transformers class that loads it).
        to_moekit: config.json dict -> moekit config; raises on settings moekit does not reproduce.
        to_hf: moekit config -> the config.json fields transformers rebuilds the same model from.
        common / split / fused: key-mapping rules for both expert layouts / per layout.
        encoder_decoder: the family's models are `SwitchTransformer`s (`SwitchConfig`), not decoders.
        skipped: config.json dict -> regexes of checkpoint keys loading skips (beyond rotary buffers).
    """

    model_type: str
    architecture: str
    to_moekit: Callable[[dict], ModelConfig | SwitchConfig]
    to_hf: Callable[[Any], dict]
    common: tuple[Rule, ...] = ()
    split: tuple[Rule, ...] = ()
    fused: tuple[Rule, ...] = ()
    encoder_decoder: bool = False
    skipped: Callable[[dict], list[str]] | None = None

    def load_rules(self) -> tuple[Rule, ...]:
        return self.common + self.split + tuple(r for r in self.fused if r not in self.split)

    def save_rules(self, layout: Layout) -> tuple[Rule, ...]:
        if layout not in ("split", "fused"):
            raise ValueError(f"layout={layout!r} is invalid: must be 'split' or 'fused'")
        return self.common + (self.split if layout == "split" else self.fused)

    def config_from_hf(self, hf_config: dict, source: str = "config.json") -> ModelConfig | SwitchConfig:
        """`to_moekit` on config.json, where a missing required field is a ValueError naming it."""
        return self.to_moekit(ConfigJson(hf_config, source=source, model_type=self.model_type))

    def check_writes(self, config: object) -> None:
        """Refuse a model of the other kind (a decoder as an encoder-decoder family, or back)."""
        want = SwitchConfig if self.encoder_decoder else ModelConfig
        if not isinstance(config, want):
            kind = "an encoder-decoder" if self.encoder_decoder else "a decoder-only"
            raise ValueError(f"model_type={self.model_type!r} is {kind} family and this model is a "
                             f"{type(config).__name__}; choose a model_type of the same kind")

    def ignored_keys(self, hf_config: dict) -> re.Pattern:
        """Checkpoint keys loading skips, as transformers does."""
        patterns = [_ROTARY, *(self.skipped(hf_config) if self.skipped else [])]
        return re.compile("|".join(f"(?:{p})" for p in patterns))


def per_expert(hf_prefix: str, gate: str, up: str, down: str) -> tuple[Rule, ...]:
    """Per-expert Linear weights `hf_prefix{expert}.<name>.weight` stacked into 3-D expert weights."""
    return (
        StackExperts(hf_prefix + "{expert}." + gate + ".weight", MOE + "experts.w_gate_EDF"),
        StackExperts(hf_prefix + "{expert}." + up + ".weight", MOE + "experts.w_up_EDF"),
        StackExperts(hf_prefix + "{expert}." + down + ".weight", MOE + "experts.w_down_EFD"),
    )


def fused_experts(gate_up: str, down: str) -> tuple[Rule, ...]:
    """transformers' 3-D experts: gate_up (E, 2F, D) with gate first, down (E, D, F)."""
    return (
        Fused(gate_up, (MOE + "experts.w_gate_EDF", MOE + "experts.w_up_EDF"), dim=1, transpose=True),
        Rename(down, MOE + "experts.w_down_EFD", transpose=True),
    )


def renames(pairs: dict[str, str]) -> tuple[Rule, ...]:
    return tuple(Rename(hf, model) for hf, model in pairs.items())


def mixtral_rules(fused_router: str) -> dict[str, tuple[Rule, ...]]:
    """Mixtral's layout (`block_sparse_moe.experts.{e}.w1/w3/w2`); the fused router's name varies."""
    return dict(
        split=renames({L + "block_sparse_moe.gate.weight": MOE + "router.gate.weight"})
        + per_expert(L + "block_sparse_moe.experts.", "w1", "w3", "w2"),
        fused=renames({MOE + fused_router + ".weight": MOE + "router.gate.weight"})
        + fused_experts(MOE + "experts.gate_up_proj", MOE + "experts.down_proj"),
    )


def qwen_rules(shared: dict[str, str] | None = None, bias: bool = False) -> dict[str, tuple[Rule, ...]]:
    """Qwen's layout (`mlp.gate`, `mlp.experts.{e}.gate_proj/up_proj/down_proj`), used by several families."""
    router = {MOE + "gate.weight": MOE + "router.gate.weight"}
    if bias:  # DeepSeek-V3's selection bias (aux-loss-free balancing) lives in the gate.
        router[MOE + "gate.e_score_correction_bias"] = MOE + "router.expert_bias"
    return dict(
        common=renames({**router, **(shared or {})}),
        split=per_expert(MOE + "experts.", "gate_proj", "up_proj", "down_proj"),
        fused=fused_experts(MOE + "experts.gate_up_proj", MOE + "experts.down_proj"),
    )
