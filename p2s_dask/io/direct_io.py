"""File writes that skip the page cache (``O_DIRECT``) wherever alignment allows.

A buffered write copies every byte into the page cache and leaves the kernel
to allocate, track and write back those pages; for a large output on a small
machine that costs as much CPU as a third of the prediction. A direct write
goes from our buffer to the device, but only for memory addresses, file
offsets and lengths that are multiples of the device's block. So a run is
written in three parts: its unaligned head and tail (under one block each)
through the page cache, its aligned middle directly. Buffers laid out by
:func:`aligned_block` make the middle of every run of a NIfTI block direct.

Where direct I/O is unavailable (another OS, a file system without it), or
refused at run time, everything goes through the page cache as before.
"""

from __future__ import annotations

import ctypes
import errno
import os

import numpy as np

from . import libc

# the largest logical block size in common use; a multiple of the others
ALIGN = 4096


def aligned_block(shape, dtype, offsets) -> np.ndarray | None:
    """An empty 4D array whose volume ``k`` starts at a memory address
    congruent to ``offsets[k]`` modulo :data:`ALIGN`.

    Parameters
    ----------
    shape : tuple of 4 ints
        ``(bx, by, bz, m)``; each volume is stored Fortran-ordered, as one run.
    dtype : numpy dtype
    offsets : sequence of m ints
        File offsets of the volumes' runs, evenly spaced (a NIfTI block's
        volume runs are one volume apart).

    Returns
    -------
    ndarray or None
        A strided view (volumes padded apart); None when the offsets are not
        evenly spaced or do not suit the dtype's alignment.
    """
    dtype = np.dtype(dtype)
    item = dtype.itemsize
    m = int(shape[3])
    offsets = [int(o) for o in offsets]
    if m == 0 or len(offsets) != m or ALIGN % item:
        return None
    step = offsets[1] - offsets[0] if m > 1 else 0
    if any(b - a != step for a, b in zip(offsets, offsets[1:])):
        return None
    run = int(np.prod(shape[:3])) * item
    # the smallest spacing >= one run that keeps every volume congruent
    stride = run + (step - run) % ALIGN
    raw = np.empty(stride * m + ALIGN, dtype=np.uint8)
    start = (offsets[0] - raw.ctypes.data) % ALIGN
    if start % item or stride % item:
        return None
    flat = raw[start:start + stride * m].view(dtype)
    bx, by = int(shape[0]), int(shape[1])
    return np.lib.stride_tricks.as_strided(
        flat, tuple(int(s) for s in shape), (item, item * bx, item * bx * by, stride))


def open_direct(path) -> int | None:
    """A write-only ``O_DIRECT`` descriptor of ``path``, or None where the
    platform or file system has no direct I/O."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def preallocate(fd: int, offset: int, length: int) -> bool:
    """Reserve the file's blocks for ``[offset, offset + length)``, without
    writing them (Linux ``fallocate``; False where unsupported).

    Direct writes into reserved blocks may run concurrently; into holes,
    ext4 serialises them under the file's lock, one device round trip at a
    time. A full disk shows up here, before any work (``OSError`` ENOSPC).
    """
    fallocate = _libc_fallocate()
    if fallocate is None or length <= 0:
        return False
    # glibc's fallocate (unlike posix_fallocate) never falls back to
    # writing zeros where the file system cannot reserve blocks
    if fallocate(fd, 0, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOSPC:
        raise OSError(err, os.strerror(err))
    return False


def start_writeback(fd: int) -> None:
    """Have the kernel start writing the file's dirty pages now, without
    waiting (Linux ``sync_file_range``; nothing elsewhere).

    Only the unaligned heads and tails of runs go through the page cache:
    small pages scattered over the whole file. Left to the kernel they are
    all written at the final ``fsync``, one small write each, while the run
    waits; started as they come, they are written while it computes.
    """
    fn = libc.function("sync_file_range", (ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                           ctypes.c_uint))
    if fn is not None:
        fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2


def _libc_fallocate():
    return libc.function("fallocate", (ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                       ctypes.c_int64))


class RunWriter:
    """Writes byte runs at given offsets of one file, ``O_DIRECT`` for the
    aligned middle of each run where the file system allows.

    Parameters
    ----------
    path : str
        An existing file, opened for writing (not truncated).
    """

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY)
        self.direct_fd = open_direct(path)
        # cleared (never reopened) if the kernel refuses a direct write;
        # the descriptor itself stays open until close(): other threads may
        # be using it
        self.direct = self.direct_fd is not None

    def write(self, data: np.ndarray, offset: int) -> None:
        """Write the bytes of a contiguous array at ``offset``."""
        view = memoryview(data).cast("B")
        n = len(view)
        head = (-offset) % ALIGN
        middle = (n - head) // ALIGN * ALIGN if n > head else 0
        if not self.direct or not middle or (data.ctypes.data - offset) % ALIGN:
            _write_all(self.fd, view, offset)
            return
        _write_all(self.fd, view[:head], offset)
        done = self._write_direct(view[head:head + middle], offset + head)
        _write_all(self.fd, view[head + done:], offset + head + done)

    def _write_direct(self, view, offset) -> int:
        """Bytes written directly (all, unless the kernel refuses part)."""
        done = 0
        while done < len(view):
            try:
                got = os.pwrite(self.direct_fd, view[done:], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # alignment rules stricter than ours: page cache from now on
                self.direct = False
                return done
            if got % ALIGN:
                # a short direct write leaves an unaligned remainder
                return done + got
            done += got
        return done

    def close(self, sync: bool = True) -> None:
        """Close the file; with ``sync``, make all written data durable first."""
        try:
            if sync:
                os.fsync(self.fd)
        finally:
            if self.direct_fd is not None:
                os.close(self.direct_fd)
            os.close(self.fd)


def _write_all(fd, view, offset) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
