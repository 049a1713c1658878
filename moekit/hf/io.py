"""Reading and writing Hugging Face safetensors checkpoints: one file or shards plus an index.

Reading is lazy: `CheckpointReader` memory-maps each shard with `safetensors.safe_open` and reads a
tensor only when asked, so a model can be filled tensor by tensor; an index may only name shards
inside its folder. Writing splits tensors into shards of at most `max_shard_size` bytes and writes
`model.safetensors.index.json`, with the user's umask; `prepare_destination` refuses a folder that
holds files this call did not write. Never pickle.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moekit.files import chmod_like_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
NATIVE_FILE = "moekit_config.json"
# What a checkpoint folder holds: weights, the index, either config. `overwrite` replaces these only.
CHECKPOINT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                              r"config\.json|moekit_config\.json")
_WEIGHT_FILES = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (10^9) or "500MiB" (2^20), as transformers reads them."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"max_shard_size={size} is invalid: must be a positive number of bytes")
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
    if match is None:
        raise ValueError(f"max_shard_size={size!r} is invalid: use bytes (int) or e.g. '500MB', '5GB', "
                         f"'2GiB'")
    value = float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""]
    if value < 1:
        raise ValueError(f"max_shard_size={size!r} is invalid: must be at least 1 byte")
    return int(value)


def _listing(names: list[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_not_a_file(path: str | Path, what: str = "destination") -> Path:
    """`path` itself, or its nearest existing ancestor, must be a directory (not a file)."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{what} {path}: {p} is an existing file, not a directory; choose a "
                                 f"directory path")
            break
    return path


def check_destination(path: str | Path, *, overwrite: bool = False, also: tuple[str, ...] = ()) -> list[str]:
    """Refuse a destination that is a file, or a non-empty directory unless `overwrite`; change
    nothing. Returns the files `prepare_destination` would remove (its checkpoint files)."""
    path = check_not_a_file(path)
    if not path.is_dir():
        return []
    entries = sorted(p.name for p in path.iterdir())
    ours = [n for n in entries if (CHECKPOINT_FILES.fullmatch(n) or n in also) and (path / n).is_file()]
    if entries and not overwrite:
        raise ValueError(f"destination {path} is not empty: it holds {_listing(entries)}, which this "
                         f"call did not write. Choose a new or empty directory, or pass --overwrite "
                         f"(overwrite=True) to replace its checkpoint files ({_listing(ours) or 'none'}); "
                         f"other files are never touched")
    return ours


def prepare_destination(path: str | Path, *, overwrite: bool = False, also: tuple[str, ...] = ()) -> Path:
    """Make `path` ready to receive a checkpoint without losing anything this call did not write.

    A missing or empty directory is fine. A non-empty one is refused, naming its files, unless
    `overwrite`: then the checkpoint files in it (weights, index, config.json, moekit_config.json,
    and the names in `also`) are removed, since the new checkpoint replaces them, and every other
    file or folder is left untouched. Raises ValueError for a destination that is a file.
    """
    path = Path(path)
    for name in check_destination(path, overwrite=overwrite, also=also):
        (path / name).unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """`safetensors.save_file`, then the mode every other file gets (it writes through a 0600 temp file)."""
    save_file(tensors, str(file), metadata=metadata)
    chmod_like_open(file)


def read_config(path: str | Path) -> dict:
    """The `config.json` of a checkpoint directory, as a dict."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; a Hugging Face checkpoint directory holds "
                                f"{CONFIG_FILE} plus {SINGLE_FILE} or {INDEX_FILE} and its shards")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return config


class CheckpointReader:
    """Lazy, memory-mapped access to the tensors of a checkpoint directory.

    Args:
        path: a directory with `model.safetensors`, or `model.safetensors.index.json` and the shards
            it names. Every shard is opened (and its header checked) up front; data is read lazily.
    Use as a context manager, or call `close()`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: not a directory; expected a checkpoint directory")
        self._stack = ExitStack()
        self._handles: dict[str, object] = {}
        try:
            self._key_to_file = self._weight_map()
            for file in sorted(set(self._key_to_file.values())):
                self._handles[file] = self._open(file)
            self._check_index()
        except BaseException:
            self.close()
            raise

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a valid safetensors index (needs a 'weight_map' "
                                 f"object of tensor name -> shard file): {err}") from err
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: 'weight_map' is a {type(weight_map).__name__}, not an object "
                                 f"of tensor name -> shard file")
            for key, file in weight_map.items():
                if not isinstance(file, str):
                    raise ValueError(f"{index}: weight_map[{key!r}] = {file!r} is not a shard file name "
                                     f"(a string)")
                if file in ("", ".", "..") or Path(file).name != file or "\\" in file or Path(file).is_absolute():
                    raise ValueError(f"{index}: weight_map[{key!r}] = {file!r} is not a plain file name "
                                     f"inside {self.path}; shards must sit in the checkpoint folder itself")
            for key, file in weight_map.items():
                if not (self.path / file).is_file():
                    raise FileNotFoundError(f"{self.path / file}: shard missing; {INDEX_FILE} "
                                            f"maps tensor {key!r} to it")
            return dict(weight_map)
        if (self.path / SINGLE_FILE).is_file():
            return {key: SINGLE_FILE for key in self._open_keys(SINGLE_FILE)}
        if list(self.path.glob("*.bin")) or list(self.path.glob("*.pt")):
            raise ValueError(f"{self.path}: only pickle weight files (.bin/.pt) found; moekit reads "
                             f"safetensors only (convert them with a trusted tool first)")
        raise FileNotFoundError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _open_keys(self, file: str) -> list[str]:
        handle = self._open(file)
        self._handles[file] = handle
        return list(handle.keys())

    def _open(self, file: str):
        if file in self._handles:
            return self._handles[file]
        full = self.path / file
        try:
            return self._stack.enter_context(safe_open(str(full), framework="pt", device="cpu"))
        except SafetensorError as err:
            raise ValueError(f"{full}: not a readable safetensors file, truncated or corrupted "
                             f"({err}); re-download or re-save it") from err

    def _check_index(self) -> None:
        """Every tensor the index names must be in the shard it names."""
        for file, handle in self._handles.items():
            have = set(handle.keys())
            for key, mapped in self._key_to_file.items():
                if mapped == file and key not in have:
                    raise ValueError(f"{self.path / file}: has no tensor {key!r} although "
                                     f"{INDEX_FILE} maps it there")

    def close(self) -> None:
        self._stack.close()
        self._handles = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def file_of(self, key: str) -> str:
        return self._key_to_file[key]

    def files(self) -> list[str]:
        return sorted(set(self._key_to_file.values()))

    def _handle(self, key: str):
        if key not in self._key_to_file:
            raise KeyError(f"{self.path}: checkpoint has no tensor {key!r}")
        return self._handles[self._key_to_file[key]]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._handle(key).get_slice(key).get_dtype()
        if name not in _DTYPES:
            raise ValueError(f"{self.path / self.file_of(key)}: tensor {key!r} has dtype {name}, "
                             f"which moekit does not read")
        return _DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key`, memory-mapped from its shard (pages are read when touched).

        Each call maps the shard afresh, so the mapping lives only as long as the returned tensor:
        with one long-lived mapping, every page a load touched would stay in this process's RSS
        until the end, doubling the apparent memory of loading.
        """
        self._handle(key)  # raises KeyError naming the checkpoint for an unknown key
        try:
            with safe_open(str(self.path / self.file_of(key)), framework="pt", device="cpu") as handle:
                return handle.get_tensor(key)
        except SafetensorError as err:
            raise ValueError(f"{self.path / self.file_of(key)}: cannot read tensor {key!r} "
                             f"({err}); the file is corrupted") from err

    def metadata(self) -> dict[str, str]:
        first = self._handles[self.files()[0]] if self._handles else None
        return dict(first.metadata() or {}) if first is not None else {}


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Group names, in order, into shards of at most `max_shard_size` bytes.

    A tensor larger than the limit gets a shard of its own (transformers does the same).
    """
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_checkpoint(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    *,
    max_shard_size: int | str = "5GB",
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write `tensors` as safetensors into directory `path`, sharded with an index if needed.

    Args:
        tensors: name -> tensor (any device; written contiguous, on CPU).
        max_shard_size: bytes per shard (int) or a string like "5GB".
    Returns:
        The files written (shards, and the index when there is more than one shard).
    Raises ValueError when `path` already holds weights or an index: `prepare_destination` decides
    what may be replaced, this writer never deletes.
    """
    limit = parse_size(max_shard_size)
    out = check_not_a_file(path)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.iterdir() if _WEIGHT_FILES.fullmatch(p.name))
    if existing:
        raise ValueError(f"{out} already holds checkpoint weights ({_listing(existing)}); write into a new "
                         f"directory, or pass --overwrite (overwrite=True) to replace them")
    names = list(tensors)
    shards = plan_shards([(n, tensor_bytes(tensors[n])) for n in names], limit)
    meta = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        save_safetensors(_contiguous(tensors, names), out / SINGLE_FILE, meta)
        return [SINGLE_FILE]
    written, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(_contiguous(tensors, shard), out / file, meta)
        weight_map.update({name: file for name in shard})
        written.append(file)
    total = sum(tensor_bytes(t) for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*written, INDEX_FILE]


def _contiguous(tensors: dict[str, torch.Tensor], names: Iterable[str]) -> dict[str, torch.Tensor]:
    return {n: tensors[n].detach().to("cpu").contiguous() for n in names}
