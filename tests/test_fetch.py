"""moekit.fetch against a package index served from a local folder on 127.0.0.1 (no internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import urllib.error
from pathlib import Path

import pytest

from moekit import fetch

PAYLOAD = b"pretend sdist bytes\n" * 100


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A PEP 503 simple index for project `demo` listing `demo-1.0.tar.gz` and a missing file."""
    root = tmp_path / "served"
    (root / "simple" / "demo").mkdir(parents=True)
    (root / "files").mkdir()
    (root / "files" / "demo-1.0.tar.gz").write_bytes(PAYLOAD)
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    (root / "simple" / "demo" / "index.html").write_text(
        "<html><body>\n"
        f'<a href="../../files/demo-1.0.tar.gz#sha256={digest}">demo-1.0.tar.gz</a>\n'
        '<a href="../../files/demo-0.9.tar.gz">demo-0.9.tar.gz</a>\n'
        "</body></html>\n")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_address[1]}/simple")
    yield digest
    server.shutdown()
    server.server_close()


def test_downloads_and_verifies_before_handing_over(tmp_path, index):
    dest = tmp_path / "dest"
    path = fetch.fetch_pypi_file("demo", "demo-1.0.tar.gz", index, dest)
    assert path == dest / "demo-1.0.tar.gz" and path.read_bytes() == PAYLOAD
    assert [p.name for p in dest.iterdir()] == ["demo-1.0.tar.gz"]  # no temporary leftovers


def test_a_file_already_there_with_the_right_hash_is_reused(tmp_path, index, monkeypatch):
    fetch.fetch_pypi_file("demo", "demo-1.0.tar.gz", index, tmp_path)
    monkeypatch.setattr(fetch, "_download", lambda url, target: pytest.fail("downloaded again"))
    assert fetch.fetch_pypi_file("demo", "demo-1.0.tar.gz", index, tmp_path).read_bytes() == PAYLOAD


def test_a_wrong_hash_is_refused_and_leaves_nothing(tmp_path, index):
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match=r"has sha256 .* expected 0{64} .*nothing was read"):
        fetch.fetch_pypi_file("demo", "demo-1.0.tar.gz", "0" * 64, dest)
    assert not dest.exists()


def test_a_wrong_hash_never_replaces_a_file_already_there(tmp_path, index):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "demo-1.0.tar.gz").write_bytes(b"mine")
    with pytest.raises(ValueError, match="sha256"):
        fetch.fetch_pypi_file("demo", "demo-1.0.tar.gz", "0" * 64, dest)
    assert (dest / "demo-1.0.tar.gz").read_bytes() == b"mine"
    assert [p.name for p in dest.iterdir()] == ["demo-1.0.tar.gz"]


def test_listed_but_missing_and_unlisted_files_are_clear_errors(tmp_path, index):
    with pytest.raises(fetch.FetchError, match=r"could not download .*demo-0\.9\.tar\.gz"):
        fetch.fetch_pypi_file("demo", "demo-0.9.tar.gz", "0" * 64, tmp_path / "a")
    with pytest.raises(fetch.FetchError, match=r"lists no file demo-2\.0\.tar\.gz"):
        fetch.fetch_pypi_file("demo", "demo-2.0.tar.gz", "0" * 64, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", offline)
    with pytest.raises(fetch.FetchError, match=r"could not read the package index .*are you offline"):
        fetch.fetch_pypi_file("demo", "demo-1.0.tar.gz", "0" * 64, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_verify_sha256_names_the_file(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    fetch.verify_sha256(f, hashlib.sha256(b"abc").hexdigest(), what="x")
    with pytest.raises(ValueError, match=rf"{f} has sha256"):
        fetch.verify_sha256(Path(f), "1" * 64, what="x")
