"""One run at a time per local OUT: an advisory lock next to OUT.

The lock's path is the manifest's (:func:`~..planning.paths.lock_path`); the
rules over every path of a run live in :mod:`..planning.checker`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from ..errors import BusyError, InputError
from ..io.urls import is_local
from ..planning.paths import lock_path


@contextlib.contextmanager
def output_lock(out):
    """Hold an exclusive lock on a local OUT for the run.

    A second run on the same OUT stops with one line instead of writing the
    same files. Object-store outputs have no lock (their writes are whole
    objects and the final marker is written last).
    """
    if not is_local(out):
        yield
        return
    path = lock_path(out)
    fd = _acquire(path, out)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _acquire(path, out) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot create the lock file {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise BusyError(f"another p2s-dask run is writing {out}; wait for it to "
                                 f"finish or stop it (lock {path})") from None
            raise
        # the holder before us may have unlinked the file after we opened it:
        # then our lock is on a file nobody else sees, so take the new one
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
