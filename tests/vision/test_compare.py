"""`moekit train|compare --task vision` end to end on the committed 90-image fixture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.train.metrics import read_metrics
from moekit.vision.compare import VisionCompareConfig, run_vision_compare
from moekit.vision.data import load_image_folder

FIXTURE = Path(__file__).parents[1] / "fixtures" / "fashion_mini"
TINY = ["--set", "d_model=16", "--set", "d_ff=32", "--set", "n_layers=2", "--set", "val_images=10",
        "--set", "eval_every=1", "--set", "n_heads=2"]


def test_train_cli_writes_test_accuracy(tmp_path: Path) -> None:
    rc = main(["train", "--task", "vision", "--data", str(FIXTURE), "--out", str(tmp_path / "run"),
               "--steps", "2", "--batch-size", "8", "--quiet", *TINY])
    assert rc == 0
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["step"] == 2 and 0.0 <= last["test_accuracy"] <= 1.0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    # a second run into the same folder is refused, nothing overwritten
    assert main(["train", "--task", "vision", "--data", str(FIXTURE), "--out", str(tmp_path / "run"),
                 "--steps", "2", "--quiet", *TINY]) == 2


def test_flag_of_another_task_is_refused(tmp_path: Path, capsys) -> None:
    rc = main(["train", "--task", "vision", "--data", str(FIXTURE), "--out", str(tmp_path / "r"),
               "--seq-len", "8", "--quiet"])
    assert rc == 2 and "--seq-len does not apply to --task vision" in capsys.readouterr().err


def test_compare_end_to_end(tmp_path: Path) -> None:
    config = VisionCompareConfig(d_model=16, d_ff=32, n_layers=2, n_heads=2, num_experts=4, steps=3,
                                 batch_size=8, val_images=10, eval_every=1, warmup_steps=1)
    report = run_vision_compare(config, load_image_folder(FIXTURE), variants=["dense", "topk"],
                                out_dir=tmp_path, progress=False, sweep_factors=(1.0, 0.25))
    summary = json.loads((report / "summary.json").read_text())
    variants = summary["variants"]
    assert set(variants) == {"dense", "topk"}
    for s in variants.values():
        assert 0.0 <= s["test_accuracy"] <= 1.0
    # equal active compute: the MoE's active FLOPs per image are the dense model's plus its router
    assert variants["topk"]["flops_per_image"] >= variants["dense"]["flops_per_image"]
    assert variants["topk"]["flops_per_image"] < 1.05 * variants["dense"]["flops_per_image"]
    sweep = variants["topk"]["capacity_sweep"]
    for policy in ("position", "batch_priority"):
        dropped = [r["dropped_fraction"] for r in sweep[policy]]
        assert dropped[1] > dropped[0]  # capacity 0.25 drops more than 1.0
    usage = summary["class_expert_usage"]["topk"]
    assert len(usage) == 1 and len(usage[0]) == 10 and len(usage[0][0]) == 4  # 1 MoE layer, 10 x E
    for name in ("val_accuracy.png", "capacity_sweep.png", "class_experts_topk.png", "summary.md"):
        assert (report / name).is_file()


def test_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    config = VisionCompareConfig(d_model=16, d_ff=32, n_layers=2, n_heads=2, num_experts=4, steps=1,
                                 batch_size=8, val_images=10, eval_every=1, warmup_steps=1)
    data = load_image_folder(FIXTURE)
    run_vision_compare(config, data, variants=["dense"], out_dir=tmp_path, progress=False)
    run_vision_compare(config, data, variants=["dense"], out_dir=tmp_path, progress=False)  # reused
    with pytest.raises(ValueError, match="other settings"):
        run_vision_compare(VisionCompareConfig(**{**config.__dict__, "steps": 2}), data, variants=["dense"],
                           out_dir=tmp_path, progress=False)
