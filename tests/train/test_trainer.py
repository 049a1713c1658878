"""Trainer: resume to the bit (also after a kill mid-checkpoint), Ctrl-C, non-finite loss, bad resumes."""

from __future__ import annotations

import dataclasses
import signal

import pytest
import torch

from moekit.train import checkpoint as ckpt
from moekit.train.metrics import read_metrics
from moekit.train.trainer import NonFiniteLossError, TrainConfig, lr_at, no_decay

from .helpers import make_trainer, tiny_model_config


def _everything(trainer) -> dict[str, torch.Tensor]:
    """Every tensor a run depends on: model params and buffers (router biases, load counters),
    optimizer state, and the global RNG."""
    out = {f"model.{k}": v for k, v in ckpt.model_tensors(trainer.model).items()}
    opt, _ = ckpt.optimizer_tensors(trainer.optimizer)
    out.update({f"opt.{k}": v for k, v in opt.items()})
    out["rng"] = torch.get_rng_state()
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _losses(out_dir):
    return [(r["step"], r["loss"], r.get("val_loss")) for r in read_metrics(out_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    trainer = make_trainer(out, checkpoint_every=2)
    result = trainer.fit()
    assert result.step == 8 and not result.interrupted
    return _everything(trainer), _losses(out)


def _kill_at(trainer, monkeypatch, step: int) -> None:
    """Make the trainer die (no clean-up, no checkpoint) when it starts step `step`."""
    real = trainer.train_step

    def dying():
        if trainer.step == step:
            raise KeyboardInterrupt("SIGKILL stand-in")
        return real()

    monkeypatch.setattr(trainer, "train_step", dying)


def test_resume_after_kill_is_bit_identical(tmp_path, monkeypatch, straight):
    first = make_trainer(tmp_path, checkpoint_every=2)
    _kill_at(first, monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    # A new process: different init seed, so every tensor must come from the checkpoint.
    second = make_trainer(tmp_path, checkpoint_every=2, init_seed=123)
    assert second.fit(resume=True).step == 8
    _assert_same(_everything(second), straight[0])
    assert _losses(tmp_path) == straight[1]


def test_kill_while_writing_a_checkpoint(tmp_path, monkeypatch, straight):
    first = make_trainer(tmp_path, checkpoint_every=2)
    real_write = ckpt._write_file

    def dying_write(path, data):
        if path.parent.name.startswith(".tmp-step_00000006") and path.name == "optimizer.safetensors":
            raise KeyboardInterrupt("killed while writing checkpoint 6")
        real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", dying_write)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    monkeypatch.setattr(ckpt, "_write_file", real_write)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")][0] == "step_00000004"
    second = make_trainer(tmp_path, checkpoint_every=2, init_seed=7)
    assert second.fit(resume=True).step == 8
    _assert_same(_everything(second), straight[0])
    assert _losses(tmp_path) == straight[1]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_identically(tmp_path, monkeypatch, straight):
    first = make_trainer(tmp_path, checkpoint_every=0)
    real = first.train_step

    def interrupted():
        record = real()
        if first.step == 3:
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, during a step
        return record

    monkeypatch.setattr(first, "train_step", interrupted)
    result = first.fit()
    assert result.interrupted and result.step == 3
    assert result.checkpoint is not None and result.checkpoint.name == "step_00000003"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    second = make_trainer(tmp_path, checkpoint_every=0, init_seed=5)
    assert second.fit(resume=True).step == 8
    _assert_same(_everything(second), straight[0])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, checkpoint_every=2)
    real_forward = trainer._forward

    def nan_at_step_3(micro_step):
        out = real_forward(micro_step)
        if trainer.step == 3:
            return dataclasses.replace(out, loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(trainer, "_forward", nan_at_step_3)
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 3.*last good checkpoint"):
        trainer.fit()
    path, skipped = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert path.name == "step_00000002" and skipped == []


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_another_architecture_is_refused_and_changes_nothing(tmp_path):
    make_trainer(tmp_path, steps=2, checkpoint_every=2).fit()
    before = _snapshot(tmp_path)
    other = make_trainer(tmp_path, steps=4, model_config=tiny_model_config(num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="another architecture"):
        other.fit(resume=True)
    assert _snapshot(tmp_path) == before


def test_resume_from_a_corrupt_checkpoint_is_refused_and_changes_nothing(tmp_path):
    make_trainer(tmp_path, steps=2, checkpoint_every=2).fit()
    model_file = tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"
    raw = bytearray(model_file.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    model_file.write_bytes(bytes(raw))
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="no usable checkpoint.*corrupt"):
        make_trainer(tmp_path, steps=4).fit(resume=True)
    assert _snapshot(tmp_path) == before


def test_new_run_over_old_checkpoints_is_refused(tmp_path):
    make_trainer(tmp_path, steps=2, checkpoint_every=2).fit()
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        make_trainer(tmp_path, steps=2).fit()
    assert _snapshot(tmp_path) == before


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway: floor + (1 - floor) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_weight_decay_skips_norms_biases_and_router_biases():
    trainer = make_trainer(__import__("pathlib").Path("/nonexistent-unused"),
                           model_config=tiny_model_config(router_bias=True, expert_mlp_bias=True))
    decay_group, skip_group = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    skipped = {names[id(p)] for p in skip_group["params"]}
    decayed = {names[id(p)] for p in decay_group["params"]}
    assert skip_group["weight_decay"] == 0 and decay_group["weight_decay"] > 0
    assert {"model.norm.weight", "model.layers.0.mlp.router.gate.bias",
            "model.layers.0.mlp.experts.b_up_EF"} <= skipped
    assert {"model.layers.0.mlp.experts.w_up_EDF", "model.layers.0.mlp.router.gate.weight",
            "model.embed_tokens.weight"} <= decayed
    assert all(not no_decay(n, p) for n, p in trainer.model.named_parameters() if n in decayed)


def test_metrics_have_routing_statistics_per_moe_layer(straight, tmp_path):
    trainer = make_trainer(tmp_path, steps=2, checkpoint_every=0, eval_every=2)
    trainer.fit()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and "val_loss" in records[1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "aux/load_balance", "aux/z"):
        assert key in records[0], key
    moe = records[0]["moe"]
    assert len(moe) == 2  # both layers are MoE
    # 2 micro-batches x 4 sequences x 16 tokens x top-2 slots, dropless
    assert sum(moe[0]["tokens_per_expert"]) == 2 * 4 * 16 * 2
    assert moe[0]["dropped_fraction"] == 0.0 and moe[0]["max_vio"] >= 0.0


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """2 micro-batches of 4 see the same sequences as one batch of 8 (positions step*8 + b), and a
    dense model's mean loss splits evenly, so one optimizer step lands on the same weights."""
    dense = tiny_model_config().replace(moe=None, moe_layers="none")
    accum = make_trainer(tmp_path / "a", model_config=dense, steps=1, batch_size=4, grad_accum=2,
                         checkpoint_every=0)
    big = make_trainer(tmp_path / "b", model_config=dense, steps=1, batch_size=8, grad_accum=1,
                       checkpoint_every=0)
    accum.fit()
    big.fit()
    for (name, a), (_, b) in zip(accum.model.named_parameters(), big.model.named_parameters()):
        # Adam's first step is ~lr * sign(g): fp noise in near-zero gradients shows at ~1e-6.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert _losses(tmp_path / "a")[0][1] == pytest.approx(_losses(tmp_path / "b")[0][1], rel=1e-6)
    # Adam hides a gradient scale error; the logged (pre-clip) gradient norm does not.
    norms = [read_metrics(tmp_path / d / "metrics.jsonl")[0]["grad_norm"] for d in ("a", "b")]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)


def test_bf16_autocast_trains(tmp_path):
    trainer = make_trainer(tmp_path, steps=2, checkpoint_every=0, bf16=True)
    trainer.fit()
    records = _losses(tmp_path)
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(loss)) for _, loss, _ in records)
    assert trainer.model.lm_head.weight.dtype == torch.float32  # autocast: weights stay fp32


def test_a_top1_router_that_cannot_learn_from_the_loss_is_warned_about(tmp_path):
    import warnings

    with pytest.warns(UserWarning, match="top_k=1 with normalize_topk=True"):
        make_trainer(tmp_path / "a", model_config=tiny_model_config(top_k=1, noisy_gating=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # weighted by its probability (Switch): no warning
        make_trainer(tmp_path / "b", model_config=tiny_model_config(top_k=1, noisy_gating=False,
                                                                      normalize_topk=False))


@pytest.mark.parametrize("schedule, expected", [("constant", 0.01), ("lr", 0.005)])
def test_the_expert_bias_step_follows_its_schedule(tmp_path, schedule, expected):
    """The tiny model's bias_update_rate is 0.01; the first step's lr is half the peak (2 warmup
    steps), so the "lr" schedule moves each bias by 0.005 there and "constant" by 0.01."""
    from moekit.layer import moe_layers

    trainer = make_trainer(tmp_path, bias_update_schedule=schedule)
    trainer.train_step()
    for layer in moe_layers(trainer.model):
        moved = layer.router.expert_bias.abs().tolist()  # each bias moves by the step or not at all
        assert max(moved) == pytest.approx(expected, rel=1e-6)
        assert all(m == 0 or m == pytest.approx(expected, rel=1e-6) for m in moved)


def test_an_unknown_bias_update_schedule_is_refused():
    from moekit.train.trainer import TrainConfig

    with pytest.raises(ValueError, match="bias_update_schedule='cosine' is invalid: must be one of constant, lr"):
        TrainConfig(steps=1, bias_update_schedule="cosine")
