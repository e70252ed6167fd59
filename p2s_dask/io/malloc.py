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

__all__ = ["return_freed_memory", "reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
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


def reuse_freed_memory(largest: int) -> bool:
    """Let glibc reuse freed buffers of up to ``largest`` bytes.

    The opposite trade-off to :func:`return_freed_memory`, for runs that
    allocate and free the same few large blocks over and over (every block
    read and every prediction is tens of MB): above 32 MB glibc maps fresh
    pages for each one, and the kernel then faults in and zeroes every page
    again (gigabytes per pass). Raising the mmap and trim thresholds keeps
    freed blocks for the next ones; the process stays at its high-water
    mark, which the memory budget bounds anyway.
    """
    libc = _libc()
    if libc is None:
        return False
    size = int(max(largest, 1 << 20)) * 2
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, min(size, 1 << 30))
                and libc.mallopt(_M_TRIM_THRESHOLD, min(4 * size, (1 << 31) - 1)))


def trim() -> None:
    """Give free heap memory back to the OS now (no-op outside glibc)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
