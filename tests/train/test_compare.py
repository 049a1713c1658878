"""moekit compare: equal active compute across variants, the report's arithmetic, a tiny end-to-end run."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moekit.cli import main
from moekit.model import MoETransformer
from moekit.model.accounting import num_params
from moekit.train.compare import (
    DEFAULT_TRAIN,
    VARIANTS,
    CompareConfig,
    check_variants,
    model_config,
    run_compare,
)
from moekit.train.curves import steps_to_reach
from moekit.train.report import markdown, summarize
from moekit.train.series import flops_per_token

from .helpers import FIXTURE

SMALL = CompareConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, active_d_ff=64, num_experts=4,
                      train=replace(DEFAULT_TRAIN, steps=6, batch_size=4, seq_len=16, warmup_steps=2, eval_every=3,
                                    eval_sequences=8))


@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in VARIANTS])
def test_every_variant_uses_the_dense_ffn_width_per_token(name):
    cfg = model_config(name, SMALL)
    moe = cfg.moe
    if moe is None:
        assert cfg.d_ff == SMALL.active_d_ff
        return
    assert moe.top_k * moe.d_ff + moe.shared_width == SMALL.active_d_ff
    # Same FLOPs per token up to the router (D x E per layer, x2 with a noise gate).
    dense = flops_per_token(model_config("dense", SMALL), SMALL.train.seq_len)
    router = 6 * SMALL.n_layers * SMALL.d_model * SMALL.num_experts * 2
    assert abs(flops_per_token(cfg, SMALL.train.seq_len) - dense) <= router


def test_config_param_counts_match_built_models():
    for name in ("dense", "topk_lb", "shared"):
        cfg = model_config(name, SMALL)
        assert sum(p.numel() for p in MoETransformer(cfg).parameters()) == num_params(cfg), name


def test_unknown_variant_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['bogus'\]; choose from"):
        check_variants(["dense", "bogus"])
    assert main(["compare", "--out", str(tmp_path / "c"), "--variants", "dense", "bogus"]) == 2
    assert "unknown variant" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def _metrics(vals: dict[int, float], max_vio: float = 0.1, layer1: float = 0.3) -> list[dict]:
    # validation-set MaxVio of the two layers: 0 at step 5, then 0.1 and `layer1` at step 10
    val_moe = {5: [{"max_vio": 0.0}, {"max_vio": 0.0}], 10: [{"max_vio": 0.1}, {"max_vio": layer1}]}
    return [{"step": s, "loss": 0.0, "tokens": 10 * s, "tokens_per_s": 100.0, "tokens_per_cpu_s": 50.0,
             "moe": [{"tokens_per_expert": [5, 5], "max_vio": max_vio, "dropped_fraction": 0.0}],
             **({"val_loss": vals[s], "val_moe": val_moe[s]} if s in vals else {})} for s in range(1, 11)]


def _run(*seeds, **kw):
    return {"metrics": {i: _metrics(vals, **kw) for i, vals in enumerate(seeds)}, "total_params": 10,
            "active_params": 5, "flops_per_token": 30.0, "description": "d", "balanced": True}


def test_crossing_is_interpolated_between_evaluations():
    m = _metrics({5: 3.0, 10: 2.0})
    assert steps_to_reach(m, 2.5) == pytest.approx(7.5)  # halfway in loss between steps 5 and 10
    assert steps_to_reach(m, 2.0) == pytest.approx(10.0)
    assert steps_to_reach(m, 3.5) == 5.0  # already below at the first evaluation
    assert steps_to_reach(m, 1.9) is None


def test_report_arithmetic_and_verdicts():
    dense = _run({5: 3.0, 10: 2.0})
    fast = _run({5: 1.9, 10: 1.5}, max_vio=0.05)  # reaches 2.0 at step 5 = 0.5x, ends lower
    slow = _run({5: 2.5, 10: 2.0}, max_vio=0.5, layer1=0.1)   # reaches 2.0 only at step 10 = 1.0x
    summary = summarize({"dense": dense, "topk_lb": slow, "aux_free": fast})
    assert summary["aux_free"]["reach_ratio"] == 0.5 and summary["topk_lb"]["reach_ratio"] == 1.0
    assert summary["aux_free"]["max_vio"] == pytest.approx(0.05)
    text = markdown(summary, config={}, corpus="c", validation="8 sequences")
    assert summary["aux_free"]["val_max_vio"] == pytest.approx(0.2)
    # layer 1 (0.3) is 0.1 above the layer mean 0.2: named; topk_lb's layers are equal: not named
    assert "| aux_free | 1.5000 | 5 (0.50x) | 0.200 (layer 1: 0.300) | 0.050 |" in text
    assert "| topk_lb | 2.0000 | 10 (1.00x) | 0.100 | 0.500 |" in text
    assert "| 50 (1.00x dense) | 100 |" in text
    assert "Validation loss and validation MaxVio: 8 sequences." in text
    assert "aux_free: reaches the dense final val loss at 0.50x the dense steps (target <= 0.5x): **met**" in text
    assert "topk_lb: reaches the dense final val loss at 1.00x the dense steps (target <= 0.5x): **missed**" in text
    assert "aux_free final MaxVio (train batch) 0.050 (target < 0.2): **met**" in text
    assert "aux_free final MaxVio (held-out) 0.200 (target < 0.2): **missed**" in text


def test_report_over_seeds_gives_spreads_and_says_never_plainly():
    dense = _run({5: 3.0, 10: 2.0}, {5: 3.0, 10: 2.2})
    # seed 0 crosses dense's 2.0 at step 10; seed 1 crosses dense's 2.2 at 5 + (2.5-2.2)/(2.5-2.0)*5 = 8
    moe = _run({5: 2.5, 10: 2.0}, {5: 2.5, 10: 2.0})
    never = _run({5: 3.5, 10: 2.5}, {5: 3.5, 10: 2.6})
    summary = summarize({"dense": dense, "topk_lb": moe, "aux_free": never})
    assert summary["topk_lb"]["steps_to_dense"] == pytest.approx(9.0)
    assert summary["topk_lb"]["spread"]["reach_ratio"]["std"] == pytest.approx(0.2 / 2 ** 0.5)
    assert summary["dense"]["final_val_loss"] == pytest.approx(2.1)
    text = markdown(summary, config={}, corpus="c")
    assert "| topk_lb | 2.0000 ± 0.0000 (2 seeds) | 9 (0.90x ± 0.14x (2 seeds)) |" in text
    assert "aux_free: does not reach the dense final val loss within its 10 steps (target <= 0.5x): " \
           "**missed**" in text
    assert "never" not in text
    # against dense: finals dense 2.0 / 2.2, topk_lb 2.0 / 2.0 (overlapping ranges), aux_free 2.5 / 2.6
    vs = summary["topk_lb"]["vs_dense"]["final_val_loss"]
    assert vs["difference"] == pytest.approx(-0.1) and vs["beyond_spread"] is False
    assert vs["per_seed"]["mean"] == pytest.approx(-0.1) and vs["per_seed"]["std"] == pytest.approx(0.2 / 2 ** 0.5)
    assert summary["aux_free"]["vs_dense"]["final_val_loss"]["beyond_spread"] is True
    assert summary["aux_free"]["vs_dense"]["full_val_loss"] is None  # no whole-set evaluation here
    assert "- topk_lb - dense: final val loss -0.1000, per seed -0.1000 ± 0.1414: within the seed spread" in text
    assert "- aux_free - dense: final val loss +0.4500, per seed +0.4500 ± 0.0707: beyond the seed spread" in text


def test_tiny_compare_end_to_end_writes_the_report(tmp_path):
    report = run_compare(SMALL, variants=["dense", "aux_free"], out_dir=tmp_path, corpus=FIXTURE,
                         progress=False)
    names = {p.name for p in report.iterdir()}
    assert {"summary.md", "summary.json", "val_loss.png", "max_vio.png", "expert_load_aux_free.png"} <= names
    assert "expert_load_dense.png" not in names
    text = (report / "summary.md").read_text()
    assert "| dense |" in text and "| aux_free |" in text
    # Rerunning resumes the finished runs instead of training again.
    before = (tmp_path / "runs" / "dense" / "metrics.jsonl").read_text()
    run_compare(SMALL, variants=["dense"], out_dir=tmp_path, corpus=FIXTURE, progress=False)
    assert (tmp_path / "runs" / "dense" / "metrics.jsonl").read_text() == before


def test_flags_set_the_shape_and_the_training_run():
    from moekit.cli import build_parser
    from moekit.commands.compare import compare_config

    args = build_parser(only="compare").parse_args(["compare", "--steps", "7", "--seq-len", "32", "--top-k", "2",
                                                    "--lr", "0.01"])
    config = compare_config(args)
    assert config == CompareConfig(top_k=2, train=replace(DEFAULT_TRAIN, steps=7, seq_len=32, lr=0.01))
    assert model_config("dense", config).max_seq_len == 32


def test_recipe_knobs_reach_each_variants_moe_config():
    config = replace(SMALL, z_loss_coef=1e-3, load_balance_granularity="sequence", aux_free_balance_coef=1e-4)
    topk = model_config("topk_lb", config).moe
    assert (topk.z_loss_coef, topk.load_balance_granularity, topk.load_balance_coef) == (1e-3, "sequence", 1e-2)
    free = model_config("aux_free", config).moe
    # aux-free keeps only DeepSeek-V3's complementary sequence-wise loss, at its own coefficient
    assert (free.load_balance_coef, free.load_balance_granularity, free.expert_bias) == (1e-4, "sequence", True)
    assert model_config("aux_free", SMALL).moe.load_balance_coef == 0.0
    assert model_config("expert_choice", config).moe.load_balance_coef == 0.0


@pytest.mark.parametrize("changes, field", [
    pytest.param({"variant_lr": (("bogus", 1e-3),)}, "variant_lr", id="unknown-variant"),
    pytest.param({"variant_lr": (("dense", 0.0),)}, "variant_lr", id="zero-lr"),
    pytest.param({"variant_lr": (("dense", 1e-3), ("dense", 2e-3))}, "variant_lr", id="repeated"),
    pytest.param({"load_balance_granularity": "token"}, "load_balance_granularity", id="granularity"),
    pytest.param({"z_loss_coef": -1.0}, "z_loss_coef", id="negative-z-loss"),
])
def test_bad_recipe_settings_are_named(changes, field):
    with pytest.raises(ValueError, match=field):
        replace(SMALL, **changes)


def test_variant_lr_flag_and_each_run_trains_at_its_own_lr(tmp_path):
    from moekit.cli import build_parser
    from moekit.commands.compare import compare_config

    args = build_parser(only="compare").parse_args(["compare", "--variant-lr", "dense=0.006", "aux_free=1e-2",
                                                    "--z-loss-coef", "0.001"])
    config = compare_config(args)
    assert config.variant_lr == (("dense", 0.006), ("aux_free", 0.01)) and config.z_loss_coef == 0.001
    assert config.lr("dense") == 0.006 and config.lr("topk_lb") == DEFAULT_TRAIN.lr
    bad = build_parser(only="compare").parse_args(["compare", "--variant-lr", "dense"])
    with pytest.raises(ValueError, match="--variant-lr 'dense' is invalid: write NAME=LR"):
        compare_config(bad)
    # the defaults: the dense model at its own tuned rate, every other variant at --lr
    assert CompareConfig().lr("dense") == 1.2e-2 and CompareConfig().lr("aux_free") == DEFAULT_TRAIN.lr
    only = compare_config(build_parser(only="compare").parse_args(["compare", "--variant-lr", "topk_lb=0.001"]))
    assert only.variant_lr == (("dense", 1.2e-2), ("topk_lb", 0.001))  # named ones set, the default kept
    small = replace(SMALL, variant_lr=(("dense", 4e-3),), train=replace(SMALL.train, lr=1e-3))
    run_compare(small, variants=["dense", "topk_lb"], out_dir=tmp_path, corpus=FIXTURE, progress=False)
    import json

    peak = {}  # the schedule's peak is the step right after warmup
    for name in ("dense", "topk_lb"):
        rows = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        peak[name] = max(r["lr"] for r in rows)
    assert peak == {"dense": pytest.approx(4e-3), "topk_lb": pytest.approx(1e-3)}
    text = (tmp_path / "report" / "summary.md").read_text()
    assert "variant_lr=dense=0.004" in text and "- dense: dense MLP" in text and "peak lr 0.004" in text


def test_last_step_is_also_evaluated_on_the_whole_held_out_set(tmp_path):
    import json

    from moekit.train.run import prepare_data
    from moekit.train.trainer import Trainer

    # a sample of 3 validation sequences during training; the whole set once more at the last step
    small = replace(SMALL, train=replace(SMALL.train, eval_sequences=3))
    report = run_compare(small, variants=["dense", "topk_lb"], out_dir=tmp_path, corpus=FIXTURE, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "runs" / "topk_lb" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "full_val_loss" in r] == [small.train.steps]
    # the recorded whole-set figures are those of evaluating the final model on every sequence
    from moekit.model.config import ModelConfig
    from moekit.train import checkpoint as ckpt
    from moekit.train.run import build_model

    data = prepare_data(FIXTURE, seq_len=16, vocab_size=300, out_dir=tmp_path)
    path, _ = ckpt.latest_checkpoint(tmp_path / "runs" / "topk_lb" / "checkpoints")
    tensors, state = ckpt.read_checkpoint(path)
    model = build_model(ModelConfig.from_dict(state["run_info"]["model"]), seed=0)
    ckpt.load_model_tensors(model, tensors["model"])
    whole = Trainer(model, config=replace(small.train, eval_sequences=0), train=data.train, val=data.val,
                    out_dir=tmp_path / "scratch", progress=False).evaluate()
    assert data.val.num_sequences > 3
    assert rows[-1]["full_val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)
    assert rows[-1]["full_val_moe"][0]["tokens_per_expert"] == whole["val_moe"][0]["tokens_per_expert"]
    assert rows[-1]["val_loss"] != pytest.approx(whole["val_loss"], rel=1e-9)  # the sample is another figure
    summary = json.loads((report / "summary.json").read_text())
    assert summary["topk_lb"]["full_val_loss"] == pytest.approx(whole["val_loss"], rel=1e-6)
    text = (report / "summary.md").read_text()
    assert "final val loss (whole held-out set)" in text
    assert f"the final step is also evaluated on all {data.val.num_sequences}" in text


def test_switch_weights_its_expert_by_the_router_probability():
    """The top-1 Switch variant is not renormalised (a weight of exactly 1 has no gradient)."""
    import torch

    from moekit.layer import MoELayer
    from moekit.train.compare import CompareConfig, model_config

    moe = model_config("switch", CompareConfig()).moe
    layer = MoELayer(replace(moe, load_balance_coef=0.0))
    layer(torch.randn(2, 8, moe.d_model)).y.square().sum().backward()
    # renormalised, only rounding noise reaches the router (1e-6 of the experts' gradient)
    assert layer.router.gate.weight.grad.abs().max() > 1e-3 * layer.experts.w_down_EFD.grad.abs().max()
