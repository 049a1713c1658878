"""Each kind of bad checkpoint gets an error naming what is wrong (file, key) and how to fix it."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.hf.save import save_pretrained
from tests.hf.tiny import save_tiny


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    save_tiny("mixtral", path)
    return path


def _copy(src, dst, *, config_edit=None, tensors_edit=None):
    dst.mkdir(exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    tensors = load_file(src / "model.safetensors")
    if tensors_edit:
        tensors_edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_unknown_model_type(mixtral_dir, tmp_path):
    bad = _copy(mixtral_dir, tmp_path / "c", config_edit=lambda c: c.update(model_type="llama"))
    with pytest.raises(ValueError, match=r"config.json: model_type='llama' is not supported; "
                                         r"moekit reads \["):
        moekit.from_pretrained(bad)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        moekit.from_pretrained(tmp_path)


def test_missing_shard(tmp_path):
    save_tiny("mixtral", tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shard}: shard missing; .* maps tensor '"):
        moekit.from_pretrained(tmp_path)


def test_truncated_file(mixtral_dir, tmp_path):
    bad = _copy(mixtral_dir, tmp_path / "c")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file, "
                                         r"truncated or corrupted"):
        moekit.from_pretrained(bad)


def test_wrong_shape_names_key_and_file(mixtral_dir, tmp_path):
    key = "model.layers.1.self_attn.q_proj.weight"
    bad = _copy(mixtral_dir, tmp_path / "c", tensors_edit=lambda t: t.update({key: torch.zeros(32, 16)}))
    with pytest.raises(ValueError, match=rf"{key} in .*model.safetensors: shape \(32, 16\) does not fit"):
        moekit.from_pretrained(bad)


def test_config_contradicts_weights_experts(mixtral_dir, tmp_path):
    bad = _copy(mixtral_dir, tmp_path / "c", config_edit=lambda c: c.update(num_local_experts=3))
    with pytest.raises(ValueError, match=r"expert 3 is beyond the config's 3 experts; "
                                         r"config.json contradicts"):
        moekit.from_pretrained(bad)


def test_config_contradicts_weights_width(mixtral_dir, tmp_path):
    bad = _copy(mixtral_dir, tmp_path / "c", config_edit=lambda c: c.update(intermediate_size=40))
    with pytest.raises(ValueError, match=r"experts.0.w1.weight in .*: shape \(4, 32, 48\) does not fit .*"
                                         r"w_gate_EDF' of shape \(4, 32, 40\)"):
        moekit.from_pretrained(bad)


def test_config_contradicts_weights_layers(mixtral_dir, tmp_path):
    bad = _copy(mixtral_dir, tmp_path / "c", config_edit=lambda c: c.update(num_hidden_layers=1))
    with pytest.raises(ValueError, match=r"map to no model parameter: model.layers.1."):
        moekit.from_pretrained(bad)


def test_unmapped_checkpoint_key(mixtral_dir, tmp_path):
    bad = _copy(mixtral_dir, tmp_path / "c",
                tensors_edit=lambda t: t.update({"model.mystery": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"map to no model parameter: model.mystery in .*model.safetensors"):
        moekit.from_pretrained(bad)


def test_missing_tensor(mixtral_dir, tmp_path):
    bad = _copy(mixtral_dir, tmp_path / "c", tensors_edit=lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ValueError, match=r"not found in the checkpoint: model.norm.weight"):
        moekit.from_pretrained(bad)


def test_unsupported_config_value(mixtral_dir, tmp_path):
    bad = _copy(mixtral_dir, tmp_path / "c", config_edit=lambda c: c.update(hidden_act="tanh"))
    with pytest.raises(ValueError, match=r"hidden_act='tanh' is not supported"):
        moekit.from_pretrained(bad)


def test_save_needs_model_type(mixtral_dir, tmp_path):
    model = moekit.MoETransformer(moekit.from_pretrained(mixtral_dir).config)
    with pytest.raises(ValueError, match="needs model_type="):
        save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="layout='packed' is invalid"):
        save_pretrained(model, tmp_path, model_type="mixtral", layout="packed")
    # with a model_type, a moekit-built model saves and loads back exactly
    save_pretrained(model, tmp_path, model_type="mixtral")
    again = moekit.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param("float16", id="fp16-name")])
def test_dtype(mixtral_dir, dtype):
    model = moekit.from_pretrained(mixtral_dir, dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else torch.float16
    assert {p.dtype for p in model.parameters()} == {want}


def test_bad_dtype(mixtral_dir):
    with pytest.raises(ValueError, match="dtype='fp8' is invalid"):
        moekit.from_pretrained(mixtral_dir, dtype="fp8")


def test_tied_embeddings(tmp_path):
    src = tmp_path / "src"
    save_tiny("qwen3_moe", src, {"tie_word_embeddings": True})
    model = moekit.from_pretrained(src)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor after loading
    embed = load_file(src / "model.safetensors")["model.embed_tokens.weight"]
    # a checkpoint may store the tied copy; an equal one is accepted, a different one refused
    same = _copy(src, tmp_path / "same", tensors_edit=lambda t: t.update({"lm_head.weight": embed.clone()}))
    moekit.from_pretrained(same)
    bad = _copy(src, tmp_path / "bad", tensors_edit=lambda t: t.update({"lm_head.weight": embed + 1}))
    with pytest.raises(ValueError, match="lm_head.weight in .* differs from model.embed_tokens.weight, but "
                                         "config.json ties them"):
        moekit.from_pretrained(bad)


def test_quantized_checkpoint_is_refused(mixtral_dir, tmp_path):
    bad = _copy(mixtral_dir, tmp_path / "c",
                config_edit=lambda c: c.update(quantization_config={"quant_method": "fp8"}))
    with pytest.raises(ValueError, match=r"quantized checkpoint \(quant_method='fp8'\).*dequantize"):
        moekit.from_pretrained(bad)


def test_keys_transformers_ignores_are_ignored(tmp_path):
    # rotary inv_freq buffers (older checkpoints) and DeepSeek-V3's multi-token-prediction layer
    src = tmp_path / "src"
    save_tiny("deepseek_v3", src, {"num_nextn_predict_layers": 1})
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(2),
             "model.layers.2.embed_tokens.weight": torch.zeros(64, 32),
             "model.layers.2.mlp.experts.0.up_proj.weight": torch.zeros(16, 32)}
    with_extra = _copy(src, tmp_path / "extra", tensors_edit=lambda t: t.update(extra))
    a, b = moekit.from_pretrained(src), moekit.from_pretrained(with_extra)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    # without the MTP setting in config.json, a layer beyond num_hidden_layers is an error
    bad = _copy(with_extra, tmp_path / "bad", config_edit=lambda c: c.update(num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="map to no model parameter: model.layers.2."):
        moekit.from_pretrained(bad)


@pytest.mark.parametrize("change, field", [
    pytest.param({"qk_norm": "head"}, "qk_norm='head' (loads back as 'none')", id="qk-norm"),
    pytest.param({"moe": moekit.MoEConfig(d_model=32, d_ff=48, num_experts=4, top_k=2, normalize_topk=False)},
                 "moe.normalize_topk=False (loads back as True)", id="no-renormalise"),
    pytest.param({"norm": "layernorm"}, "norm='layernorm' (loads back as 'rmsnorm')", id="layernorm"),
])
def test_save_refuses_a_config_the_model_type_cannot_express(mixtral_dir, tmp_path, change, field):
    original = moekit.from_pretrained(mixtral_dir).config
    model = moekit.MoETransformer(original.replace(**change))
    with pytest.raises(ValueError, match=r"cannot be written as model_type='mixtral'.*" + re.escape(field)):
        save_pretrained(model, tmp_path, model_type="mixtral")
    # training-only settings need not be expressible
    ok = original.replace(moe=moekit.MoEConfig(d_model=32, d_ff=48, num_experts=4, top_k=2, z_loss_coef=0.1))
    save_pretrained(moekit.MoETransformer(ok), tmp_path / "ok", model_type="mixtral")
