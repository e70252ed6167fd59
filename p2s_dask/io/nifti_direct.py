"""Uncompressed ``.nii`` files read and written in place, chunk by chunk.

An uncompressed NIfTI allows random access, so a local ``.nii`` needs no
conversion to Zarr: each task maps the file and reads (or writes) its own
spatial block of all volumes. A block that spans whole x-rows of a range of
y is, per volume and z-plane, one contiguous run in the file, so the reads
stay sequential enough for the disk. Tasks open the file themselves, so
this works for workers that share the machine's disk (a local cluster), not
for remote workers.
"""

from __future__ import annotations

import os

import dask.array as da
import numpy as np

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


# volumes moved per step between the file's volume-major order and the
# engine's volume-last order: a few volumes at a time keep both sides in cache
# (2-3x faster than one whole-block transpose)
_VOLUME_STEP = 8


def _read_block(path, meta, region):
    source = _mapped(path, meta, "r")[region]
    block = np.empty(source.shape, dtype=meta.raw_dtype)
    for v0 in range(0, source.shape[3], _VOLUME_STEP):
        block[..., v0:v0 + _VOLUME_STEP] = source[..., v0:v0 + _VOLUME_STEP]
    return block


def read_meta(url) -> DwiMeta:
    """Header meta of a NIfTI file (no data read)."""
    reader = NiftiReader(url)
    try:
        return reader.meta
    finally:
        reader.close()


def open_nifti(url, chunks) -> tuple[da.Array, DwiMeta]:
    """A lazy dask array of the values of a local ``.nii``, and its meta.

    Parameters
    ----------
    url : str
        Local uncompressed ``.nii``.
    chunks : tuple of 3 ints
        Spatial chunk shape; every block holds all volumes.

    Returns
    -------
    values : dask.array.Array
        Scaled like nibabel's ``get_fdata`` (float64) when the header has a
        slope or intercept, else the stored dtype.
    meta : DwiMeta
    """
    path = local_path(url)
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

    The data area is allocated sparsely (truncate), so creating it is instant
    and blocks may then be written in any order by :func:`write_block`.
    """
    hdr = meta.nifti_header()
    hdr["vox_offset"] = meta.data_offset
    with open(path, "wb") as fh:
        fh.write(bytes(hdr.binaryblock) + meta.extra)
        size = meta.data_offset + int(np.prod(meta.shape)) * meta.raw_dtype.itemsize
        fh.truncate(size)


def write_block(path, meta: DwiMeta, region, values) -> None:
    """Write one block of values into a file made by :func:`create_nifti`."""
    target = _mapped(path, meta, "r+")[region]
    for v0 in range(0, target.shape[3], _VOLUME_STEP):
        target[..., v0:v0 + _VOLUME_STEP] = values[..., v0:v0 + _VOLUME_STEP]
    target.flush()  # on disk before the caller marks the block done
    del target
