"""The family registry: one module per model_type, each registered under its own name, with the
architecture name transformers itself gives the model."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import transformers

import moekit.hf.families as families
from moekit.hf.families import FAMILIES, family
from tests.hf.tiny import MODEL_TYPES, tiny_hf_model


def test_every_family_module_is_registered_under_its_own_name():
    modules = {m.name: importlib.import_module(f"{families.__name__}.{m.name}")
               for m in pkgutil.iter_modules(families.__path__)}
    with_family = {name for name, module in modules.items() if hasattr(module, "FAMILY")}
    assert with_family == set(FAMILIES)
    for name in with_family:
        assert modules[name].FAMILY is FAMILIES[name] and FAMILIES[name].model_type == name


@pytest.mark.parametrize("model_type", [pytest.param(t, id=t) for t in MODEL_TYPES])
def test_architecture_is_the_class_transformers_builds(model_type):
    assert type(tiny_hf_model(model_type)).__name__ == FAMILIES[model_type].architecture


def test_switch_architecture():
    config = transformers.SwitchTransformersConfig(vocab_size=32, d_model=8, d_kv=4, d_ff=8, num_layers=1,
                                                   num_heads=2, num_experts=2)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    assert type(model).__name__ == FAMILIES["switch_transformers"].architecture


@pytest.mark.parametrize("model_type, message", [
    pytest.param("llama", "model_type='llama' is not supported", id="unknown"),
    pytest.param(None, "no 'model_type' field", id="missing"),
    pytest.param({"a": 1}, "must be a string", id="object"),
])
def test_unknown_model_types_are_named(model_type, message):
    with pytest.raises(ValueError, match=message):
        family(model_type)
