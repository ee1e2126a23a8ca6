"""One writer per output folder: an advisory lock the kernel releases when its process dies.

The lock is ``fcntl.flock`` on ``<output_dir>/.lock``, which also holds the holder's pid for the
refusal message. A lock file left behind by a dead process is not a lock: ``flock`` on it
succeeds, so a stale lock never blocks a run.
"""

from __future__ import annotations

import fcntl
import os
import warnings
from pathlib import Path

LOCK_NAME = ".lock"


class OutputDirLockedError(RuntimeError):
    pass


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputDirLockedError(
                f"{self.path.parent} is in use by another run (pid {holder}); wait for it to finish, stop it, "
                "or choose another --output-dir"
            ) from None
        except OSError as err:  # a file system without flock (some NFS, Lustre, FUSE mounts)
            os.close(fd)
            warnings.warn(
                f"{self.path.parent}: file locks are not supported here ({err.strerror}); a second run "
                "on this folder would not be refused",
                stacklevel=2,
            )
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()
