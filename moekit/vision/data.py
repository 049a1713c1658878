"""Image data for the vision MoE: an IDX reader, a folder of the four standard IDX files, Fashion-MNIST.

IDX (LeCun's MNIST format): two zero bytes, a dtype code, the number of dimensions, each dimension
as a big-endian uint32, then the values in C order. Files may be gzipped. `moekit data fetch
fashion-mnist` takes the four files from Debian's `dataset-fashion-mnist` package (sha256-pinned,
unpacked without running anything) into `$MOEKIT_CACHE/fashion-mnist`.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moekit.fetch import FetchError, cache_root, extract_deb, fetch_debian_package, sha256_file, verify_sha256

# IDX dtype code -> numpy dtype (big-endian for multi-byte types).
IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_DEB_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
FASHION_MNIST_DEB_DIR = "usr/share/datasets/fashion-mnist"
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
BY_HAND = (
    "To get the files by hand: on a Debian/Ubuntu machine run `apt-get download dataset-fashion-mnist` "
    "and pass the .deb with `moekit data fetch fashion-mnist --deb FILE`, or download the four "
    "*-ubyte.gz files of https://github.com/zalandoresearch/fashion-mnist (data/fashion) into a folder "
    "and train with `moekit train --task vision --data FOLDER`."
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array of its stored shape and dtype.

    Raises ValueError naming the file when the magic number, dtype code or size is wrong.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: gzip data is corrupt ({err})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic {raw[:4].hex() or 'empty'}; an IDX file "
                         f"starts with two zero bytes, a dtype code and the number of dimensions)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x}; known "
                         f"{', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}")
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions but the file is {len(raw)} bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes of data) but the file "
                         f"holds {len(raw) - header} bytes after the header; the file is truncated or "
                         f"not an IDX file")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write `array` as an IDX file (gzipped when compress, or when the name ends in .gz)."""
    path = Path(path)
    codes = {dtype: code for code, dtype in IDX_DTYPES.items()}
    dtype = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    if dtype not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of {sorted(map(str, codes))}")
    header = bytes([0, 0, codes[dtype], array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    compress = path.suffix == ".gz" if compress is None else compress
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
    return path


@dataclass(frozen=True)
class ImageSplit:
    """Images (N, H, W) uint8 and integer labels (N,)."""

    images_NHW: np.ndarray
    labels_N: np.ndarray

    def __len__(self) -> int:
        return len(self.labels_N)


@dataclass(frozen=True)
class ImageData:
    train: ImageSplit
    test: ImageSplit
    source: str

    @property
    def num_classes(self) -> int:
        return int(max(self.train.labels_N.max(), self.test.labels_N.max())) + 1

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.images_NHW.shape[1:])  # type: ignore[return-value]

    def describe(self) -> str:
        h, w = self.image_size
        return (f"{self.source}: {len(self.train):,} train / {len(self.test):,} test images of "
                f"{h}x{w}, {self.num_classes} classes")


def find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has no {stem} or {stem}.gz; a vision data folder holds the four "
                            f"standard IDX files ({', '.join(s for pair in SPLITS.values() for s in pair)}, "
                            f"gzipped or not). {BY_HAND}")


def _read_split(folder: Path, split: str) -> ImageSplit:
    images_path, labels_path = (find_idx(folder, stem) for stem in SPLITS[split])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} "
                         f"{images.shape}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{labels_path}: expected integer labels of shape (N,), got {labels.dtype} "
                         f"{labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{labels_path} holds {len(labels)} labels but {images_path} holds "
                         f"{len(images)} images; they must match")
    if len(labels) == 0 or labels.min() < 0:
        raise ValueError(f"{labels_path}: labels must be non-empty and >= 0")
    return ImageSplit(images, labels.astype(np.int64))


def load_image_folder(folder: str | Path) -> ImageData:
    """The train and test splits of a folder with the four standard IDX files (MNIST layout)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder} is not a folder. {BY_HAND}")
    train, test = _read_split(folder, "train"), _read_split(folder, "test")
    if train.images_NHW.shape[1:] != test.images_NHW.shape[1:]:
        raise ValueError(f"{folder}: train images are {train.images_NHW.shape[1:]} but test images are "
                         f"{test.images_NHW.shape[1:]}; both splits need one image size")
    return ImageData(train, test, source=str(folder))


def fashion_mnist_dir() -> Path:
    return cache_root() / "fashion-mnist"


def is_fashion_mnist(folder: Path) -> bool:
    return all((folder / name).is_file() and sha256_file(folder / name) == digest
               for name, digest in FASHION_MNIST_SHA256.items())


def fetch_fashion_mnist(folder: Path | None = None, *, deb: Path | None = None) -> Path:
    """Fetch Fashion-MNIST's four gzipped IDX files into `folder` (default the cache); idempotent.

    The .deb (downloaded by `apt-get download`, or `deb`) and each extracted file are checked
    against pinned sha256s before anything is read; no package script runs.
    """
    folder = Path(folder) if folder is not None else fashion_mnist_dir()
    if is_fashion_mnist(folder):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        if deb is None:
            if shutil.which("apt-get") is None:
                raise FetchError(f"apt-get is not available to download {FASHION_MNIST_PACKAGE}. {BY_HAND}")
            try:
                deb = fetch_debian_package(FASHION_MNIST_PACKAGE, FASHION_MNIST_DEB_SHA256, tmp_path / "deb")
            except FetchError as err:
                raise FetchError(f"{err}\n{BY_HAND}") from err
        elif not Path(deb).is_file():
            raise FileNotFoundError(f"--deb {deb} does not exist")
        else:
            verify_sha256(deb, FASHION_MNIST_DEB_SHA256, what=f"Debian package {FASHION_MNIST_PACKAGE}")
        unpacked = extract_deb(deb, tmp_path / "root") / FASHION_MNIST_DEB_DIR
        for name, digest in FASHION_MNIST_SHA256.items():
            source = unpacked / name
            if not source.is_file() or sha256_file(source) != digest:
                raise ValueError(f"{deb}: {FASHION_MNIST_DEB_DIR}/{name} is missing or does not have the "
                                 f"pinned sha256 {digest}; nothing was installed")
        for name in FASHION_MNIST_SHA256:
            (unpacked / name).replace(folder / name)
    return folder
