"""moekit sweep: identical active compute at every point, the spread verdicts, a tiny end-to-end run."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from moekit.cli import main
from moekit.model.accounting import active_params
from moekit.train.curves import separated, spread
from moekit.train.series import flops_per_token
from moekit.train.sweep import SWEEP_TRAIN, SweepConfig

from .helpers import FIXTURE

SMALL = SweepConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, active_d_ff=32, experts=(1, 2, 4),
                    top_k=(1, 2), granularity=(1, 2), seeds=(0,), train=replace(SWEEP_TRAIN, seq_len=16))


def test_points_share_the_active_width_and_differ_only_in_experts():
    points = SMALL.points()
    # dense once; top-2 needs more than 2 experts; every (E, k) with k < E at both granularities
    assert [p.name for p in points] == ["dense", "E2_k1_g1", "E2_k1_g2", "E4_k1_g1", "E4_k1_g2", "E4_k2_g1",
                                        "E4_k2_g2"]
    dense = points[0].model(SMALL)
    assert dense.moe is None and dense.d_ff == SMALL.active_d_ff
    for p in points[1:]:
        moe = p.model(SMALL).moe
        assert moe.num_experts == p.experts * p.granularity and moe.top_k == p.top_k * p.granularity
        assert moe.top_k * moe.d_ff == SMALL.active_d_ff
        # active parameters and FLOPs equal dense's up to the router (D x E per layer)
        router = SMALL.n_layers * SMALL.d_model * moe.num_experts
        assert active_params(p.model(SMALL)) - active_params(dense) == router
        assert flops_per_token(p.model(SMALL), 16) - flops_per_token(dense, 16) == 6 * router




def test_a_shared_expert_takes_one_active_width_and_needs_a_routed_one_beside_it():
    config = replace(SMALL, shared=(0, 1))
    names = [p.name for p in config.points()]
    # top-1 of granularity 1 would have no routed expert left: no shared point there
    assert "E2_k1_g1_s1" not in names and {"E2_k1_g2_s1", "E4_k2_g1_s1", "E4_k2_g2_s1"} <= set(names)
    dense = config.points()[0].model(config)
    for p in config.points()[1:]:
        moe = p.model(config).moe
        k = p.top_k * p.granularity
        assert moe.num_shared_experts == p.shared and moe.top_k == k - p.shared
        assert moe.d_ff == config.active_d_ff // k and moe.shared_width == p.shared * moe.d_ff
        router = config.n_layers * config.d_model * moe.num_experts
        assert active_params(p.model(config)) - active_params(dense) == router, p.name
    described = {p.name: p.describe(config) for p in config.points()}
    assert described["E2_k1_g2_s1"].startswith("1 shared + 4 routed experts of width 16, top-1 (2 x granularity 2)")


@pytest.mark.parametrize("changes, match", [
    pytest.param({"top_k": (1,), "granularity": (1,), "shared": (1,)}, "needs top_k x granularity >= 2",
                 id="no-routed-expert-left"),
    pytest.param({"shared": (2,)}, "must be 0", id="two-shared"),
    pytest.param({"shared": (1, 1)}, "each once", id="repeated-shared"),
])
def test_bad_shared_axes_are_clear_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        replace(SMALL, **changes)


def test_the_cli_refuses_a_shared_expert_without_a_routed_one(tmp_path, capsys):
    assert main(["sweep", "--experts", "1", "4", "--shared", "1", "--out", str(tmp_path / "s")]) == 2
    assert "needs top_k x granularity >= 2" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()

@pytest.mark.parametrize("balance", ["topk_lb", "aux_free"])
def test_every_moe_point_trains_its_router_from_the_loss(balance):
    """Top-1 points weight their expert by its router probability (Switch): renormalised over one
    expert the weight would be exactly 1 and the router would get no gradient from the loss."""
    import torch

    from moekit.layer import MoELayer

    for p in replace(SMALL, balance=balance).points()[1:]:
        moe = replace(p.moe(replace(SMALL, balance=balance)), load_balance_coef=0.0)
        layer = MoELayer(moe)
        layer(torch.randn(2, 8, moe.d_model)).y.square().sum().backward()
        # renormalised, only rounding noise reaches the router (1e-6 of the experts' gradient)
        assert layer.router.gate.weight.grad.abs().max() > 1e-3 * layer.experts.w_down_EFD.grad.abs().max(), p.name

@pytest.mark.parametrize("changes, match", [
    pytest.param({"experts": (1,), "top_k": (1,)}, None, id="dense-only-is-fine"),
    pytest.param({"experts": (2,), "top_k": (2,)}, "gives no point", id="k-not-below-E"),
    pytest.param({"top_k": (3,)}, "divisible by top_k x granularity", id="width-not-divisible"),
    pytest.param({"experts": (4, 4)}, "different positive integers", id="repeated"),
    pytest.param({"seeds": (0, 0)}, "--seeds", id="repeated-seeds"),
    pytest.param({"dense_lr": 0.0}, "dense_lr", id="dense-lr-zero"),
    pytest.param({"dense_lr": float("nan")}, "dense_lr", id="dense-lr-nan"),
])
def test_bad_axes_are_clear_errors(changes, match):
    if match is None:
        assert [p.name for p in replace(SMALL, **changes).points()] == ["dense"]
        return
    with pytest.raises(ValueError, match=match):
        replace(SMALL, **changes)


def test_dense_point_trains_at_dense_lr_and_moe_points_at_lr():
    from moekit.train.compare import CompareConfig

    # the defaults are compare's tuned recipe: dense 1.2e-2, MoEs 6e-3
    assert SweepConfig().dense_lr == CompareConfig().lr("dense") == 1.2e-2
    assert SweepConfig().train.lr == CompareConfig().lr("topk_lb") == 6e-3
    config = replace(SMALL, dense_lr=0.05, train=replace(SMALL.train, lr=0.02))
    assert {p.name: config.lr(p) for p in config.points()[:3]} == {"dense": 0.05, "E2_k1_g1": 0.02,
                                                                    "E2_k1_g2": 0.02}


def test_separated_means_non_overlapping_seed_ranges():
    a, b, c = spread([1.0, 1.1, 1.2]), spread([1.3, 1.4]), spread([1.15, 1.5])
    assert separated(a, b) is True and separated(a, c) is False
    assert separated(a, spread([2.0])) is None  # one seed: the spread is unknown
    assert a.text(".2f") == "1.10 ± 0.10 (3 seeds)"


def test_sweep_end_to_end_on_the_fixture_and_resumes(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--corpus", str(FIXTURE), "--out", str(out), "--vocab-size", "300", "--d-model", "32",
            "--n-layers", "1", "--n-heads", "2", "--active-d-ff", "32", "--experts", "1", "2", "4",
            "--seeds", "0", "1", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--eval-every", "3",
            "--eval-sequences", "8", "--warmup-steps", "1", "--lr", "0.004", "--dense-lr", "0.008", "--quiet"]
    assert main(argv) == 0
    report = out / "report"
    assert {"summary.md", "summary.json", "sweep.png"} <= {p.name for p in report.iterdir()}
    summary = json.loads((report / "summary.json").read_text())
    assert list(summary) == ["dense", "E2_k1_g1", "E4_k1_g1"]
    assert [summary[n]["final_val_loss"]["n"] for n in summary] == [2, 2, 2]
    # each point trained at its own peak learning rate (reached after the 1 warmup step)
    for run, peak in (("dense", 0.008), ("dense.seed1", 0.008), ("E2_k1_g1", 0.004), ("E4_k1_g1.seed1", 0.004)):
        rows = [json.loads(line) for line in (out / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        assert max(r["lr"] for r in rows if "lr" in r) == pytest.approx(peak)
    assert summary["E4_k1_g1"]["vs_previous"]["previous"] == "E2_k1_g1"
    text = (report / "summary.md").read_text()
    assert "| E4_k1_g1 | 4 (4 x 1) | top-1 | 32 |" in text and "8 sequences x 16 tokens" in text
    assert {p.name for p in (out / "runs").iterdir()} == {
        "dense", "dense.seed1", "E2_k1_g1", "E2_k1_g1.seed1", "E4_k1_g1", "E4_k1_g1.seed1"}
    # rerunning trains nothing again: every run is complete
    before = {p.name: (p / "metrics.jsonl").read_text() for p in (out / "runs").iterdir()}
    assert main(argv) == 0
    assert {p.name: (p / "metrics.jsonl").read_text() for p in (out / "runs").iterdir()} == before
    assert "moekit sweep" in capsys.readouterr().out
