"""Real faults for tests: a disk that fills up, an object store that goes away.

* :func:`small_disk` mounts a size-limited tmpfs, so writes fail with the
  kernel's own ENOSPC (not a mocked exception): what a user sees when a disk
  fills. It needs root (or CAP_SYS_ADMIN); :func:`require_mount` skips a test,
  with the reason shown, where mounting is not allowed.
* :class:`MotoS3` runs moto's S3 server on 127.0.0.1 in this process and can
  be stopped in the middle of a run, so requests fail with the connection
  errors of a lost endpoint. moto keeps its buckets in this process's memory,
  so a server started afterwards still holds what was written before.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

__all__ = ["MotoS3", "can_mount", "mount_problem", "require_mount", "small_disk"]


@functools.lru_cache(maxsize=None)
def mount_problem() -> str | None:
    """Why a tmpfs cannot be mounted here, or None if it can (tried once).

    Returns
    -------
    str or None
    """
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "mounting a tmpfs needs Linux"
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "no mount/umount commands"
    folder = tempfile.mkdtemp(prefix="p2s-mount-check-")
    try:
        with small_disk(folder, 64 * 1024):
            pass
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"cannot mount a tmpfs ({exc})"
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    return None


def can_mount() -> bool:
    """Whether :func:`small_disk` works here (root on Linux)."""
    return mount_problem() is None


def require_mount() -> None:
    """Skip the calling test, with the reason shown, if a tmpfs cannot be mounted."""
    problem = mount_problem()
    if problem is not None:
        pytest.skip(problem)


@contextlib.contextmanager
def small_disk(path, size_bytes: int):
    """Mount a tmpfs of ``size_bytes`` at ``path`` for the ``with`` block.

    Parameters
    ----------
    path : str or os.PathLike
        Created if missing; must be empty (the mount hides what is there).
    size_bytes : int
        The disk's size; the kernel rounds it up to whole pages.

    Yields
    ------
    pathlib.Path
        ``path``.

    Notes
    -----
    Unmounted afterwards; lazily (``umount -l``) if something still holds a
    file open there, so a failing test cannot leave the mount behind.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_bytes)},mode=0700",
                    "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        done = subprocess.run(["umount", str(path)], capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


class MotoS3:
    """A moto S3 server on 127.0.0.1 that a test can stop and start again.

    Parameters
    ----------
    bucket : str, optional
        Created at the first start (a name of the test module's own keeps
        other modules' buckets apart: they share moto's memory).

    Attributes
    ----------
    endpoint : str
        ``http://127.0.0.1:PORT`` of the running server (a new port after
        each start).
    """

    def __init__(self, bucket=None):
        self.bucket = bucket
        self.endpoint = None
        self._server = None

    def start(self) -> MotoS3:
        """Start a server (holding whatever earlier ones held)."""
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        if self.bucket:
            fs = self.filesystem()
            if not fs.exists(self.bucket):
                fs.mkdir(self.bucket)
        return self

    def stop(self) -> None:
        """Stop the server: requests to its endpoint fail from now on."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def options(self, **extra) -> dict:
        """Storage options for s3fs with this endpoint and fake credentials.

        Parameters
        ----------
        **extra
            Added to (or replacing) the options, e.g. ``retries=1``.
        """
        # no region_name: s3fs would send it as the bucket's
        # LocationConstraint, which S3 (and moto) refuse for us-east-1
        return {"key": "testing", "secret": "testing",
                "client_kwargs": {"endpoint_url": self.endpoint}, **extra}

    def filesystem(self, **extra):
        """A fresh (uncached) s3fs file system for this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options(**extra))

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
