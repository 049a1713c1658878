"""moekit's one native checkpoint format: what training, convert and from_pretrained write and read.

The regression for issue 9's defect 2: `moekit convert RUN/final OUT` after `moekit train --preset
tiny-dense` died with `KeyError: 'model'` because training and convert wrote different JSON under
the same `moekit_config.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import save_file

import moekit
from moekit.cli import main
from moekit.hf.native import FORMAT_VERSION, read_native, save_native
from moekit.train.run import build_model, save_final
from moekit.train.tokenizer import train_tokenizer
from tests.hf.tiny import save_tiny
from tests.train.helpers import FIXTURE, tiny_model_config

FAST = ["--corpus", str(FIXTURE), "--vocab-size", "300", "--batch-size", "2", "--seq-len", "16",
        "--eval-every", "1", "--eval-sequences", "2", "--steps", "1", "--quiet"]


def _logits(model, vocab: int = 300) -> torch.Tensor:
    tokens_BS = torch.arange(12).remainder(vocab)[None]
    with torch.no_grad():
        return model.eval()(tokens_BS).logits


def test_convert_after_training_a_dense_preset(tmp_path, capsys):
    run, native, hf = tmp_path / "run", tmp_path / "native", tmp_path / "hf"
    assert main(["train", "--preset", "tiny-dense", "--out", str(run), *FAST]) == 0
    assert main(["convert", str(run / "final"), str(native), "--to", "moekit"]) == 0  # was KeyError: 'model'
    meta = json.loads((run / "final" / "moekit_config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["kind"] == "decoder"
    trained = moekit.from_pretrained(run / "final")
    assert torch.equal(_logits(moekit.from_pretrained(native)), _logits(trained))
    # a dense model has no Hugging Face family: a clear error, not a KeyError
    capsys.readouterr()
    assert main(["convert", str(run / "final"), str(hf)]) == 2
    assert "needs model_type=" in capsys.readouterr().err
    assert main(["convert", str(run / "final"), str(hf), "--model-type", "mixtral"]) == 2
    assert "needs an MoE model" in capsys.readouterr().err


def test_from_pretrained_opens_every_folder_moekit_writes(tmp_path):
    src = tmp_path / "hf"
    save_tiny("mixtral", src)
    hf_model = moekit.from_pretrained(src)
    want = _logits(hf_model, 64)
    save_native(hf_model, tmp_path / "native")
    hf_model.save_pretrained(tmp_path / "again")
    for folder in ("native", "again"):
        assert torch.equal(_logits(moekit.from_pretrained(tmp_path / folder), 64), want), folder
    # a native copy keeps the config.json it came from, so it converts back to the same family
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "back")]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == "mixtral"
    # training's final/ in both layouts
    config = tiny_model_config(noisy_gating=False, expert_bias=False)
    model = build_model(config, seed=0).eval()
    tokenizer = train_tokenizer(["some text to learn from"], vocab_size=300)
    for model_type in ("mixtral", None):
        folder = save_final(model, config, tokenizer, tmp_path / f"final-{model_type}", model_type=model_type)
        assert (folder / "config.json").is_file() == (model_type is not None)
        assert torch.equal(_logits(moekit.from_pretrained(folder)), _logits(model))


def test_a_run_folder_points_at_its_final_weights(tmp_path):
    (tmp_path / "final").mkdir()
    with pytest.raises(FileNotFoundError, match="training run folder.*final"):
        moekit.from_pretrained(tmp_path)


@pytest.mark.parametrize("layout", [pytest.param("training", id="old-training"),
                                    pytest.param("convert", id="old-convert")])
def test_layouts_from_before_the_version_key_still_load(tmp_path, layout):
    config = tiny_model_config(noisy_gating=False, expert_bias=False)
    model = build_model(config, seed=1).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    if layout == "training":  # train/run.py's old save_final: the bare ModelConfig
        meta = config.to_dict()
    else:  # hf/checkpoint.py's old save_moekit
        meta = {"model": asdict(config), "kind": "decoder", "dtype": "float32", "hf_config": None}
    (tmp_path / "moekit_config.json").write_text(json.dumps(meta))
    assert torch.equal(_logits(moekit.from_pretrained(tmp_path)), _logits(model))


def test_a_newer_format_version_is_refused(tmp_path):
    model = build_model(tiny_model_config(), seed=0)
    save_native(model, tmp_path)
    meta = json.loads((tmp_path / "moekit_config.json").read_text())
    (tmp_path / "moekit_config.json").write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ValueError, match="written by a newer moekit"):
        read_native(tmp_path)


def test_a_model_with_a_family_exports_or_fails_loudly(tmp_path):
    # mixtral has no aux-loss-free expert bias: the export cannot be written as that family
    config = tiny_model_config(noisy_gating=False, expert_bias=True)
    model = build_model(config, seed=0).eval()
    tokenizer = train_tokenizer(["some text to learn from"], vocab_size=300)
    with pytest.raises(ValueError, match="cannot be written as Hugging Face model_type='mixtral'.*native"):
        save_final(model, config, tokenizer, tmp_path / "final", model_type="mixtral")
    # ... and the weights are not lost: the native format holds them
    assert not (tmp_path / "final" / "config.json").exists()
    assert torch.equal(_logits(moekit.from_pretrained(tmp_path / "final")), _logits(model))
    assert (tmp_path / "final" / "tokenizer.json").is_file()


def test_an_export_that_reloads_differently_is_an_error(tmp_path, monkeypatch):
    import moekit.hf.checkpoint as checkpoint

    load = checkpoint.from_pretrained

    def corrupted(path, **kwargs):
        model = load(path, **kwargs)
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)
        return model

    monkeypatch.setattr(checkpoint, "from_pretrained", corrupted)
    config = tiny_model_config(noisy_gating=False, expert_bias=False)
    model = build_model(config, seed=0).eval()
    tokenizer = train_tokenizer(["some text to learn from"], vocab_size=300)
    with pytest.raises(RuntimeError, match="reloads to different logits"):
        save_final(model, config, tokenizer, tmp_path / "final", model_type="mixtral")
    monkeypatch.undo()
    assert torch.equal(_logits(moekit.from_pretrained(tmp_path / "final")), _logits(model))
    assert not [p for p in (tmp_path / "final").iterdir() if p.name.startswith(".hf-staging")]
