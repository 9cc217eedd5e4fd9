"""One run per output folder: an advisory ``flock`` on ``<folder>/.lock``.

Two runs writing the same folder would both compute every cell and append it twice (the report
then counts the copies as two seeds). The second one must refuse, in one line, before it does
any work.

Why ``fcntl.flock`` and not a pid file: the kernel drops the lock when the holder's last file
descriptor closes, which includes a SIGKILL, an OOM kill or a power loss. A pid file outlives
its process and would need guessing whether a recorded pid is still ours. The pid is still
written into the lock file, but only so that the refusal can say who holds the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from harness.core.atomic import write_all, write_error
from harness.core.errors import BlindspotsError

LOCK_NAME = ".lock"


class RunLock:
    """Context manager holding the exclusive lock of one output folder (non-blocking)::

        with RunLock(out):
            ...  # only this process writes into ``out``

    The folder is created if needed. A second holder — another process, or a second
    ``RunLock`` on the same folder in this one — gets a one-line ``BlindspotsError``.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``BlindspotsError`` naming the process that holds it."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise write_error(self.path, exc, "create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _recorded_pid(fd)
            os.close(fd)
            raise BlindspotsError(
                f"{self.folder} is in use by another blindspots run (pid {holder}); "
                "wait for it or use another --out"
            ) from None
        except OSError as exc:  # e.g. ENOLCK on a filesystem without locks
            os.close(fd)
            raise write_error(self.path, exc, "lock") from None
        self._fd = fd
        _record_pid(fd)

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would let two runs lock different files)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _record_pid(fd: int) -> None:
    """Write our pid for the refusal message; best effort (the lock itself is what counts)."""
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        write_all(fd, f"{os.getpid()}\n".encode())


def _recorded_pid(fd: int) -> str:
    """The holder's pid as written in the lock file, or 'unknown' if it has not written it yet."""
    with contextlib.suppress(OSError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
    return "unknown"
