"""The Hugging Face families moekit reads and writes: one module per model_type, one line each here.

Adding a family: write `moekit/hf/families/<model_type>.py` building a `Family` (its key-mapping
rules, both config.json translations, its architecture name) and add its `FAMILY` below.
"""

from __future__ import annotations

from moekit.hf.families import (
    dbrx,
    deepseek_v2,
    deepseek_v3,
    gpt_oss,
    granitemoe,
    jamba,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
    switch_transformers,
)
from moekit.hf.family import Family

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    mixtral.FAMILY,
    qwen3_moe.FAMILY,
    qwen2_moe.FAMILY,
    olmoe.FAMILY,
    deepseek_v3.FAMILY,
    deepseek_v2.FAMILY,
    granitemoe.FAMILY,
    phimoe.FAMILY,
    gpt_oss.FAMILY,
    dbrx.FAMILY,
    jamba.FAMILY,
    switch_transformers.FAMILY,
)}


def family(model_type: object, where: str = "") -> Family:
    """The family of `model_type`; ValueError naming the supported ones otherwise."""
    prefix = f"{where}: " if where else ""
    if model_type is None:
        raise ValueError(f"{prefix}no 'model_type' field; moekit reads {sorted(FAMILIES)}")
    if not isinstance(model_type, str):
        raise ValueError(f"{prefix}model_type={model_type!r} must be a string, one of {sorted(FAMILIES)}")
    if model_type not in FAMILIES:
        raise ValueError(f"{prefix}model_type={model_type!r} is not supported; moekit reads {sorted(FAMILIES)}")
    return FAMILIES[model_type]
