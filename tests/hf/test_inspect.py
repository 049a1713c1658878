"""`moekit inspect DIR`: a checkpoint's model_type, config, shards and tensors, from headers only."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main
from moekit.hf.checkpoint import from_pretrained
from moekit.hf.native import save_native
from moekit.hf.inspect import checkpoint_summary
from tests.hf.tiny import save_tiny


@pytest.mark.parametrize("model_type", [pytest.param("qwen2_moe", id="qwen2_moe"),
                                        pytest.param("jamba", id="jamba")])
def test_summary_matches_transformers(tmp_path, model_type):
    hf_model = save_tiny(model_type, tmp_path, max_shard_size="20KB")
    s = checkpoint_summary(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert s["format"] == "huggingface" and s["model_type"] == model_type
    assert s["expert_layout"] == "split (per-expert 2-D)"
    assert [sh["file"] for sh in s["shards"]] == sorted(set(index["weight_map"].values()))
    assert s["tensors"] == len(index["weight_map"]) == sum(sh["tensors"] for sh in s["shards"])
    assert s["total_bytes"] == index["metadata"]["total_size"]
    # the translated config counts exactly the parameters transformers built
    assert s["config"]["params"] == hf_model.num_parameters()
    assert s["config"]["experts"] == 4 and s["config"]["top_k"] == 2
    assert s["dtypes"] == {"float32": len(index["weight_map"])}


def test_cli_inspect_directory(tmp_path, capsys):
    hf_dir, mk_dir = tmp_path / "hf", tmp_path / "mk"
    save_tiny("mixtral", hf_dir)
    assert main(["inspect", str(hf_dir)]) == 0
    out = capsys.readouterr().out
    assert "model_type=mixtral" in out and "model.safetensors" in out and "experts=4" in out
    save_native(from_pretrained(hf_dir), mk_dir)
    assert main(["inspect", str(mk_dir)]) == 0
    out = capsys.readouterr().out
    assert "moekit checkpoint" in out and "moekit (3-D experts)" in out


def test_unsupported_model_type_still_lists_tensors(tmp_path):
    save_tiny("mixtral", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    s = checkpoint_summary(tmp_path)
    assert "not supported" in s["config"] and s["tensors"] > 0
