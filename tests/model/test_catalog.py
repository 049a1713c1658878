"""Catalog: every spec'd model is present, its analytic counts equal the built module, and its tiny
version trains (forward + backward) on CPU."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from moekit import catalog
from moekit.model import ModelConfig, MoETransformer
from moekit.model.accounting import active_params, count_params, num_params
from moekit.model.encoder_decoder import SwitchConfig, SwitchTransformer

SPECS = Path("/work/shared/specs/model_specs.json")
NAMES = catalog.names()


@functools.cache
def built(name: str) -> tuple[torch.nn.Module, dict]:
    """Each preset built on meta once per test session (Kimi K2 / Switch-C take ~1 s)."""
    model = catalog.get(name).build()
    return model, catalog.get(name).info(model)


def test_one_preset_per_spec_entry_under_its_exact_name() -> None:
    if not SPECS.exists():
        pytest.skip("model_specs.json is not available here")
    spec_names = [m["name"] for m in json.loads(SPECS.read_text())]
    assert sorted(NAMES) == sorted(spec_names)


@pytest.mark.parametrize("name", NAMES)
def test_analytic_counts_equal_the_meta_built_module(name: str) -> None:
    preset = catalog.get(name)
    model, info = built(name)
    assert next(model.parameters()).device.type == "meta"
    assert info["total_params"] == count_params(model) == num_params(preset.config)
    if isinstance(preset.config, ModelConfig):
        assert info["active_params"] == active_params(preset.config)
        no_embed = active_params(preset.config, embedding=False, lm_head=False)
        assert info["active_params_no_embedding"] == no_embed
    assert 0 < info["active_params_no_embedding"] < info["active_params"] <= info["total_params"]
    assert info["weight_bytes"]["bf16"] == 2 * info["total_params"] == 4 * info["weight_bytes"]["int4"]


PUBLISHED = [  # (name, total, active incl. embeddings, rel. tolerance): model cards and papers
    pytest.param("Mixtral 8x7B", 46.7e9, 12.9e9, 0.01, id="mixtral-8x7b"),
    pytest.param("DeepSeek-V3", 671e9, 37e9, 0.02, id="deepseek-v3"),
    pytest.param("DeepSeek-V2", 236e9, 21e9, 0.02, id="deepseek-v2"),
    pytest.param("Qwen3-30B-A3B", 30.5e9, 3.3e9, 0.02, id="qwen3-30b"),
    pytest.param("Kimi K2", 1.04e12, 32.6e9, 0.02, id="kimi-k2"),
    pytest.param("Jamba 1.5 Mini", 52e9, 12e9, 0.02, id="jamba-mini"),
    pytest.param("OLMoE-1B-7B", 6.9e9, 1.3e9, 0.02, id="olmoe"),
    pytest.param("Switch-C 2048", 1.571e12, None, 0.01, id="switch-c"),
]


@pytest.mark.parametrize("name,total,active,tol", PUBLISHED)
def test_counts_match_published_numbers(name: str, total: float, active: float | None, tol: float) -> None:
    info = built(name)[1]
    assert abs(info["total_params"] / total - 1) < tol
    if active is not None:
        assert abs(info["active_params"] / active - 1) < tol


def test_gpt_oss_active_counts_unembedding_but_not_embedding_like_its_card() -> None:
    preset = catalog.get("gpt-oss-20b")
    cfg = preset.config
    assert isinstance(cfg, ModelConfig)
    card_active = active_params(cfg, embedding=False, lm_head=True)
    assert abs(card_active / 3.6e9 - 1) < 0.02


@pytest.mark.parametrize("name", NAMES)
def test_scaled_preset_runs_forward_and_backward(name: str) -> None:
    torch.manual_seed(0)
    small = catalog.get(name).scaled()
    model = small.build(device="cpu")
    assert count_params(model) < 2_000_000
    assert type(small.config) is type(catalog.get(name).config)
    tokens_BS = torch.randint(0, 128, (2, 12))
    if isinstance(model, SwitchTransformer):
        out = model(tokens_BS, labels_BS=tokens_BS)
    else:
        assert isinstance(model, MoETransformer)
        out = model(tokens_BS, targets_BS=tokens_BS)
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_scaled_preset_keeps_the_structure(name: str) -> None:
    full, small = catalog.get(name).config, catalog.get(name).scaled().config
    if isinstance(full, SwitchConfig):
        assert isinstance(small, SwitchConfig)
        assert (small.encoder_sparse_step, small.decoder_sparse_step) == (
            full.encoder_sparse_step, full.decoder_sparse_step)
        return
    assert isinstance(small, ModelConfig)
    flags = ("qk_norm", "attn_sinks", "norm", "post_norms", "tie_embeddings", "qkv_bias", "kv_share_every",
             "moe_parallel")
    for flag in flags:
        assert getattr(small, flag) == getattr(full, flag), flag
    assert (small.mla is None) == (full.mla is None)
    assert (small.rope is None) == (full.rope is None)
    assert (small.moe is None) == (full.moe is None)
    def kinds(c: ModelConfig) -> set:
        return {(c.is_moe(i), c.is_attention(i), c.uses_rope(i), c.layer_window(i) is None)
                for i in range(c.n_layers)}

    assert kinds(small) == kinds(full)
    if full.moe is not None:
        assert small.moe.score_func == full.moe.score_func
        assert small.moe.num_shared_experts == full.moe.num_shared_experts
        assert (small.moe.num_groups is None) == (full.moe.num_groups is None)


@pytest.mark.parametrize("alias,name", [
    pytest.param("mixtral-8x7b", "Mixtral 8x7B", id="alias"),
    pytest.param("deepseek-v3", "DeepSeek-V3", id="alias-lowercase"),
    pytest.param("olmoe", "OLMoE-1B-7B", id="short-alias"),
    pytest.param("MIXTRAL 8X22B", "Mixtral 8x22B", id="case-insensitive-name"),
    pytest.param("glam (64b/64e)", "GLaM (64B/64E)", id="punctuation"),
])
def test_get_by_alias(alias: str, name: str) -> None:
    assert catalog.get(alias).name == name


def test_unknown_name_raises_with_suggestion() -> None:
    with pytest.raises(ValueError, match="Mixtral"):
        catalog.get("mixtral-9x9b")


def test_aliases_are_unique() -> None:
    keys = [catalog.get(n).name for p in catalog.PRESETS.values() for n in (p.name, *p.aliases)]
    seen: dict[str, str] = {}
    for p in catalog.PRESETS.values():
        for a in (p.name, *p.aliases):
            assert seen.setdefault(a.lower(), p.name) == p.name, a
    assert len(keys) >= 2 * len(NAMES)
