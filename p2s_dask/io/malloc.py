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
import functools

from . import libc

__all__ = ["one_heap", "return_freed_memory", "reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 64 << 10


def _mallopt(param: int, value: int) -> bool:
    fn = libc.function("mallopt", (ctypes.c_int, ctypes.c_int))
    return bool(fn is not None and fn(param, value))


@functools.lru_cache(maxsize=None)
def return_freed_memory() -> bool:
    """Tune glibc once so that freed memory is returned to the OS promptly.

    Returns
    -------
    bool
        Whether the setting could be applied (False on non-glibc systems).
    """
    return _mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


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
    size = int(max(largest, 1 << 20)) * 2
    return (_mallopt(_M_MMAP_THRESHOLD, min(size, 1 << 30))
            and _mallopt(_M_TRIM_THRESHOLD, min(4 * size, (1 << 31) - 1)))


@functools.lru_cache(maxsize=None)
def one_heap() -> bool:
    """One glibc heap for every thread of this process.

    glibc gives threads heaps of their own (up to eight per core), and a
    block freed in one heap is never reused by another: with eight task
    threads under a 64 MiB budget the process rose 90-140 MiB above its
    baseline instead of the planned 40 (measured, 96x96x64x64 Zarr input,
    ``dask.system.CPU_COUNT`` set to 8; with one heap: 57 MiB). One heap
    holds the peak of all threads together, which is what the budget plans;
    its lock is taken only around malloc and free (no slower at 2 or 8
    threads, measured).

    glibc fixes its heap limit when a second heap is first made, so this
    works only before any other thread allocates: the command line calls it
    first thing; a library function cannot (the caller's threads may have).

    Returns
    -------
    bool
        Whether the setting could be applied (False on non-glibc systems).
    """
    return _mallopt(_M_ARENA_MAX, 1)


def trim() -> None:
    """Give free heap memory back to the OS now (no-op outside glibc)."""
    fn = libc.function("malloc_trim", (ctypes.c_size_t,))
    if fn is not None:
        fn(0)
