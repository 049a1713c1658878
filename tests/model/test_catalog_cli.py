"""`moekit catalog` and `moekit inspect`: table, JSON, per-layer listing, errors."""

from __future__ import annotations

import json

from moekit import catalog
from moekit.cli import main


def test_catalog_json_lists_every_preset_with_counts(capsys) -> None:
    assert main(["catalog", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == catalog.names()
    for r in rows:
        assert 0 < r["active_params"] <= r["total_params"]


def test_catalog_json_for_chosen_presets(capsys) -> None:
    assert main(["catalog", "--json", "mixtral-8x7b", "olmoe"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["Mixtral 8x7B", "OLMoE-1B-7B"]
    assert rows[0]["experts"] == {"routed": 8, "top_k": 2, "shared": 0}


def test_catalog_table_names_each_preset(capsys) -> None:
    assert main(["catalog", "dbrx", "jamba-1.5-mini"]) == 0
    out = capsys.readouterr().out
    assert "DBRX" in out and "Jamba 1.5 Mini" in out and "Mamba" in out


def test_inspect_lists_layers_and_totals(capsys) -> None:
    assert main(["inspect", "deepseek-v2-lite"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.26" in out and "dense MLP 10944" in out and "MoE 64e top-6 + 2 shared" in out
    total = catalog.get("DeepSeek-V2-Lite").info()["total_params"]
    assert f"{total:,}" in out


def test_inspect_layer_rows_sum_to_the_total() -> None:
    for name in ("Jamba 1.5 Mini", "Granite 3.0 1B-A400M", "Switch-Base-8"):
        preset = catalog.get(name)
        model = preset.build()
        info = preset.info(model)
        rows = preset.layer_table(model)
        assert sum(r["params"] for r in rows) == info["total_params"], name
        assert sum(r["active"] for r in rows) == info["active_params"], name
        for r in rows:
            if "mixer_params" in r:  # a block = its two norms + mixer + feed-forward
                norms = 2 * preset.config.d_model * (2 if preset.config.norm_bias else 1)
                assert r["mixer_params"] + r["ffn_params"] + norms == r["params"], r["name"]


def test_inspect_unknown_name_is_a_clean_error(capsys) -> None:
    assert main(["inspect", "mixtral-9x9b"]) == 2
    assert "no catalog preset" in capsys.readouterr().err


def test_inspect_directory_goes_to_the_checkpoint_path(tmp_path, capsys) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err  # an empty directory is not a checkpoint either
