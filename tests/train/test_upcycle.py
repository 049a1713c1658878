"""Sparse upcycling: an MoE whose experts are exact copies of the dense MLP equals its dense parent."""

from __future__ import annotations

import pytest
import torch

from moekit.model.config import ModelConfig
from moekit.train.run import build_model
from moekit.train.upcycle import read_dense_tensors, upcycle

from .helpers import make_trainer, tiny_model_config


def _dense_config() -> ModelConfig:
    return tiny_model_config().replace(moe=None, moe_layers="none")  # d_ff=64 dense MLPs


def _moe_config(**moe_changes) -> ModelConfig:
    changes = dict(d_ff=64, noisy_gating=False, expert_bias=False)
    changes.update(moe_changes)
    return tiny_model_config(**changes)


@pytest.mark.parametrize("moe_changes", [
    pytest.param({}, id="softmax-top2"),
    pytest.param({"score_func": "sigmoid", "top_k": 1}, id="sigmoid-top1"),
    pytest.param({"activation": "gelu"}, id="plain-mlp"),
])
def test_upcycled_moe_at_step_0_equals_dense_parent(moe_changes):
    dense_cfg = _dense_config()
    if moe_changes.get("activation") == "gelu":
        dense_cfg = dense_cfg.replace(ffn_activation="gelu")
    dense = build_model(dense_cfg, seed=1).eval()
    moe = build_model(_moe_config(**moe_changes), seed=2).eval()
    upcycle(moe, {k: v for k, v in dense.state_dict().items()})
    tokens_BS = torch.randint(0, dense_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        want, got = dense(tokens_BS), moe(tokens_BS)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_noise_breaks_the_symmetry_between_experts():
    dense = build_model(_dense_config(), seed=1)
    moe = build_model(_moe_config(), seed=2)
    upcycle(moe, dict(dense.state_dict()), noise=0.01, seed=0)
    w_EDF = moe.model.layers[0].mlp.experts.w_up_EDF
    dense_FD = dense.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w_EDF[0], w_EDF[1])
    torch.testing.assert_close(w_EDF[0], dense_FD.t(), atol=0.01, rtol=0)  # close to the copy


def test_upcycle_from_a_dense_run_folder(tmp_path):
    make_trainer(tmp_path, model_config=_dense_config(), steps=2, checkpoint_every=2).fit()
    tensors = read_dense_tensors(tmp_path)
    moe = build_model(_moe_config(), seed=3)
    upcycle(moe, tensors)
    assert torch.equal(moe.model.layers[1].mlp.experts.w_down_EFD[3],
                       tensors["model.layers.1.mlp.down_proj.weight"].t())


@pytest.mark.parametrize("changes, message", [
    pytest.param({"d_ff": 32}, "expert d_ff must equal the dense d_ff", id="expert-width"),
    pytest.param({"num_shared_experts": 1}, "lacks", id="shared-experts-not-in-parent"),
])
def test_a_parent_that_does_not_fit_is_a_clear_error(changes, message):
    dense = build_model(_dense_config(), seed=1)
    moe = build_model(_moe_config(**changes), seed=2)
    with pytest.raises(ValueError, match=message):
        upcycle(moe, dict(dense.state_dict()))


def test_another_architecture_is_not_a_dense_parent():
    dense = build_model(_dense_config().replace(d_model=64, n_heads=2), seed=1)
    moe = build_model(_moe_config(), seed=2)
    with pytest.raises(ValueError, match="not a dense parent"):
        upcycle(moe, dict(dense.state_dict()))
