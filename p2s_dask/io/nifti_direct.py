"""Uncompressed ``.nii`` files read and written in place, chunk by chunk.

An uncompressed NIfTI allows random access, so a local ``.nii`` needs no
conversion to Zarr: each task reads (or writes) its own spatial block of all
volumes. A block of whole x-rows (whole xy-planes, or part of one plane) is
one contiguous run of the file per volume: it is read with one ``preadv``
per volume into a volume-major (Fortran-ordered) array, the file's own
layout, which the core uses as it is (no transposes). Writes go through
background threads per file, so the prediction never waits for the disk, and
mostly bypass the page cache (see :mod:`.direct_io`).
Tasks open the file themselves, so this works for workers that share the
machine's disk (a local cluster), not for remote workers.
"""

from __future__ import annotations

import os
import threading

import dask.array as da
import numpy as np

from ..errors import DataError, InputError
from ..core.layout import volume_columns
from .background import BackgroundWriter, WriterPool
from .direct_io import RunWriter, aligned_block, preallocate, start_writeback
from .meta import DwiMeta
from .nifti_stream import NiftiReader
from .urls import is_local, local_path


def is_plain_nifti(url) -> bool:
    """A local, uncompressed ``.nii`` file (by name and by content)."""
    if not is_local(url) or not str(url).endswith(".nii"):
        return False
    path = local_path(url)
    try:
        with open(path, "rb") as fh:
            return fh.read(2) != b"\x1f\x8b"
    except OSError:
        return False


def _mapped(path, meta: DwiMeta, mode):
    return np.memmap(path, dtype=meta.disk_dtype, mode=mode, offset=meta.data_offset,
                     shape=tuple(meta.shape), order="F")


def _volume_runs(meta: DwiMeta, region):
    """``(offset, nbytes)`` of each volume's part of ``region`` when that part
    is one contiguous run of the file, else None."""
    shape = tuple(meta.shape)
    region = tuple(region) + (slice(None),) * (4 - len(region))
    (x, y, z, v) = (s.indices(n) for s, n in zip(region, shape))
    full_x = (x[0], x[1]) == (0, shape[0])
    full_y = (y[0], y[1]) == (0, shape[1])
    one_z = z[1] - z[0] == 1
    if not (full_x and (full_y or one_z)):
        return None
    item = meta.disk_dtype.itemsize
    plane = shape[0] * shape[1]
    start = (z[0] * plane + y[0] * shape[0] + x[0]) * item
    nbytes = (x[1] - x[0]) * (y[1] - y[0]) * (z[1] - z[0]) * item
    volume = plane * shape[2] * item
    return [(meta.data_offset + k * volume + start, nbytes) for k in range(v[0], v[1])]


def _advise(fd, runs, advice):
    if hasattr(os, "posix_fadvise"):
        for offset, nbytes in runs:
            os.posix_fadvise(fd, offset, nbytes, advice)


# Blocks are announced to the kernel in aligned windows of this many blocks
# along z: Dask runs the blocks of one link of the statistics chain (or
# neighbouring writes) together but in no fixed order within it, so "the
# blocks around this one, and the next window" is the guess.
READ_WINDOW = 8
_ANNOUNCED: set = set()
_ANNOUNCED_LOCK = threading.Lock()


def _read_ahead(fd, path, meta: DwiMeta, region):
    """Ask the kernel to read this block's window and the next one in the
    background (each once), so that reads overlap the work on earlier blocks."""
    region = tuple(region) + (slice(None),) * (4 - len(region))
    z0, z1, _ = region[2].indices(meta.shape[2])
    depth = max(1, z1 - z0)
    span = READ_WINDOW * depth
    first = (z0 // depth) // READ_WINDOW * span
    for start in (first, first + span):
        if start >= meta.shape[2]:
            break
        key = (path, os.path.getmtime(path), str(region[:2]), start, depth)
        with _ANNOUNCED_LOCK:
            if key in _ANNOUNCED:
                continue
            if len(_ANNOUNCED) > 4096:
                _ANNOUNCED.clear()
            _ANNOUNCED.add(key)
        stop = min(meta.shape[2], start + span)
        window = region[:2] + (slice(start, stop),) + region[3:]
        # whole xy-planes: the window is one run per volume (one large read each)
        runs = _volume_runs(meta, window)
        if runs is None:
            runs = [run for z in range(start, stop, depth)
                    for run in _volume_runs(meta, region[:2] + (slice(z, z + depth),)
                                            + region[3:]) or []]
        _advise(fd, runs, getattr(os, "POSIX_FADV_WILLNEED", 3))


def _read_block(path, meta, region):
    """One block of all volumes, volume-major (Fortran order, as on disk).

    A block whose volumes are each one run of the file is read with one
    ``preadv`` per volume straight into the array, and the next block along
    z is announced to the kernel so that its reads overlap this block's work.
    """
    runs = _volume_runs(meta, region)
    if runs is None:
        source = _mapped(path, meta, "r")[region]
        return np.array(source, dtype=meta.raw_dtype, order="F")
    shape = tuple(len(range(*s.indices(n))) for s, n in zip(region, meta.shape))
    block = np.empty(shape, dtype=meta.disk_dtype, order="F")
    columns = block.reshape(-1, shape[3], order="F")
    fd = os.open(path, os.O_RDONLY)
    try:
        _read_ahead(fd, path, meta, region)
        for k, (offset, nbytes) in enumerate(runs):
            _read_exactly(fd, memoryview(columns[:, k]).cast("B"), offset, path)
    finally:
        os.close(fd)
    if block.dtype != meta.raw_dtype:
        block = block.astype(meta.raw_dtype, order="F")
    return block


def read_with_halo(path, meta: DwiMeta, region, radius) -> np.ndarray:
    """The values of ``region`` with a ``radius`` halo (zeros beyond the
    image), volume-major, read straight from a local ``.nii``.

    What Dask's overlap gives from the blocks of :func:`open_nifti`, without
    reading the neighbouring blocks whole and without its C-ordered
    assembly (a transposing copy of every block: measured about a tenth of
    a radius-1 prediction's time).
    """
    lo = [max(s.start - r, 0) for s, r in zip(region, radius)]
    hi = [min(s.stop + r, n) for s, r, n in zip(region, radius, meta.shape)]
    values = meta.apply_scaling(
        _read_block(path, meta, tuple(slice(a, b) for a, b in zip(lo, hi)) + (slice(None),)))
    if not any(radius):
        return values  # the region itself: no halo to place
    shape = tuple(s.stop - s.start + 2 * r for s, r in zip(region, radius))
    out = np.zeros(shape + (meta.shape[3],), dtype=values.dtype, order="F")
    at = tuple(slice(a - (s.start - r), b - (s.start - r))
               for a, b, s, r in zip(lo, hi, region, radius))
    out[at] = values
    return out


def _read_exactly(fd, buf, offset, path):
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got == 0:
            raise DataError(f"{path} is truncated (the data ends before the header's shape)")
        done += got


def read_meta(url) -> DwiMeta:
    """Header meta of a NIfTI file (no data read)."""
    reader = NiftiReader(url)
    try:
        return reader.meta
    finally:
        reader.close()


def open_nifti(url, chunks, meta: DwiMeta | None = None) -> tuple[da.Array, DwiMeta]:
    """A lazy dask array of the values of a local ``.nii``, and its meta.

    Parameters
    ----------
    url : str
        Local uncompressed ``.nii``.
    chunks : tuple of 3 ints
        Spatial chunk shape; every block holds all volumes.
    meta : DwiMeta, optional
        The file's header meta when the caller has read it already.

    Returns
    -------
    values : dask.array.Array
        Scaled like nibabel's ``get_fdata`` (float64) when the header has a
        slope or intercept, else the stored dtype.
    meta : DwiMeta
    """
    path = local_path(url)
    if meta is None:
        meta = read_meta(url)
    shape = tuple(meta.shape)
    spec = tuple(chunks)[:3] + (shape[3],)
    raw = da.map_blocks(
        _read_task, dtype=meta.raw_dtype, chunks=da.core.normalize_chunks(spec, shape),
        meta=np.empty((0, 0, 0, 0), meta.raw_dtype), path=path, nifti=meta,
        name=f"read-nii-{da.core.tokenize(path, os.path.getmtime(path), spec)}",
    )
    return meta.apply_scaling(raw), meta


def _read_task(block_info=None, path=None, nifti=None):
    loc = block_info[None]["array-location"]
    return _read_block(path, nifti, tuple(slice(a, b) for a, b in loc))


def create_nifti(path, meta: DwiMeta) -> None:
    """An uncompressed ``.nii`` of the meta's header, its data all zero.

    The data area is reserved (where the file system can) but not written,
    so creating it is instant, a full disk is reported before any work, and
    blocks may then be written in any order by :func:`write_block`.
    """
    hdr = meta.nifti_header()
    hdr["vox_offset"] = meta.data_offset
    with open(path, "wb") as fh:
        fh.write(bytes(hdr.binaryblock) + meta.extra)
        size = meta.data_offset + int(np.prod(meta.shape)) * meta.raw_dtype.itemsize
        fh.truncate(size)
        fh.flush()
        try:
            preallocate(fh.fileno(), meta.data_offset, size - meta.data_offset)
        except OSError:
            raise InputError(f"{path}: not enough free space for the output "
                             f"({size / 1e9:.2f} GB)") from None


def block_buffer(meta: DwiMeta, region, dtype) -> np.ndarray | None:
    """An empty block for ``region`` laid out so that :func:`write_block`
    writes it mostly with direct I/O (each volume's run congruent in memory
    to its place in the file); None when the region has no per-volume runs
    or ``dtype`` is not what the file stores."""
    runs = _volume_runs(meta, region)
    if runs is None or np.dtype(dtype) != meta.disk_dtype:
        return None
    shape = tuple(len(range(*s.indices(n))) for s, n in
                  zip(tuple(region) + (slice(None),) * (4 - len(region)), meta.shape))
    return aligned_block(shape, dtype, [offset for offset, _ in runs])


def write_block(path, meta: DwiMeta, region, values, writer: RunWriter) -> None:
    """Write one block of values into a file made by :func:`create_nifti`.

    ``writer`` (a :class:`RunWriter` of ``path``) sends each volume's run
    straight to the disk where aligned, else through the page cache. Either
    way the data survives a killed process once this returns;
    :func:`finish_writes` makes the whole file durable.
    """
    values = np.asarray(values)
    runs = _volume_runs(meta, region)
    if values.dtype != meta.disk_dtype:
        values = values.astype(meta.disk_dtype, order="F")
    columns = volume_columns(values) if values.ndim == 4 else None
    if runs is None or columns is None:
        target = _mapped(path, meta, "r+")[region]
        target[...] = values
        del target
        return
    for k, (offset, _) in enumerate(runs):
        writer.write(columns[:, k], offset)


class BlockWriter(BackgroundWriter):
    """Writes blocks into one file from background threads.

    Prediction tasks hand their block over and go on computing while the
    writers wait for the disk (see :class:`.background.BackgroundWriter`: a
    short queue, errors raised in the caller). Several threads keep several
    direct writes in flight; closing makes the file durable.

    Parameters
    ----------
    path : str
        A file made by :func:`create_nifti`.
    meta : DwiMeta
        Its header meta.
    depth, threads : int, optional
    """

    def __init__(self, path, meta: DwiMeta, depth: int = 2, threads: int = 4):
        self.path, self.meta = path, meta
        self.runs = None  # opened by the first block (errors go to close())
        self.lock = threading.Lock()
        super().__init__(depth, threads, name="p2s-block-writer")

    def submit(self, region, values, then=None) -> None:
        """Queue one block (waits while the queue is full); raises the
        error of an earlier write, if any."""
        super().submit((region, values), then)

    def write(self, region, values) -> None:
        writer = self._writer()
        write_block(self.path, self.meta, region, values, writer)
        start_writeback(writer.fd)

    def _writer(self) -> RunWriter:
        with self.lock:
            if self.runs is None:
                self.runs = RunWriter(self.path)
            return self.runs

    def finish(self, ok: bool) -> None:
        """Close the file, durable (fsync) unless a write failed."""
        if self.runs is not None:
            self.runs.close(sync=ok)


_WRITERS = WriterPool()


def submit_block(path, meta: DwiMeta, region, values, then=None) -> None:
    """Queue a block for this process's background writer of ``path``."""
    _WRITERS.get(path, lambda: BlockWriter(path, meta)).submit(region, values, then)


def finish_writes(path) -> bool:
    """Flush this process's writer of ``path`` (if any) and fsync the file.

    Run on every worker (``client.run``) once all tasks are done.
    """
    return _WRITERS.finish(path)
