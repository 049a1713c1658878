"""A run folder's safety rails: an exclusive lock, atomic file writes, and plain storage errors.

`RunLock(folder)` holds an `fcntl.flock` on `folder/.lock` for as long as a process writes into the
folder, so two runs can never interleave; the kernel drops the lock when its process dies, so a
stale lock file of a killed run never blocks. `storage_error` turns an `OSError` (full disk, read-only folder) into a message saying what
failed, where, and whether a good checkpoint is there to resume from.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_FILE = ".lock"


# Why a write fails for reasons of the storage rather than of moekit: said plainly, not as a traceback.
WRITE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied (the folder is read-only for this user)",
                errno.EPERM: "operation not permitted"}


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock."""


class StorageError(RuntimeError):
    """Writing into the run folder failed (full disk, read-only folder, ...); the message says where."""


def storage_error(err: OSError, *, doing: str, path: str | Path | None = None,
                  checkpoint: Path | None = None) -> StorageError:
    """A StorageError saying what failed (`doing`), where, why, and what is safe to resume from.

    `checkpoint` is the newest complete checkpoint, or None when the run has none yet: only then
    may the message promise that the last good checkpoint is intact.
    """
    where = path if path is not None else err.filename
    why = WRITE_ERRNOS.get(err.errno or -1, err.strerror or str(err))
    if checkpoint is not None:
        after = (f"the last good checkpoint {checkpoint} is intact: fix the cause and continue "
                 f"with --resume")
    else:
        after = "no checkpoint had been written yet, so there is nothing to resume from: fix the " \
                "cause and start the run again"
    return StorageError(f"could not {doing}{f' ({where})' if where else ''}: {why} "
                        f"[{errno.errorcode.get(err.errno or -1, 'OSError')}]; training stopped and {after}")


class RunLock:
    """Exclusive lock on a run folder for the life of a `with` block (or until `release()`).

    Raises RunFolderBusy naming the holder's PID when another process has it. A folder this lock
    had to create is removed again on a failed `with` block if nothing but the lock file is in it.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._created = False

    def acquire(self) -> RunLock:
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"run folder {self.folder} is a file, not a folder; pass a folder path "
                             f"(nothing was changed)")
        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            why = WRITE_ERRNOS.get(err.errno or -1, err.strerror or str(err))
            raise StorageError(f"could not create the run folder's lock file {self.path}: {why} "
                               f"[{errno.errorcode.get(err.errno or -1, 'OSError')}]; nothing in "
                               f"{self.folder} was changed. Make the folder writable or choose another "
                               f"--out") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(
                f"{self.folder} is in use by another moekit process (PID {holder}, holding "
                f"{self.path}); wait for it to finish or stop it, or choose another --out "
                f"(nothing was changed)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # before unlocking: a reader never sees a stale PID as holder
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
        if kind is not None and self._created:
            try:
                if [p.name for p in self.folder.iterdir()] == [LOCK_FILE]:
                    self.path.unlink()
                    self.folder.rmdir()
            except OSError:
                pass
