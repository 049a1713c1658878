"""deepseek_v2: DeepSeek-V2 / V2.5 / V2-Lite, softmax top-k never renormalised (transformers ignores
norm_topk_prob), optionally group-limited with groups scored by their max."""

from __future__ import annotations

from moekit.hf.configs import moe_of, unsupported
from moekit.hf.families.deepseek import deepseek_to_hf, deepseek_to_moekit, groups
from moekit.hf.family import Family, qwen_rules
from moekit.model.config import ModelConfig


def to_moekit(hf: dict) -> ModelConfig:
    method = hf.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise unsupported("deepseek_v2", "topk_method", method, "greedy or group_limited_greedy")
    limited = groups(hf) if method == "group_limited_greedy" else {}
    return deepseek_to_moekit(hf, "deepseek_v2", normalize_topk=False, group_score="max", **limited)


def to_hf(cfg: ModelConfig) -> dict:
    return dict(deepseek_to_hf(cfg), topk_method="group_limited_greedy" if moe_of(cfg).num_groups else "greedy")


FAMILY = Family("deepseek_v2", "DeepseekV2ForCausalLM", to_moekit, to_hf, **qwen_rules())
