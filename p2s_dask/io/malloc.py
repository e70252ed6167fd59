"""Make freed memory go back to the operating system (glibc only).

glibc raises its mmap threshold after large buffers are freed, so later
buffers of a few MB come from the heap, where fragmentation keeps them: a
streaming conversion that holds 200 MB then shows 400 MB resident. Setting
the trim threshold (as dask's distributed does for its workers with
``MALLOC_TRIM_THRESHOLD_``) turns that adaptation off and trims the heap
eagerly. It is process-wide and only costs some page faults on large
allocations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["return_freed_memory"]

_M_TRIM_THRESHOLD = -1
_TRIM_THRESHOLD = 64 << 10


@functools.lru_cache(maxsize=None)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


@functools.lru_cache(maxsize=None)
def return_freed_memory() -> bool:
    """Tune glibc once so that freed memory is returned to the OS promptly.

    Returns
    -------
    bool
        Whether the setting could be applied (False on non-glibc systems).
    """
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def trim() -> None:
    """Give free heap memory back to the OS now (no-op outside glibc)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
