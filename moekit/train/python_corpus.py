"""A second text corpus, unlike Shakespeare: Python source code, the 491 modules of pip 23.2.1.

`pip-23.2.1-py3-none-any.whl` (pip and the libraries it vendors: requests, urllib3, rich,
pygments, packaging, ...; MIT and compatible licences) is downloaded from the package index
(`moekit.fetch`), checked against a pinned sha256, and only then opened as a zip; nothing in it
runs. Every `*.py` member is written flat into the cache as its dotted module path
(`pip._vendor.rich.console.py`), so documents are named by module, and the cache's marker
records each file's size and sha256 as the Shakespeare cache does (`data.verify_cache`).
A folder corpus: validation is the last modules in sorted order holding 5% of the characters.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from moekit.fetch import FetchError, cache_root, fetch_pypi_file
from moekit.train.data import is_fetched, stage_corpus, verify_cache

PYTHON_PROJECT = "pip"
PYTHON_REQUIREMENT = "pip==23.2.1"
PYTHON_WHEEL = "pip-23.2.1-py3-none-any.whl"
PYTHON_SHA256 = "7ccf472345f20d35bdc9d1841ff5f313260c2c33fe417f48c30ac46cccabf5be"
PYTHON_NUM_MODULES = 491


def default_python_cache_dir() -> Path:
    """`$MOEKIT_CACHE/python-code` if MOEKIT_CACHE is set, else ~/.cache/moekit/python-code."""
    return cache_root() / "python-code"


def module_file_name(member: str) -> str | None:
    """`pip/_vendor/rich/console.py` -> `pip._vendor.rich.console.py`; None for a member that is not a
    plain relative .py path (absolute, `..`, empty parts)."""
    path = PurePosixPath(member)
    if path.is_absolute() or path.suffix != ".py" or any(p in ("", ".", "..") for p in path.parts):
        return None
    return ".".join(path.with_suffix("").parts) + ".py"


def extract_modules(wheel: Path, dest: Path) -> list[Path]:
    """Write every .py member of `wheel` into `dest` under its dotted module name."""
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            name = module_file_name(info.filename)
            if info.is_dir() or name is None:
                continue
            target = dest / name
            with archive.open(info) as source, open(target, "wb") as f:
                f.write(source.read())
                f.flush()
                os.fsync(f.fileno())
            written.append(target)
    return sorted(written)


def fetch_python_corpus(cache_dir: Path | None = None, *, wheel: Path | None = None) -> Path:
    """Download (or take `wheel`), verify and extract the Python source corpus; idempotent.

    The folder appears whole or not at all (extracted into a temporary sibling, then renamed);
    an existing cache is verified against its marker.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_python_cache_dir()
    if is_fetched(cache_dir):
        verify_cache(cache_dir)
        return cache_dir
    if cache_dir.exists() and (not cache_dir.is_dir() or any(cache_dir.iterdir())):
        raise ValueError(f"{cache_dir} exists and is not a fetched corpus folder; remove it or pass "
                         f"another --cache-dir (nothing was changed)")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        if wheel is None:
            try:
                wheel = fetch_pypi_file(PYTHON_PROJECT, PYTHON_WHEEL, PYTHON_SHA256, tmp_path)
            except FetchError as err:
                raise RuntimeError(f"could not download {PYTHON_REQUIREMENT} from the package index: {err}\n"
                                   f"Fix: connect to the internet and rerun `moekit data fetch python-code`, "
                                   f"or pass --tarball with a copy of {PYTHON_WHEEL}.") from err
        elif not Path(wheel).is_file():
            raise FileNotFoundError(f"--tarball {wheel} is not a file; pass a copy of {PYTHON_WHEEL}")
        staging = stage_corpus(Path(wheel), tmp_path, extract_modules, requirement=PYTHON_REQUIREMENT,
                               sha256=PYTHON_SHA256, expected=PYTHON_NUM_MODULES, what="modules")
        if cache_dir.exists():
            cache_dir.rmdir()
        staging.rename(cache_dir)
    return cache_dir
