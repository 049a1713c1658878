"""The conversion engine on plain tensors: each rule kind forwards and backwards, and its errors."""

from __future__ import annotations

import pytest
import torch

from moekit.hf.convert import checkpoint_to_model, model_to_checkpoint
from moekit.hf.rules import Fused, Rename, StackExperts, Unflatten

E, D, F = 3, 4, 5


class Source:
    def __init__(self, tensors):
        self.tensors = tensors

    def keys(self):
        return list(self.tensors)

    def get(self, key):
        return self.tensors[key]


def _split_checkpoint():
    g = torch.Generator().manual_seed(0)
    ckpt = {"embed.weight": torch.randn(7, D, generator=g)}
    for layer in range(2):
        for e in range(E):
            ckpt[f"layers.{layer}.moe.experts.{e}.w1.weight"] = torch.randn(F, D, generator=g)
            ckpt[f"layers.{layer}.moe.experts.{e}.w3.weight"] = torch.randn(F, D, generator=g)
            ckpt[f"layers.{layer}.moe.experts.{e}.w2.weight"] = torch.randn(D, F, generator=g)
        ckpt[f"layers.{layer}.moe.gate.weight"] = torch.randn(E, D, generator=g)
    return ckpt


SPLIT = (
    StackExperts("layers.{layer}.moe.experts.{expert}.w1.weight", "layers.{layer}.mlp.experts.w_gate_EDF"),
    StackExperts("layers.{layer}.moe.experts.{expert}.w3.weight", "layers.{layer}.mlp.experts.w_up_EDF"),
    StackExperts("layers.{layer}.moe.experts.{expert}.w2.weight", "layers.{layer}.mlp.experts.w_down_EFD"),
)
FUSED = (
    Fused("layers.{layer}.moe.experts.gate_up_proj",
          ("layers.{layer}.mlp.experts.w_gate_EDF", "layers.{layer}.mlp.experts.w_up_EDF"),
          dim=1, transpose=True),
    Rename("layers.{layer}.moe.experts.down_proj", "layers.{layer}.mlp.experts.w_down_EFD", transpose=True),
)
COMMON = (Rename("layers.{layer}.moe.gate.weight", "layers.{layer}.mlp.router.gate.weight"),)
SHAPES = {"embed.weight": (7, D)}
for _l in range(2):
    SHAPES.update({f"layers.{_l}.mlp.experts.w_gate_EDF": (E, D, F),
                   f"layers.{_l}.mlp.experts.w_up_EDF": (E, D, F),
                   f"layers.{_l}.mlp.experts.w_down_EFD": (E, F, D),
                   f"layers.{_l}.mlp.router.gate.weight": (E, D)})


def _load(rules, ckpt, shapes=SHAPES):
    return dict(checkpoint_to_model(rules, Source(ckpt), shapes, name="test"))


def test_split_layout_stacks_and_transposes():
    ckpt = _split_checkpoint()
    model = _load(COMMON + SPLIT + FUSED, ckpt)
    # hand check: expert 2's gate weight (F, D) is w_gate_EDF[2].T; x @ w_gate[e] == Linear(x).
    x = torch.randn(2, D)
    w1 = ckpt["layers.1.moe.experts.2.w1.weight"]
    assert torch.equal(model["layers.1.mlp.experts.w_gate_EDF"][2], w1.T)
    torch.testing.assert_close(x @ model["layers.1.mlp.experts.w_gate_EDF"][2],
                               torch.nn.functional.linear(x, w1))
    assert torch.equal(model["layers.0.mlp.experts.w_down_EFD"][1],
                       ckpt["layers.0.moe.experts.1.w2.weight"].T)
    assert torch.equal(model["embed.weight"], ckpt["embed.weight"])


@pytest.mark.parametrize("layout", [pytest.param("split", id="split"), pytest.param("fused", id="fused")])
def test_round_trip_bit_exact(layout):
    ckpt = _split_checkpoint()
    model = _load(COMMON + SPLIT + FUSED, ckpt)
    back = model_to_checkpoint(COMMON + (SPLIT if layout == "split" else FUSED), model)
    if layout == "split":
        assert sorted(back) == sorted(ckpt)
        for k in ckpt:
            assert torch.equal(back[k], ckpt[k]), k
    else:
        # the fused layout is transformers' in-memory one: gate_up (E, 2F, D), gate first.
        gate_up = back["layers.0.moe.experts.gate_up_proj"]
        assert gate_up.shape == (E, 2 * F, D)
        assert torch.equal(gate_up[1, :F], ckpt["layers.0.moe.experts.1.w1.weight"])
        assert torch.equal(gate_up[1, F:], ckpt["layers.0.moe.experts.1.w3.weight"])
        again = _load(COMMON + SPLIT + FUSED, back)
        for k in model:
            assert torch.equal(again[k], model[k]), k


def test_interleaved_fused_round_trip():
    rule = Fused("gate_up", ("g", "u"), dim=-1, interleaved=True)
    fused = torch.arange(2 * 3 * 8.0).reshape(2, 3, 8)
    pieces = rule.to_model(Source({"gate_up": fused}).get, {"g": (2, 3, 4), "u": (2, 3, 4)}, None)
    assert torch.equal(pieces["g"], fused[..., 0::2]) and torch.equal(pieces["u"], fused[..., 1::2])
    assert torch.equal(rule.to_hf(pieces.__getitem__, None)["gate_up"], fused)


def test_unequal_pieces_take_sizes_from_the_model():
    rule = Fused("Wqkv", ("q", "k", "v"), dim=0)
    shapes = {"q": (4, 3), "k": (2, 3), "v": (2, 3)}
    w = torch.randn(8, 3)
    pieces = rule.to_model({"Wqkv": w}.__getitem__, shapes, None)
    assert torch.equal(pieces["q"], w[:4]) and torch.equal(pieces["k"], w[4:6])
    assert torch.equal(pieces["v"], w[6:])
    assert torch.equal(rule.to_hf(pieces.__getitem__, None)["Wqkv"], w)
    with pytest.raises(ValueError, match="Wqkv: dim 0 has size 9, expected 8 = 4 \\+ 2 \\+ 2"):
        rule.to_model({"Wqkv": torch.randn(9, 3)}.__getitem__, shapes, None)


@pytest.mark.parametrize("transpose", [pytest.param(True, id="gate-transposed"),
                                       pytest.param(False, id="down")])
def test_unflatten(transpose):
    rule = Unflatten("w1", "w_EDF", transpose=transpose)
    flat = torch.randn(3 * 5, 4)  # 3 experts, F=5, D=4: rows of expert e are flat[5e:5e+5]
    want_shape = (3, 4, 5) if transpose else (3, 5, 4)
    out = rule.to_model({"w1": flat}.__getitem__, {"w_EDF": want_shape}, None)["w_EDF"]
    assert out.shape == want_shape
    expert1 = flat[5:10]
    assert torch.equal(out[1], expert1.T if transpose else expert1)
    assert torch.equal(rule.to_hf({"w_EDF": out}.__getitem__, None)["w1"], flat)
    with pytest.raises(ValueError, match="is not \\(num_experts \\* F, D\\) for num_experts=4"):
        rule.to_model({"w1": flat}.__getitem__, {"w_EDF": (4, 4, 5)}, None)


def test_unknown_checkpoint_key():
    ckpt = _split_checkpoint()
    ckpt["layers.0.moe.surprise.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="map to no model parameter: layers.0.moe.surprise.weight"):
        _load(COMMON + SPLIT, ckpt)


def test_unfilled_model_parameter():
    ckpt = _split_checkpoint()
    del ckpt["embed.weight"]
    with pytest.raises(ValueError, match="not found in the checkpoint: embed.weight"):
        _load(COMMON + SPLIT, ckpt)


def test_missing_expert():
    ckpt = _split_checkpoint()
    del ckpt["layers.1.moe.experts.1.w3.weight"]
    with pytest.raises(ValueError, match="missing 'layers.1.moe.experts.1.w3.weight' \\(expert 1 of 3\\)"):
        _load(COMMON + SPLIT, ckpt)


def test_extra_expert_contradicts_config():
    ckpt = _split_checkpoint()
    ckpt["layers.0.moe.experts.3.w1.weight"] = torch.zeros(F, D)
    with pytest.raises(ValueError, match="expert 3 is beyond the config's 3 experts"):
        _load(COMMON + SPLIT, ckpt)


def test_wrong_shape_names_key():
    ckpt = _split_checkpoint()
    ckpt["layers.1.moe.gate.weight"] = torch.zeros(E + 1, D)
    with pytest.raises(ValueError, match=r"layers.1.moe.gate.weight: shape \(4, 4\) does not fit"):
        _load(COMMON + SPLIT, ckpt)


def test_both_layouts_at_once_is_an_error():
    ckpt = _split_checkpoint()
    fused = model_to_checkpoint(COMMON + FUSED, _load(COMMON + SPLIT, ckpt))
    ckpt["layers.0.moe.experts.gate_up_proj"] = fused["layers.0.moe.experts.gate_up_proj"]
    with pytest.raises(ValueError, match="filled twice"):
        _load(COMMON + SPLIT + FUSED, ckpt)


def test_inconsistent_expert_shape():
    ckpt = _split_checkpoint()
    ckpt["layers.0.moe.experts.2.w3.weight"] = torch.zeros(F + 1, D)
    with pytest.raises(ValueError, match=r"layers.0.moe.experts.2.w3.weight: expert 2 has shape \(6, 4\)"):
        _load(COMMON + SPLIT, ckpt)
