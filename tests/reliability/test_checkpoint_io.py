"""Issue 10's checkpoint items: nothing lost when writing, nothing read from outside the folder, and
malformed checkpoint files or CLI arguments refused with an error that names the field and the fix."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

import moekit
from moekit.cli import main
from moekit.train.run import build_model, save_final
from moekit.train.tokenizer import train_tokenizer
from tests.hf.tiny import save_tiny
from tests.train.helpers import FIXTURE, tiny_model_config

FAST = ["--corpus", str(FIXTURE), "--vocab-size", "300", "--batch-size", "2", "--seq-len", "16",
        "--eval-every", "1", "--eval-sequences", "2", "--steps", "1", "--quiet"]


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    save_tiny("mixtral", path)
    return path


@pytest.fixture
def sharded_with_readme(tmp_path):
    """Another checkpoint (sharded, with its index) and a user's README in one folder."""
    dst = tmp_path / "dst"
    save_tiny("qwen3_moe", dst, max_shard_size="20KB")
    (dst / "README.md").write_text("my notes")
    assert len(list(dst.glob("model-*.safetensors"))) > 2
    return dst


# ---- 1. never delete what this call did not write -----------------------------------------------
def test_convert_refuses_a_folder_holding_another_checkpoint(mixtral_dir, sharded_with_readme, capsys):
    before = _snapshot(sharded_with_readme)
    assert main(["convert", str(mixtral_dir), str(sharded_with_readme)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "README.md" in err and "model.safetensors.index.json" in err
    assert "--overwrite" in err
    assert _snapshot(sharded_with_readme) == before


@pytest.mark.parametrize("to", ["hf", "moekit"])
def test_convert_overwrite_replaces_the_checkpoint_and_keeps_other_files(mixtral_dir, sharded_with_readme, to):
    assert main(["convert", str(mixtral_dir), str(sharded_with_readme), "--to", to, "--overwrite"]) == 0
    names = sorted(p.name for p in sharded_with_readme.iterdir())
    config = "config.json" if to == "hf" else "moekit_config.json"
    # transformers' generation_config.json is not a file moekit writes, so it stays too
    assert names == sorted(["README.md", "generation_config.json", "model.safetensors", config])
    assert (sharded_with_readme / "README.md").read_text() == "my notes"
    a, b = moekit.from_pretrained(mixtral_dir), moekit.from_pretrained(sharded_with_readme)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_convert_into_an_empty_folder(mixtral_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(mixtral_dir), str(tmp_path / "empty")]) == 0


def test_save_pretrained_refuses_a_non_empty_folder(mixtral_dir, tmp_path):
    model = moekit.from_pretrained(mixtral_dir)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"not empty: it holds keep.txt.*overwrite=True"):
        model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    model.save_pretrained(tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "x" and (tmp_path / "config.json").is_file()


def test_final_export_refuses_a_non_empty_folder(tmp_path):
    config = tiny_model_config(noisy_gating=False, expert_bias=False)
    model = build_model(config, seed=0)
    tokenizer = train_tokenizer(["some text to learn from"], vocab_size=300)
    final = tmp_path / "final"
    final.mkdir()
    (final / "notes.txt").write_text("mine")
    for model_type in ("mixtral", None):
        with pytest.raises(ValueError, match="not empty: it holds notes.txt"):
            save_final(model, config, tokenizer, final, model_type=model_type)
    assert sorted(p.name for p in final.iterdir()) == ["notes.txt"]


def test_train_refuses_a_foreign_final_folder_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "notes.txt").write_text("mine")
    assert main(["train", "--preset", "tiny", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "final already holds notes.txt" in err and "--resume" in err
    assert sorted(p.name for p in out.rglob("*")) == ["final", "notes.txt"]  # nothing trained or written


# ---- 3. a shard index names files inside its folder only ----------------------------------------
@pytest.mark.parametrize("entry", [pytest.param("../outside.safetensors", id="parent"),
                                   pytest.param("/etc/passwd", id="absolute"),
                                   pytest.param("sub/model.safetensors", id="subfolder")])
def test_shard_names_must_be_plain_file_names(tmp_path, entry):
    ckpt = tmp_path / "ckpt"
    save_tiny("mixtral", ckpt, max_shard_size="20KB")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[0]
    # what ../ reaches: a readable shard holding that tensor (before the fix, it loaded with exit 0)
    (tmp_path / "outside.safetensors").write_bytes((ckpt / index["weight_map"][key]).read_bytes())
    index["weight_map"][key] = entry
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"weight_map\['{key}'\] = '{entry}' is not a plain file name"):
        moekit.from_pretrained(ckpt)


# ---- malformed config.json / index / moekit_config.json -----------------------------------------
def _edited_copy(src, dst, edit):
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("edit, message", [
    pytest.param(lambda c: c.update(model_type=["mixtral"]), r"model_type=\['mixtral'\] must be a string",
                 id="model-type-list"),
    pytest.param(lambda c: c.update(model_type=7), "model_type=7 must be a string", id="model-type-int"),
    pytest.param(lambda c: c.update(rope_parameters="yarn"), "rope_parameters must be a JSON object",
                 id="rope-parameters-string"),
    pytest.param(lambda c: c.update(rope_parameters=[1, 2]), "rope_parameters must be a JSON object",
                 id="rope-parameters-list"),
    pytest.param(lambda c: c.pop("hidden_size"), "needs the field 'hidden_size', which is missing",
                 id="no-hidden-size"),
    pytest.param(lambda c: c.pop("vocab_size"), "needs the field 'vocab_size', which is missing",
                 id="no-vocab-size"),
    pytest.param(lambda c: c.update(tie_word_embeddings="no"), "tie_word_embeddings='no' must be true or false",
                 id="tie-embeddings-string"),
])
def test_malformed_config_json(mixtral_dir, tmp_path, edit, message):
    bad = _edited_copy(mixtral_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message) as info:
        moekit.from_pretrained(bad)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("weight_map, message", [
    pytest.param(["model.safetensors"], "'weight_map' is a list, not an object", id="list"),
    pytest.param({"model.norm.weight": 3}, r"weight_map\['model.norm.weight'\] = 3 is not a shard file name",
                 id="int-shard"),
    pytest.param("model.safetensors", "'weight_map' is a str", id="string"),
])
def test_malformed_index(mixtral_dir, tmp_path, weight_map, message):
    bad = _edited_copy(mixtral_dir, tmp_path / "bad", lambda c: None)
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=message):
        moekit.from_pretrained(bad)


@pytest.mark.parametrize("meta, message", [
    pytest.param({}, "no format_version and not an older moekit layout", id="empty"),
    pytest.param({"format_version": 1, "kind": "decoder"}, r"missing key\(s\) \['config', 'dtype'\]",
                 id="missing-keys"),
    pytest.param({"format_version": 1, "kind": "encoder", "config": {}, "dtype": "float32"},
                 "kind='encoder' is invalid", id="bad-kind"),
    pytest.param({"format_version": 1, "kind": "decoder", "config": {"d_model": 8}, "dtype": "float32"},
                 "config does not describe a valid ModelConfig", id="bad-config"),
    pytest.param({"format_version": "1", "kind": "decoder", "config": {}, "dtype": "float32"},
                 "format_version='1' is invalid", id="string-version"),
    pytest.param([1, 2], "expected a JSON object", id="not-an-object"),
])
def test_malformed_moekit_config(mixtral_dir, tmp_path, meta, message, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((mixtral_dir / "model.safetensors").read_bytes())
    (bad / "moekit_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        moekit.from_pretrained(bad)
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2  # the CLI reports it, no traceback
    assert "moekit_config.json" in capsys.readouterr().err


# ---- CLI ----------------------------------------------------------------------------------------
def test_convert_destination_that_is_a_file(mixtral_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["convert", str(mixtral_dir), str(tmp_path / "file")]) == 2
    assert "is an existing file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_train_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "file"), *FAST]) == 2
    assert "is an existing file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_convert_a_decoder_to_an_encoder_decoder_family(mixtral_dir, tmp_path, capsys):
    assert main(["convert", str(mixtral_dir), str(tmp_path / "out"), "--model-type", "switch_transformers"]) == 2
    assert "model_type='switch_transformers' is an encoder-decoder family" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- files keep the user's umask ----------------------------------------------------------------
@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_written_files_follow_the_umask(mixtral_dir, tmp_path, umask_027):
    model = moekit.from_pretrained(mixtral_dir)
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert main(["convert", str(mixtral_dir), str(tmp_path / "native"), "--to", "moekit"]) == 0
    files = [*(tmp_path / "hf").iterdir(), *(tmp_path / "native").iterdir()]
    assert any(f.name.startswith("model-") for f in files) and len(files) > 4
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == umask_027, f.name
    assert load_file(tmp_path / "native" / "model.safetensors")  # still a readable file
