"""`moekit train` / `compare` flags are checked before the corpus is prepared; files follow the umask."""

from __future__ import annotations

import pytest
import torch

from moekit.cli import main
from moekit.files import dir_mode, file_mode
from moekit.train import run as run_module
from moekit.train.tokenizer import save_tokenizer, train_tokenizer

from ..train.helpers import FIXTURE

FAST = ["--corpus", str(FIXTURE), "--vocab-size", "300", "--batch-size", "2", "--seq-len", "16",
        "--eval-every", "1", "--eval-sequences", "2", "--quiet"]


@pytest.fixture
def no_data_preparation(monkeypatch):
    """Fail the test if a command gets as far as preparing the corpus."""
    monkeypatch.setattr(run_module, "prepare_data", lambda *a, **k: pytest.fail("prepared the data first"))


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--vocab-size", "0"], "--vocab-size 0 is invalid: must be an integer >= 257", id="vocab-0"),
    pytest.param(["--vocab-size", "100"], "--vocab-size 100 is invalid", id="vocab-100"),
    pytest.param(["--init-from", "X", "--upcycle-noise", "nan"], "--upcycle-noise nan is invalid", id="noise-nan"),
    pytest.param(["--init-from", "X", "--upcycle-noise", "-1"], "--upcycle-noise -1.0 is invalid", id="noise-neg"),
    pytest.param(["--init-from", "X", "--upcycle-noise", "inf"], "--upcycle-noise inf is invalid", id="noise-inf"),
    pytest.param(["--upcycle-noise", "0.1"], "only applies with --init-from", id="noise-alone"),
    pytest.param(["--init-from", "X"], "--init-from", id="missing-parent"),
    pytest.param(["--device", "gpu"], "--device 'gpu' is not a torch device", id="unknown-device"),
    pytest.param(["--device", "cuda"], "--device cuda: this machine has no CUDA device", id="no-cuda",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_flags_are_refused_before_the_data_is_prepared(tmp_path, capsys, no_data_preparation, argv,
                                                           message):
    out = tmp_path / "run"
    argv = [a.replace("X", str(tmp_path / "no-parent")) for a in argv]
    assert main(["train", "--out", str(out), "--steps", "1", *FAST, *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys, no_data_preparation):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    assert main(["train", "--out", str(out), "--steps", "1", *FAST]) == 2
    assert f"--out {out}: {out} is an existing file, not a directory" in capsys.readouterr().err
    assert main(["compare", "--out", str(out), "--steps", "1", "--corpus", str(FIXTURE), "--quiet"]) == 2
    assert f"--out {out}: {out} is an existing file, not a directory" in capsys.readouterr().err
    assert out.read_text() == "mine"


def test_compare_refuses_a_vocab_size_too_small(tmp_path, capsys, no_data_preparation):
    assert main(["compare", "--out", str(tmp_path / "c"), "--vocab-size", "0", "--corpus", str(FIXTURE)]) == 2
    assert "--vocab-size 0 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_init_from_a_parent_with_another_tokenizer_is_refused(tmp_path, capsys):
    parent = tmp_path / "parent"
    other = train_tokenizer(["entirely different text, " * 50, "with other merges entirely\n" * 50],
                            vocab_size=300)
    save_tokenizer(other, parent)
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--steps", "1", *FAST,
                 "--init-from", str(parent)]) == 2
    err = capsys.readouterr().err
    assert f"--init-from {parent} was trained with another tokenizer" in err and str(parent / "tokenizer.json") in err
    assert not out.exists()


def test_every_file_of_a_run_follows_the_umask(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--steps", "1", "--checkpoint-every", "1",
                 *FAST]) == 0
    paths = [out, *out.rglob("*")]
    assert any(p.name == "model.safetensors" and p.parent.name == "final" for p in paths)
    wrong = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in paths
             if p.stat().st_mode & 0o777 != (dir_mode() if p.is_dir() else file_mode())}
    assert wrong == {}


def test_a_truncated_tokenizer_is_named(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--steps", "1", "--checkpoint-every", "1",
                 *FAST]) == 0
    tokenizer = out / "tokenizer.json"
    written = (tokenizer.stat().st_ino, tokenizer.stat().st_mtime_ns)
    assert main(["train", "--preset", "tiny", "--out", str(out), "--steps", "1", "--resume", *FAST]) == 0
    assert (tokenizer.stat().st_ino, tokenizer.stat().st_mtime_ns) == written  # a resume leaves it alone
    tokenizer.write_bytes(tokenizer.read_bytes()[:200])  # as a kill mid-write used to leave it
    assert main(["train", "--preset", "tiny", "--out", str(out), "--steps", "2", "--resume", *FAST]) == 2
    err = capsys.readouterr().err
    assert f"{tokenizer} is not a readable tokenizer" in err and "truncated" in err
