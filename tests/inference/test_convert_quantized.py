"""`moekit convert SRC DST --quantize int8|int4`: the stored quantized checkpoint loads (in memory and
offloaded) bit for bit like SRC quantized on load; bad flags and mismatched scales are clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import moekit
from moekit.cli import main
from moekit.inference.quant import QuantFormat
from tests.hf.tiny import VOCAB, save_tiny
from tests.inference.offload_helpers import greedy_logits


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    save_tiny("mixtral", path, overrides=dict(intermediate_size=64))
    return path


@pytest.mark.parametrize("method, attention", [("int8", False), ("int8", True), ("int4", False)])
def test_converted_equals_quantize_on_load(src, tmp_path, capsys, method, attention):
    dst = tmp_path / "q"
    flags = ["--quantize-attention"] if attention else []
    assert main(["convert", str(src), str(dst), "--quantize", method, *flags]) == 0
    assert f"{method} experts" in capsys.readouterr().out
    meta = json.loads((dst / "moekit_config.json").read_text())
    assert meta["quantize"] == {"method": method, "group_size": 32, "attention": attention}
    want = moekit.from_pretrained(src, quantize=method, **({"quantize_attention": True} if attention else {}))
    stored = moekit.from_pretrained(dst)
    fmt = QuantFormat(want.moe_layers()[0].config, torch.float32, method)
    offloaded = moekit.from_pretrained(dst, offload_experts=True, expert_cache=2 * fmt.spec().nbytes)
    for name, t in want.state_dict().items():
        assert torch.equal(t, stored.state_dict()[name]), name
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    ref = greedy_logits(want, prompt, 4)
    for other in (stored, offloaded):
        for w, g in zip(ref, greedy_logits(other, prompt, 4)):
            assert torch.equal(w, g)
    assert offloaded.expert_cache.stats.misses > 0


def test_quantize_on_load_offloaded_with_attention_equals_in_memory(src):
    """The offloaded loader quantizes attention too (it once called a bool)."""
    mem = moekit.from_pretrained(src, quantize="int8", quantize_attention=True)
    fmt = QuantFormat(mem.moe_layers()[0].config, torch.float32, "int8")
    off = moekit.from_pretrained(src, quantize="int8", quantize_attention=True, offload_experts=True,
                                 expert_cache=fmt.spec().nbytes)
    assert type(off.model.layers[0].self_attn.q_proj).__name__ == "QuantLinear"
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(1))
    for w, g in zip(greedy_logits(mem, prompt, 3), greedy_logits(off, prompt, 3)):
        assert torch.equal(w, g)


@pytest.mark.parametrize("flags, match", [
    pytest.param(["--quantize", "int8", "--to", "hf"], "native layout", id="to-hf"),
    pytest.param(["--quantize-attention"], "needs --quantize", id="attention-alone"),
    pytest.param(["--quantize", "int4", "--layout", "fused"], "describe a Hugging Face layout", id="layout"),
])
def test_bad_flags(src, tmp_path, capsys, flags, match):
    assert main(["convert", str(src), str(tmp_path / "q"), *flags]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_already_quantized_source_and_mismatched_scales(src, tmp_path, capsys):
    dst = tmp_path / "q"
    assert main(["convert", str(src), str(dst), "--quantize", "int8"]) == 0
    assert main(["convert", str(dst), str(tmp_path / "again"), "--quantize", "int4"]) == 2
    assert "already holds quantized weights" in capsys.readouterr().err
    file = dst / "model.safetensors"
    tensors = load_file(file)
    key = "model.layers.0.mlp.experts.w_gate_EDF_scales"
    tensors[key] = tensors[key][:, :-1].contiguous()  # int8: one scale per output channel, one short
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="scales do not match the weights"):
        moekit.from_pretrained(dst)
