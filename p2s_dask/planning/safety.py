"""Rules that keep the user's data safe, checked before anything is touched.

* IN and OUT (and the mask and gradient files) are resolved to what they
  really name (real paths through symlinks, the same file through hard
  links, normalised object-store URLs) and a run that would write over its
  own input, or inside it, is refused whatever ``--overwrite`` says.
* One run at a time per local OUT: an advisory lock next to OUT.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import posixpath

from fsspec.core import split_protocol

from ..errors import InputError
from ..io.urls import is_local, local_path


def canonical(url) -> str:
    """What ``url`` really names: a real local path, or a normalised URL."""
    url = os.fspath(url)
    if is_local(url):
        return os.path.realpath(local_path(url))
    protocol, path = split_protocol(url)
    protocol = {"s3a": "s3", "gcs": "gs"}.get(protocol, protocol)
    return f"{protocol}://{posixpath.normpath('/' + path).lstrip('/')}"


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_in_out(inp, out, work_url, others=()) -> None:
    """Refuse a run whose OUT or work store would touch its input.

    Parameters
    ----------
    inp, out : str
        IN and OUT as the user gave them.
    work_url : str
        The work store the run would use.
    others : sequence of str
        Other input files (mask, bvals, bvecs), which OUT must not replace.

    Raises
    ------
    InputError
        One line, whatever ``--overwrite`` says.
    """
    cin, cout, cwork = canonical(inp), canonical(out), canonical(work_url)
    if cin == cout or (is_local(inp) and is_local(out) and _same_file(cin, cout)):
        raise InputError(f"OUT ({out}) is the input itself ({inp}); choose another OUT: "
                         "p2s-dask never writes over its input")
    if _inside(cout, cin):
        raise InputError(f"OUT ({out}) is inside the input ({inp}); choose another OUT")
    if _inside(cin, cout):
        raise InputError(f"the input ({inp}) is inside OUT ({out}); choose another OUT")
    if _inside(cin, cwork):
        raise InputError(f"the input ({inp}) is inside the work store {work_url}; "
                         "move it or choose another OUT or --tmp-dir")
    targets = [out, *_sidecars_of(out)]
    inputs = [o for o in (*others, *_sidecars_of(inp))
              if o is not None and isinstance(o, (str, os.PathLike))]
    for other in inputs:
        cother = canonical(other)
        for target in targets:
            ctarget = canonical(target)
            if cother == ctarget or _inside(cother, ctarget) or (
                    is_local(other) and is_local(target) and _same_file(cother, ctarget)):
                raise InputError(f"OUT ({out}) would replace the input file {other}; "
                                 "choose another OUT")


def _sidecars_of(url) -> list:
    """The .bval/.bvec/.json beside a NIfTI (none for a store)."""
    from ..io.sidecars import sidecar_urls
    from ..io.urls import kind_of
    try:
        return list(sidecar_urls(url).values()) if kind_of(url) == "nifti" else []
    except InputError:
        return []


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
    path = canonical(out) + ".p2s-lock"
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
                raise InputError(f"another p2s-dask run is writing {out}; wait for it to "
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
