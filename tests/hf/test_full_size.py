"""Full-size architectures on the meta device (no weights): for transformers' default config of each
model_type (Mixtral-8x7B, DeepSeek-V3, Qwen3-30B-A3B, ...), the rules map moekit's parameters onto
exactly transformers' tensors, names and shapes, and the translated config counts the same parameters."""

from __future__ import annotations

import pytest
import torch
import transformers

from moekit.hf.checkpoint import build
from moekit.hf.convert import model_to_checkpoint
from moekit.hf.families import family
from moekit.hf.save import tied_copies
from moekit.model.accounting import num_params
from tests.hf.tiny import MODEL_TYPES

TYPES = [*MODEL_TYPES, "switch_transformers"]


def _hf_default(model_type: str) -> transformers.PretrainedConfig:
    if model_type == "dbrx":  # transformers 5.23's DbrxAttention reads rope_theta from attn_config
        return transformers.DbrxConfig(attn_config={"rope_theta": 500000.0, "kv_n_heads": 8, "clip_qkv": 8.0},
                                       ffn_config={"moe_num_experts": 16, "moe_top_k": 4,
                                                   "ffn_hidden_size": 10752},
                                       d_model=6144, n_heads=48, n_layers=40, vocab_size=100352)
    if model_type == "deepseek_v2":  # DeepSeek-V2's router picks 6 of 160 (the default leaves k unset)
        return transformers.AutoConfig.for_model(model_type, num_experts_per_tok=6, n_routed_experts=160)
    return transformers.AutoConfig.for_model(model_type)


@pytest.mark.parametrize("model_type", [pytest.param(t, id=t) for t in TYPES])
def test_meta_shapes_match_transformers(model_type):
    hf_config = _hf_default(model_type)
    with torch.device("meta"):
        if model_type == "switch_transformers":
            hf_model = transformers.SwitchTransformersForConditionalGeneration(hf_config)
        else:
            hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
        config = family(model_type).to_moekit(hf_config.to_dict())
        model = build(config)
    copies = tied_copies(config)
    state = {k: v for k, v in model.state_dict().items() if k not in copies}
    mapped = model_to_checkpoint(family(model_type).save_rules("fused"), state)
    hf_state = {k: v for k, v in hf_model.state_dict().items() if k not in copies}
    assert sorted(mapped) == sorted(hf_state)
    for key, tensor in hf_state.items():
        assert tuple(mapped[key].shape) == tuple(tensor.shape), key
    # parameters only (DeepSeek-V3's selection bias is a buffer in both); shared tensors counted once
    assert num_params(config) == sum(p.numel() for p in hf_model.parameters())
