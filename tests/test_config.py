"""MoEConfig validation: every invalid setting raises a ValueError naming the field."""

from __future__ import annotations

import pytest

from moekit.config import MoEConfig

BASE = dict(d_model=16, d_ff=32, num_experts=8, top_k=2)

INVALID = [
    pytest.param(dict(top_k=9), "top_k", id="topk-gt-experts"),
    pytest.param(dict(top_k=0), "top_k", id="topk-zero"),
    pytest.param(dict(num_experts=0), "num_experts", id="no-experts"),
    pytest.param(dict(d_model=-1), "d_model", id="negative-dmodel"),
    pytest.param(dict(capacity_factor=0.0), "capacity_factor", id="capacity-zero"),
    pytest.param(dict(capacity_factor=-1.0), "capacity_factor", id="capacity-negative"),
    pytest.param(dict(router="magic"), "router", id="unknown-router"),
    pytest.param(dict(activation="tanh"), "activation", id="unknown-activation"),
    pytest.param(dict(score_func="relu"), "score_func", id="unknown-score"),
    pytest.param(dict(num_groups=3, topk_groups=1), "num_groups", id="groups-not-dividing"),
    pytest.param(dict(num_groups=4), "num_groups", id="groups-without-topk-groups"),
    pytest.param(dict(num_groups=4, topk_groups=5), "topk_groups", id="topk-groups-too-many"),
    pytest.param(dict(num_groups=8, topk_groups=1, top_k=2), "topk_groups", id="groups-too-few-experts"),
    pytest.param(dict(num_groups=8, topk_groups=2, group_score="top2_sum"), "group_score", id="top2-of-1"),
    pytest.param(dict(jitter_eps=1.5), "jitter_eps", id="jitter"),
    pytest.param(dict(router="hash"), "hash_vocab_size", id="hash-without-vocab"),
    pytest.param(dict(router="expert_choice", expert_bias=True), "expert_bias", id="bias-not-topk"),
    pytest.param(dict(shared_expert_gate=True), "num_shared_experts", id="gate-without-shared"),
    pytest.param(dict(softmax_after_topk=True, score_func="sigmoid"), "softmax_after_topk", id="sm-after-sigmoid"),
    pytest.param(dict(load_balance_coef=-0.1), "load_balance_coef", id="negative-coef"),
    pytest.param(dict(load_balance_granularity="epoch"), "load_balance_granularity", id="granularity"),
    pytest.param(dict(drop_policy="random"), "drop_policy", id="drop-policy"),
]


@pytest.mark.parametrize("override,field", INVALID)
def test_invalid_config_names_field(override: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{**BASE, **override})


def test_config_is_frozen_and_kw_only() -> None:
    cfg = MoEConfig(**BASE)
    with pytest.raises(AttributeError):
        cfg.top_k = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        MoEConfig(16, 32, 8)  # type: ignore[misc]


def test_json_round_trip(tmp_path) -> None:
    cfg = MoEConfig(**BASE, capacity_factor=1.25, num_shared_experts=2, score_func="sigmoid")
    cfg.save(tmp_path / "moe.json")
    assert MoEConfig.load(tmp_path / "moe.json") == cfg


def test_unknown_json_field(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown MoEConfig field"):
        MoEConfig.from_dict({**BASE, "n_experts": 4})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        MoEConfig.load(tmp_path / "bad.json")
