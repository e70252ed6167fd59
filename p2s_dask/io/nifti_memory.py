"""A NIfTI that must be read (or written) from start to end, held in memory.

A ``.nii.gz`` (or a ``.nii`` in an object store) can only be read in order.
When it fits the budget, reading it once into a volume-major array (the
file's own layout) and cutting blocks from that array costs the gunzip and
nothing more; staging it into a Zarr store costs writing and reading every
block again. Blocks are Fortran-ordered copies, as :mod:`.nifti_direct`
reads them from a ``.nii``: the core then takes the same code path and
gives the same bits for a ``.nii`` and a ``.nii.gz`` of the same data.
Only for tasks in this process (threads): a worker process cannot see the
array.
"""

from __future__ import annotations

import uuid

import dask.array as da
import numpy as np
from dask.array.core import normalize_chunks, slices_from_chunks

from .meta import DwiMeta
from .nifti_stream import NiftiReader, NiftiWriter

# bytes per write of an in-memory image: long enough for the gzip writer's
# threads, short enough to show progress
WRITE_BYTES = 64 << 20


def read_whole(url, meta: DwiMeta, storage_options=None) -> np.ndarray:
    """All values of a NIfTI file, volume-major (Fortran order), as stored.

    Parameters
    ----------
    url : str
        ``.nii`` or ``.nii.gz``, local or any fsspec URL.
    meta : DwiMeta
        The file's meta (its shape and dtype).
    storage_options : dict, optional

    Returns
    -------
    ndarray (x, y, z, n)
        ``meta.raw_dtype``, unscaled.
    """
    with NiftiReader(url, storage_options) as reader:
        values = reader.read_slab(tuple(meta.shape))
    if values.dtype != meta.raw_dtype:
        values = values.astype(meta.raw_dtype, order="F")
    return values


def _block(values, region):
    return np.require(values[region], requirements="F")


def as_blocks(values: np.ndarray, chunks, meta: DwiMeta) -> da.Array:
    """A dask array over ``values`` (from :func:`read_whole`) whose blocks are
    Fortran-ordered copies of ``chunks`` (spatial) by all volumes, scaled as
    :func:`.nifti_direct.open_nifti` scales them."""
    spec = normalize_chunks(tuple(chunks)[:3] + (values.shape[3],), values.shape)
    name = f"p2s-memory-{uuid.uuid4().hex}"
    # a plain graph: no hashing of the array (from_array would tokenize it)
    dsk = {(name,) + idx: (_block, values, slc) for idx, slc in
           zip(np.ndindex(*[len(c) for c in spec]), slices_from_chunks(spec))}
    raw = da.Array(dsk, name, spec, dtype=values.dtype,
                   meta=np.empty((0, 0, 0, 0), values.dtype))
    return meta.apply_scaling(raw)


def write_whole(url, meta: DwiMeta, values: np.ndarray, storage_options=None) -> None:
    """Write an in-memory image (Fortran order, ``meta``'s raw dtype) to
    ``url`` under a temporary name, renamed into place at the end
    (replacing what is there: the caller has checked it may)."""
    flat = values.reshape(-1, order="F")  # a view of a Fortran-ordered array
    step = max(1, WRITE_BYTES // max(1, flat.itemsize))
    with NiftiWriter(url, meta, overwrite=True, storage_options=storage_options) as writer:
        for start in range(0, flat.size, step):
            piece = flat[start:start + step]
            if piece.dtype != meta.disk_dtype:
                piece = piece.astype(meta.disk_dtype)
            writer.write(piece)
        writer.commit()
