"""deepseek_v3: DeepSeek-V3 / Kimi K2, sigmoid scores with an aux-loss-free selection bias, groups
scored by their top-2 sum, optional renormalisation, then routed_scaling_factor."""

from __future__ import annotations

from moekit.hf.families.deepseek import deepseek_to_hf, deepseek_to_moekit, groups
from moekit.hf.family import Family, qwen_rules
from moekit.model.config import ModelConfig


def to_moekit(hf: dict) -> ModelConfig:
    return deepseek_to_moekit(hf, "deepseek_v3", score_func="sigmoid", expert_bias=True,
                              group_score="top2_sum", normalize_topk=hf.get("norm_topk_prob", True),
                              **groups(hf))


def skipped(hf: dict) -> list[str]:
    """The multi-token-prediction layers (num_hidden_layers.. of the checkpoint), which the
    language model does not use, as transformers skips them."""
    extra = hf.get("num_nextn_predict_layers") or 0
    if not extra:
        return []
    L = hf["num_hidden_layers"]
    return [rf"model\.layers\.({'|'.join(str(L + i) for i in range(extra))})\..*"]


FAMILY = Family("deepseek_v3", "DeepseekV3ForCausalLM", to_moekit, deepseek_to_hf, skipped=skipped,
                **qwen_rules(bias=True))
