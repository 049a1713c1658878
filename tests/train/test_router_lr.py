"""router_lr_mult: the MoE routers' matrices in their own AdamW group at lr x the multiplier."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from moekit.train.run import build_model
from moekit.train.trainer import TrainConfig, build_optimizer, is_router, lr_at

from .helpers import make_trainer, tiny_model_config, tiny_train_config


def _names(model, group) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_routers_get_their_own_group_only_when_the_multiplier_is_not_one():
    model = build_model(tiny_model_config(), seed=0)
    assert len(build_optimizer(model, tiny_train_config()).param_groups) == 2
    optimizer = build_optimizer(model, tiny_train_config(router_lr_mult=4.0))
    assert len(optimizer.param_groups) == 3
    routers = {n for n, p in model.named_parameters() if ".router." in n}
    assert routers and _names(model, optimizer.param_groups[2]) == routers  # gate and noise gate, 2 layers
    assert not any(is_router(n) for g in optimizer.param_groups[:2] for n in _names(model, g))
    assert [g["lr_mult"] for g in optimizer.param_groups] == [1.0, 1.0, 4.0]
    assert optimizer.param_groups[2]["weight_decay"] == optimizer.param_groups[0]["weight_decay"] > 0
    dense = build_model(replace(tiny_model_config(), moe=None, moe_layers="none"), seed=0)
    assert len(build_optimizer(dense, tiny_train_config(router_lr_mult=4.0)).param_groups) == 2


def _adamw_first_step(w, g, *, lr: float, config: TrainConfig):
    """AdamW's first update written out: bias-corrected m = g and v = g^2, so the step is g / (|g| + eps)."""
    return w * (1 - lr * config.weight_decay) - lr * g / (g.abs() + config.eps)


def test_first_step_moves_routers_at_lr_times_mult_and_the_rest_at_lr(tmp_path):
    trainer = make_trainer(tmp_path / "run", router_lr_mult=4.0, checkpoint_every=0)
    params = dict(trainer.model.named_parameters())
    router = next(n for n in params if n.endswith("router.gate.weight"))
    expert = next(n for n in params if "experts.w_up" in n)
    before = {n: params[n].detach().clone() for n in (router, expert)}
    trainer.train_step()
    lr0 = lr_at(0, trainer.config)
    for name, lr in ((router, 4.0 * lr0), (expert, lr0)):
        expected = _adamw_first_step(before[name], params[name].grad, lr=lr, config=trainer.config)
        torch.testing.assert_close(params[name].detach(), expected, rtol=1e-5, atol=1e-7)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([lr0, lr0, 4.0 * lr0])


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_bad_multiplier_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="router_lr_mult"):
        tiny_train_config(router_lr_mult=bad)


def test_resume_cannot_switch_between_one_and_another_multiplier(tmp_path):
    make_trainer(tmp_path / "run", steps=4, checkpoint_every=4).fit()
    with pytest.raises(ValueError, match="router_lr_mult=1.0, this run has 2.0"):
        make_trainer(tmp_path / "run", steps=8, checkpoint_every=4, router_lr_mult=2.0).fit(resume=True)


def test_a_run_with_a_multiplier_resumes_to_the_uninterrupted_run(tmp_path):
    from moekit.train.metrics import read_metrics

    make_trainer(tmp_path / "straight", steps=6, checkpoint_every=3, router_lr_mult=3.0).fit()
    make_trainer(tmp_path / "stopped", steps=3, checkpoint_every=3, router_lr_mult=3.0).fit()
    resumed = make_trainer(tmp_path / "stopped", steps=6, checkpoint_every=3, router_lr_mult=3.0)
    resumed.fit(resume=True)
    assert [g["lr_mult"] for g in resumed.optimizer.param_groups] == [1.0, 1.0, 3.0]
    losses = [[r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")] for name in ("straight", "stopped")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
