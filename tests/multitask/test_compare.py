"""`moekit train|compare --task multitask` end to end on the committed census fixture."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.cli import main
from moekit.multitask.data import TASKS
from moekit.train.metrics import read_metrics

FIXTURE = Path(__file__).parents[1] / "fixtures" / "census_mini"


def test_train_cli(tmp_path: Path) -> None:
    assert main(["train", "--task", "multitask", "--data", str(FIXTURE), "--out", str(tmp_path / "r"),
                 "--steps", "3", "--batch-size", "64", "--quiet"]) == 0
    last = read_metrics(tmp_path / "r" / "metrics.jsonl")[-1]
    assert all(0.0 <= last[f"test_auc/{t}"] <= 1.0 for t in TASKS)


def test_compare_cli(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "multitask", "--data", str(FIXTURE), "--out", str(out), "--steps", "3",
                 "--batch-size", "64", "--set", "seeds=2", "--set", "num_experts=3", "--quiet"]) == 0
    summary = json.loads((out / "report" / "summary.json").read_text())
    models = summary["models"]
    assert set(models) == {"single", "shared_bottom", "one_gate", "mmoe"}
    for m in models.values():
        for t in TASKS:
            assert len(m["auc"][t]["seeds"]) == 2 and m["auc"][t]["std"] >= 0
    assert len(models["mmoe"]["gate_means"]) == 2 and len(models["one_gate"]["gate_means"]) == 1
    assert abs(sum(models["mmoe"]["gate_means"][0]) - 1) < 1e-5
    assert (out / "report" / "gate_weights.png").is_file()


def test_rerun_reads_back_finished_runs(tmp_path: Path) -> None:
    args = ["compare", "--task", "multitask", "--data", str(FIXTURE), "--out", str(tmp_path), "--steps", "2",
            "--batch-size", "64", "--variants", "mmoe", "--quiet"]
    assert main(args) == 0
    first = json.loads((tmp_path / "report" / "summary.json").read_text())["models"]["mmoe"]
    weights = (tmp_path / "runs" / "mmoe-seed0" / "model.safetensors").stat().st_mtime_ns
    assert main(args + ["--set", "seeds=2"]) == 0  # trains only seed 1
    second = json.loads((tmp_path / "report" / "summary.json").read_text())["models"]["mmoe"]
    assert (tmp_path / "runs" / "mmoe-seed0" / "model.safetensors").stat().st_mtime_ns == weights
    assert second["auc"]["income"]["seeds"][0] == first["auc"]["income"]["seeds"][0]
    assert len(second["auc"]["income"]["seeds"]) == 2
    other = args[:-7] + ["--steps", "3", "--batch-size", "64", "--variants", "mmoe", "--quiet"]
    assert main(other) == 2  # a finished run with other settings is refused
