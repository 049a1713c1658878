"""Per-model_type key-mapping rules: how each family's checkpoint keys map onto moekit's parameters.

Keys no rule matches keep their name (moekit names attention, norms and embeddings like
transformers). Each family has a `split` layout (what transformers' `save_pretrained` writes: per-expert
2-D weights for most families) and a `fused` layout (transformers 5's in-memory 3-D experts, e.g.
`mlp.experts.gate_up_proj` (E, 2F, D)); loading accepts both, saving writes one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from moekit.hf.rules import Fused, Rename, Rule, StackExperts, Unflatten

Layout = Literal["split", "fused"]
L = "model.layers.{layer}."
MOE = L + "mlp."  # where moekit's MoELayer sits in every family


@dataclass(frozen=True)
class Family:
    """The rules of one model_type: `common` apply to both expert layouts."""

    model_type: str
    common: tuple[Rule, ...]
    split: tuple[Rule, ...]
    fused: tuple[Rule, ...]

    def load_rules(self) -> tuple[Rule, ...]:
        return self.common + self.split + tuple(r for r in self.fused if r not in self.split)

    def save_rules(self, layout: Layout) -> tuple[Rule, ...]:
        if layout not in ("split", "fused"):
            raise ValueError(f"layout={layout!r} is invalid: must be 'split' or 'fused'")
        return self.common + (self.split if layout == "split" else self.fused)


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


def _mixtral_like(model_type: str, fused_router: str) -> Family:
    return Family(
        model_type,
        common=(),
        split=renames({L + "block_sparse_moe.gate.weight": MOE + "router.gate.weight"})
        + per_expert(L + "block_sparse_moe.experts.", "w1", "w3", "w2"),
        fused=renames({MOE + fused_router + ".weight": MOE + "router.gate.weight"})
        + fused_experts(MOE + "experts.gate_up_proj", MOE + "experts.down_proj"),
    )


def _qwen_like(model_type: str, shared: dict[str, str] | None = None, bias: bool = False) -> Family:
    router = {MOE + "gate.weight": MOE + "router.gate.weight"}
    if bias:  # DeepSeek-V3's selection bias (aux-loss-free balancing) lives in the gate.
        router[MOE + "gate.e_score_correction_bias"] = MOE + "router.expert_bias"
    return Family(
        model_type,
        common=renames({**router, **(shared or {})}),
        split=per_expert(MOE + "experts.", "gate_proj", "up_proj", "down_proj"),
        fused=fused_experts(MOE + "experts.gate_up_proj", MOE + "experts.down_proj"),
    )


_QWEN2_SHARED = {MOE + f"shared_expert.{p}_proj.weight": MOE + f"shared_experts.{p}_proj.weight"
                 for p in ("gate", "up", "down")}

_GRANITE_SPLIT = (
    Rename(L + "block_sparse_moe.router.layer.weight", MOE + "router.gate.weight"),
    Fused(L + "block_sparse_moe.input_linear.weight", (MOE + "experts.w_gate_EDF", MOE + "experts.w_up_EDF"),
          dim=1, transpose=True),
    Rename(L + "block_sparse_moe.output_linear.weight", MOE + "experts.w_down_EFD", transpose=True),
)
_GRANITE_FUSED = (
    Rename(L + "block_sparse_moe.router.weight", MOE + "router.gate.weight"),
    *fused_experts(L + "block_sparse_moe.experts.gate_up_proj", L + "block_sparse_moe.experts.down_proj"),
)

# gpt-oss stores experts (E, in, out) already, gate and up interleaved along the last dim.
_GPT_OSS = (
    *renames({MOE + "router.weight": MOE + "router.gate.weight",
              MOE + "router.bias": MOE + "router.gate.bias",
              MOE + "experts.down_proj": MOE + "experts.w_down_EFD",
              MOE + "experts.down_proj_bias": MOE + "experts.b_down_ED"}),
    Fused(MOE + "experts.gate_up_proj", (MOE + "experts.w_gate_EDF", MOE + "experts.w_up_EDF"), dim=-1,
          interleaved=True),
    Fused(MOE + "experts.gate_up_proj_bias", (MOE + "experts.b_gate_EF", MOE + "experts.b_up_EF"), dim=-1,
          interleaved=True),
)

_JAMBA_COMMON = renames({
    "model.final_layernorm.weight": "model.norm.weight",
    L + "pre_ff_layernorm.weight": L + "post_attention_layernorm.weight",
    L + "feed_forward.router.weight": MOE + "router.gate.weight",
    **{L + f"feed_forward.{p}_proj.weight": MOE + f"{p}_proj.weight" for p in ("gate", "up", "down")},
})

_B = "transformer.blocks.{layer}."
_DBRX = (
    *renames({"transformer.wte.weight": "model.embed_tokens.weight",
              "transformer.norm_f.weight": "model.norm.weight",
              _B + "norm_attn_norm.norm_1.weight": L + "input_layernorm.weight",
              _B + "norm_attn_norm.norm_2.weight": L + "post_attention_layernorm.weight",
              _B + "norm_attn_norm.attn.out_proj.weight": L + "self_attn.o_proj.weight",
              _B + "ffn.router.layer.weight": MOE + "router.gate.weight"}),
    Fused(_B + "norm_attn_norm.attn.Wqkv.weight",
          tuple(L + f"self_attn.{p}_proj.weight" for p in ("q", "k", "v")), dim=0),
    # experts stacked along rows: w1 / v1 (E * F, D) are (out, in) per expert, w2 (E * F, D) is (in, out)
    Unflatten(_B + "ffn.experts.mlp.w1", MOE + "experts.w_gate_EDF", transpose=True),
    Unflatten(_B + "ffn.experts.mlp.v1", MOE + "experts.w_up_EDF", transpose=True),
    Unflatten(_B + "ffn.experts.mlp.w2", MOE + "experts.w_down_EFD"),
)


def _switch_stack(stack: str, ff: int) -> tuple[Rule, ...]:
    """One stack of a Switch Transformer: the feed-forward is sublayer `ff` of each block."""
    p = f"{stack}.block.{{layer}}.layer.{ff}.mlp."
    return (Rename(p + "router.classifier.weight", p + "router.gate.weight"),
            StackExperts(p + "experts.expert_{expert}.wi.weight", p + "experts.w_in_EDF"),
            StackExperts(p + "experts.expert_{expert}.wo.weight", p + "experts.w_out_EFD"))


FAMILIES: dict[str, Family] = {
    "mixtral": _mixtral_like("mixtral", "gate"),
    "qwen3_moe": _qwen_like("qwen3_moe"),
    "qwen2_moe": _qwen_like("qwen2_moe", _QWEN2_SHARED),
    "olmoe": _qwen_like("olmoe"),
    "deepseek_v3": _qwen_like("deepseek_v3", bias=True),
    "deepseek_v2": _qwen_like("deepseek_v2"),
    "phimoe": _mixtral_like("phimoe", "router"),
    "granitemoe": Family("granitemoe", common=(), split=_GRANITE_SPLIT, fused=_GRANITE_FUSED),
    "gpt_oss": Family("gpt_oss", common=_GPT_OSS, split=(), fused=()),
    "dbrx": Family("dbrx", common=_DBRX, split=(), fused=()),
    "switch_transformers": Family("switch_transformers", common=_switch_stack("encoder", 1)
                                  + _switch_stack("decoder", 2), split=(), fused=()),
    "jamba": Family(
        "jamba",
        common=_JAMBA_COMMON,
        split=per_expert(L + "feed_forward.experts.", "gate_proj", "up_proj", "down_proj"),
        fused=fused_experts(L + "feed_forward.experts.gate_up_proj", L + "feed_forward.experts.down_proj"),
    ),
}


def ignored_keys(model_type: str, hf_config: dict) -> re.Pattern:
    """Checkpoint keys loading skips, as transformers does: rotary `inv_freq` buffers (derived from
    the config; older checkpoints store them) and DeepSeek-V3's multi-token-prediction layers
    (layers num_hidden_layers.. of the checkpoint, which the language model does not use)."""
    patterns = [r".*\.rotary_emb\.inv_freq"]
    extra = hf_config.get("num_nextn_predict_layers") or 0
    if model_type == "deepseek_v3" and extra:
        L = hf_config["num_hidden_layers"]
        patterns.append(rf"model\.layers\.({'|'.join(str(L + i) for i in range(extra))})\..*")
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not supported; moekit reads {sorted(FAMILIES)}")
    return FAMILIES[model_type]
