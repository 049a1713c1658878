"""The Python source corpus: only plain .py members extracted under their module names, the pinned
sha256 checked before the wheel is opened, and the usual folder split (on a synthetic wheel, offline)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from moekit.train import python_corpus
from moekit.train.data import load_corpus, verify_cache


def _fake_wheel(path, members: dict[str, str]):
    with zipfile.ZipFile(path, "w") as z:
        for name, text in members.items():
            z.writestr(name, text)
    return path


MEMBERS = {"pip/__init__.py": "version = 1\n" * 50, "pip/_internal/cli/main.py": "def main():\n    pass\n" * 50,
           "pip/_vendor/rich/console.py": "class Console:\n    pass\n" * 5, "pip/py.typed": "",
           "pip-23.2.1.dist-info/METADATA": "Name: pip\n", "../escape.py": "x = 1\n", "/abs.py": "x = 1\n"}


@pytest.mark.parametrize("member, name", [
    pytest.param("pip/_vendor/rich/console.py", "pip._vendor.rich.console.py", id="nested"),
    pytest.param("pip/__init__.py", "pip.__init__.py", id="package-init"),
    pytest.param("../escape.py", None, id="parent-dir"),
    pytest.param("/abs.py", None, id="absolute"),
    pytest.param("pip/py.typed", None, id="not-python"),
])
def test_module_file_names(member, name):
    assert python_corpus.module_file_name(member) == name


def test_fetch_extracts_modules_verifies_and_splits_by_module(tmp_path, monkeypatch):
    wheel = _fake_wheel(tmp_path / "pip.whl", MEMBERS)
    monkeypatch.setattr(python_corpus, "PYTHON_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setattr(python_corpus, "PYTHON_NUM_MODULES", 3)
    cache = tmp_path / "cache" / "python-code"
    assert python_corpus.fetch_python_corpus(cache, wheel=wheel) == cache
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == [
        "pip.__init__.py", "pip._internal.cli.main.py", "pip._vendor.rich.console.py"]
    verify_cache(cache)
    corpus = load_corpus(cache)
    # the last module in sorted order (5% of the characters) is held out, and said by name
    assert [d.name for d in corpus.val] == ["pip._vendor.rich.console"]
    assert "validation" in corpus.describe() and "pip._vendor.rich.console" in corpus.describe()
    (cache / "pip.__init__.py").write_text("changed\n")
    with pytest.raises(ValueError, match="pip.__init__.py was changed"):
        verify_cache(cache)


def test_fetch_rejects_a_wrong_checksum_and_leaves_nothing(tmp_path):
    wheel = _fake_wheel(tmp_path / "pip.whl", MEMBERS)
    cache = tmp_path / "cache" / "python-code"
    with pytest.raises(ValueError, match="sha256"):
        python_corpus.fetch_python_corpus(cache, wheel=wheel)
    assert not cache.exists() and list((tmp_path / "cache").iterdir()) == []
