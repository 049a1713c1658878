"""Small file-writing helpers every writer shares: the user's umask, atomic writes, folder fsync.

`safetensors.torch.save_file` creates its file 0600 whatever the umask; `chmod_like_open` gives such a
file the mode a plain `open(path, "w")` would have, so everything moekit writes follows the umask.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (Linux), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode a plain `mkdir` gives a new folder: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` whole or not at all: a temporary sibling, fsync'd, then renamed.

    The file gets the user's umask like any other new file; a failure leaves the old file (if any)
    untouched and removes the temporary one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def chmod_like_open(path: str | Path) -> None:
    """Give `path` the mode a new file gets from `open()` (0o666 less the umask)."""
    os.chmod(path, file_mode())
