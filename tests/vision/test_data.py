"""IDX reading (gzipped or not), folder loading errors, and the Fashion-MNIST fetch's refusals."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from moekit.fetch import FetchError
from moekit.vision import data as vdata
from moekit.vision.data import load_image_folder, read_idx, write_idx

FIXTURE = Path(__file__).parents[1] / "fixtures" / "fashion_mini"


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_round_trip(tmp_path: Path, dtype: str, gz: bool) -> None:
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), a)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == gz
    b = read_idx(path)
    assert b.shape == (2, 3, 4) and np.array_equal(a, b)


def test_header_bytes_by_hand(tmp_path: Path) -> None:
    # labels 3, 1 as idx1-ubyte: magic 00 00 08 01, count 2 (big-endian), then the bytes.
    (tmp_path / "l").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 1]))
    assert read_idx(tmp_path / "l").tolist() == [3, 1]


@pytest.mark.parametrize("raw,message", [
    pytest.param(b"\x50\x4b\x03\x04rest", "not an IDX file", id="bad-magic"),
    pytest.param(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 0]), "dtype code 0x42", id="bad-dtype"),
    pytest.param(bytes([0, 0, 8, 3, 0, 0, 0, 2]), "declares 3 dimensions", id="short-header"),
    pytest.param(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]), "truncated", id="truncated"),
    pytest.param(b"", "not an IDX file", id="empty"),
])
def test_bad_files_name_the_file(tmp_path: Path, raw: bytes, message: str) -> None:
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")[:-6])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


def test_fixture_folder_mixes_gz_and_raw() -> None:
    d = load_image_folder(FIXTURE)
    assert d.image_size == (28, 28) and d.num_classes == 10
    assert len(d.train) == 60 and len(d.test) == 30
    assert sorted(np.bincount(d.train.labels_N).tolist()) == [6] * 10


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_image_folder(tmp_path / "nope")
    for f in FIXTURE.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_image_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))
    with pytest.raises(ValueError, match="7 labels but"):
        load_image_folder(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(30, dtype=np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((30, 14, 14), dtype=np.uint8))
    with pytest.raises(ValueError, match="one image size"):
        load_image_folder(tmp_path)


def test_fetch_without_apt_says_how_to_get_the_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vdata.shutil, "which", lambda name: None)
    with pytest.raises(FetchError, match="apt-get download dataset-fashion-mnist") as err:
        vdata.fetch_fashion_mnist(tmp_path / "fm")
    assert "--data FOLDER" in str(err.value)


def test_fetch_refuses_a_deb_with_the_wrong_hash(tmp_path: Path) -> None:
    deb = tmp_path / "dataset-fashion-mnist_0_all.deb"
    deb.write_bytes(b"!<arch>\nnot the pinned package")
    with pytest.raises(ValueError, match="sha256"):
        vdata.fetch_fashion_mnist(tmp_path / "fm", deb=deb)
    assert not any((tmp_path / "fm").glob("*ubyte*"))
