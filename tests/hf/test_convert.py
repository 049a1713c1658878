"""`moekit convert`: Hugging Face -> moekit -> Hugging Face keeps every tensor; dtype and layout changes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import moekit
from moekit.cli import main
from tests.hf.tiny import save_tiny, tiny_hf_model


@pytest.mark.parametrize("model_type", [pytest.param(t, id=t) for t in ("mixtral", "deepseek_v3", "jamba")])
def test_hf_moekit_hf_bit_exact(tmp_path, model_type, capsys):
    src, mk, back = tmp_path / "src", tmp_path / "mk", tmp_path / "back"
    save_tiny(model_type, src)
    assert main(["convert", str(src), str(mk), "--to", "moekit"]) == 0
    assert main(["convert", str(mk), str(back)]) == 0
    assert "wrote" in capsys.readouterr().out
    original, again = load_file(src / "model.safetensors"), load_file(back / "model.safetensors")
    assert sorted(original) == sorted(again)
    for key, tensor in original.items():
        assert torch.equal(again[key], tensor), key
    # the moekit layout holds moekit's names: 3-D expert weights
    assert any(k.endswith("experts.w_gate_EDF") for k in load_file(mk / "model.safetensors"))
    a, b = moekit.from_pretrained(src), moekit.from_pretrained(mk)
    tokens = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        assert torch.equal(a(tokens).logits, b(tokens).logits)


def test_dtype_and_fused_layout(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_tiny("qwen3_moe", src)
    assert main(["convert", str(src), str(dst), "--dtype", "bfloat16", "--layout", "fused",
                 "--max-shard-size", "10KB"]) == 0
    assert (dst / "model.safetensors.index.json").is_file()
    model = moekit.from_pretrained(dst)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    want = moekit.from_pretrained(src)
    for (name, a), (_, b) in zip(model.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b.to(torch.bfloat16)), name


def test_errors_are_reported(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_bf16_checkpoint_round_trip_is_bit_exact(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_hf_model("olmoe").to(torch.bfloat16).save_pretrained(src)
    model = moekit.from_pretrained(src)  # dtype from config.json
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(dst)
    original, again = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
    assert sorted(original) == sorted(again)
    for key, tensor in original.items():
        assert again[key].dtype == torch.bfloat16 and torch.equal(again[key], tensor), key
