"""Atomic, verifiable training checkpoints: safetensors for every tensor, JSON for the rest.

A checkpoint is a folder `step_XXXXXXXX/` holding tensor files (model, optimizer state, RNG states)
and `state.json`. It is written into a temporary folder, each file fsync'd, then `manifest.json`
(every file's sha256) is written last and the folder renamed into place. A folder without a
manifest, or whose files do not match it, is torn or corrupt and is skipped on resume. A
distributed run adds `sharded/`: each rank's own tensors, written by torch.distributed.checkpoint
as safetensors (see `write_shards`); rank 0 writes the rest and the manifest over all of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from moekit.files import fsync_dir

MANIFEST = "manifest.json"
STATE = "state.json"
SHARDED = "sharded"  # the ranks' shard files of a distributed run
_PREFIX = "step_"
_TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def _write_file(path: Path, data: bytes) -> None:
    """Write and fsync one file (tests inject failures here to simulate a kill mid-write)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    tensors: dict[str, dict[str, Tensor]],
    state: dict,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically and keep only the newest `keep_last`.

    Args:
        tensors: file stem -> {name: tensor}; each becomes `<stem>.safetensors`.
        state: JSON-serialisable training state, written as `state.json`.
    Returns the checkpoint folder. An existing complete checkpoint of the same step is kept as is.
    """
    tmp = begin_checkpoint(root, step)
    if tmp is None:
        return Path(root) / checkpoint_name(step)
    try:
        files = {f"{stem}.safetensors": tensor_bytes(named) for stem, named in tensors.items()}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return commit_checkpoint(root, step, tmp, files=files, state=state, keep_last=keep_last)


def tensor_bytes(named: dict[str, Tensor]) -> bytes:
    """One safetensors file of `named` (CPU, contiguous copies: expert weights may be strided views)."""
    return save_safetensors({k: v.detach().to("cpu").contiguous().clone() for k, v in named.items()})


def tmp_folder(root: str | Path, step: int, pid: int | None = None) -> Path:
    """Where checkpoint `step` is written before it is committed (its writer's PID in the name)."""
    return Path(root) / f"{_TMP_PREFIX}{checkpoint_name(step)}-{os.getpid() if pid is None else pid}"


def begin_checkpoint(root: str | Path, step: int, pid: int | None = None) -> Path | None:
    """A fresh temporary folder for checkpoint `step`, or None when a complete one already exists."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    if final.exists() and verify_checkpoint(final) is None:
        return None
    tmp = tmp_folder(root, step, pid)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_checkpoint(root: str | Path, step: int, tmp: Path, *, files: dict[str, bytes], state: dict,
                      keep_last: int | None = None) -> Path:
    """Write `files` and `state.json` into `tmp`, then the manifest (the sha256 of every file in
    `tmp`, the ranks' shard files too) last, and rename `tmp` into place. `tmp` is removed on failure."""
    root = Path(root)
    final = root / checkpoint_name(step)
    files = {**files, STATE: (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()}
    try:
        for name, data in files.items():
            _write_file(tmp / name, data)
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        for f in sorted(tmp.rglob("*")):  # files other writers (the ranks) put there
            name = f.relative_to(tmp).as_posix()
            if f.is_file() and name not in digests:
                digests[name] = _sha256_file(f)
        for folder in sorted({(tmp / n).parent for n in digests}, reverse=True):
            fsync_dir(folder)
        manifest = {"step": step, "files": digests}
        _write_file(tmp / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        fsync_dir(tmp)
        if final.exists():  # a torn folder of the same step: replace it
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial folder must not outlive a failed write
        raise
    fsync_dir(root)
    if keep_last is not None:
        prune_checkpoints(root, keep_last)
    return final


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_tmp(root: str | Path) -> list[Path]:
    """Delete `.tmp-step_*` folders of processes that died mid-write; returns what was removed.

    A folder's name ends in the writer's PID; one of a live process other than this one is kept.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.glob(f"{_TMP_PREFIX}{_PREFIX}*")):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under `root`, newest step first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)
             and p.name[len(_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]), reverse=True)


def verify_checkpoint(path: str | Path) -> str | None:
    """None if the checkpoint is complete and every file matches its manifest, else the problem."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest.json (torn write)"
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"unreadable manifest.json ({err})"
    for name, expected in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256_file(f) != expected:
            return f"{name} does not match its sha256 in the manifest (corrupt)"
    return None


def latest_checkpoint(root: str | Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under `root`, and a note for each newer one skipped."""
    skipped = []
    for path in list_checkpoints(root):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append(f"skipped {path}: {problem}")
    return None, skipped


def prune_checkpoints(root: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (torn ones older than those too)."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} is invalid: must be >= 1")
    complete = 0
    for path in list_checkpoints(root):
        if complete >= keep_last:
            shutil.rmtree(path)
        elif verify_checkpoint(path) is None:
            complete += 1


def read_checkpoint(path: str | Path, *, shards: bool = True) -> tuple[dict[str, dict[str, Tensor]], dict]:
    """Verify and read a checkpoint: ({stem: {name: tensor}}, state). ValueError if it is corrupt.

    A distributed run's shard files (`sharded/`) are read as whole tensors into their stems too,
    unless `shards=False` (each rank then reads its own slices with `read_shards`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"checkpoint {path} is not usable: {problem}")
    tensors = {f.name[: -len(".safetensors")]: load_safetensors(f.read_bytes())
               for f in sorted(path.glob("*.safetensors"))}
    layout = shard_layout(path)
    if shards and layout is not None:
        targets = {key: torch.empty(size, dtype=dtype) for key, (size, dtype) in layout.items()}
        read_shards(path, targets, distributed=False)
        for key, t in targets.items():
            stem, name = key.split("/", 1)
            tensors.setdefault(stem, {})[name] = t
    return tensors, json.loads((path / STATE).read_text())


# ---- the ranks' shards (torch.distributed.checkpoint, safetensors files) -----------------------
# Each rank of a distributed run writes the tensors it holds (its expert slices as DTensors, rank 0
# also the dense ones) through DCP's HuggingFaceStorageWriter: safetensors files whose headers carry
# each slice's offsets as JSON, and no `.metadata` pickle. The reader rebuilds the layout from those
# headers, so any mesh (or one process) reads the slices it needs. Keys are "<stem>/<name>".
def write_shards(tmp: Path, tensors: dict[str, Tensor]) -> None:
    """Every rank: write this rank's `tensors` (plain or DTensor) under `tmp/sharded` (collective)."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter, save

    save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDED), save_distributed=True))


def shard_layout(path: str | Path) -> dict[str, tuple[torch.Size, torch.dtype]] | None:
    """Global size and dtype of every sharded tensor of a checkpoint; None when it has no shards."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    folder = Path(path) / SHARDED
    if not folder.is_dir():
        return None
    metadata = HuggingFaceStorageReader(str(folder)).read_metadata()
    return {key: (md.size, md.properties.dtype) for key, md in metadata.state_dict_metadata.items()}


def check_shards(tmp: Path, keys: set[str]) -> None:
    """Rank 0, before the commit: every key is in `tmp/sharded` and its slices cover it whole. A
    ValueError otherwise, e.g. when the ranks do not share the checkpoint folder's filesystem."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    metadata = HuggingFaceStorageReader(str(tmp / SHARDED)).read_metadata().state_dict_metadata
    missing = sorted(keys - set(metadata))
    partial = sorted(k for k, md in metadata.items()
                     if sum(math.prod(c.sizes) for c in md.chunks) != math.prod(md.size))
    if missing or partial:
        raise ValueError(f"the ranks' shards in {tmp / SHARDED} are incomplete (missing {missing[:3]}, "
                         f"partly written {partial[:3]}); every rank must write to the same folder: put "
                         f"--out on a filesystem all machines share")


def read_shards(path: str | Path, targets: dict[str, Tensor], *, distributed: bool) -> None:
    """Fill `targets` (plain tensors: whole; DTensors: this rank's slice) from a checkpoint's shards."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader, load

    reader = HuggingFaceStorageReader(str(Path(path) / SHARDED))
    with warnings.catch_warnings():  # DCP warns of a one-process read even when asked for one
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        load(targets, storage_reader=reader, no_dist=not distributed)


# ---- what goes into the tensor files --------------------------------------------------------------
def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer, non-persistent ones too (router load counters), by name."""
    out = {name: p for name, p in model.named_parameters(remove_duplicate=False)}
    out.update({name: b for name, b in model.named_buffers(remove_duplicate=False) if b is not None})
    return out


def load_model_tensors(model: nn.Module, tensors: dict[str, Tensor], *, source: str = "checkpoint") -> None:
    """Copy saved tensors into `model`; a ValueError naming the mismatch if the architecture differs."""
    expected = model_tensors(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = [f"{k}: saved {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
                   for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong_shape:
            parts.append(f"shape mismatch {wrong_shape[:5]}")
        raise ValueError(f"{source} does not fit this model architecture: {'; '.join(parts)}. "
                         f"Use the same preset/config the checkpoint was trained with, or a new --out")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Optimizer state split into tensors ("<param index>.<key>") and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, object] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    state: dict[int, dict[str, object]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = meta["param_groups"]
    ours = optimizer.state_dict()["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in ours]:
        raise ValueError("the checkpoint's optimizer has different parameter groups than this model; "
                         "the checkpoint comes from another architecture")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda_{i}"] = s
    return out


def set_rng_tensors(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[len("cuda_"):]))
    cuda = [tensors[k] for k in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
