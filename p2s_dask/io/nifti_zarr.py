"""NIfTI <-> Zarr conversion, streaming, within a memory limit.

A NIfTI holds its data volume after volume; a shard of our stores holds all
volumes of a spatial block, one inner chunk per volume. Both directions
stream the NIfTI sequentially in slabs of k volumes. Into a local store, each
volume's inner chunks are appended to their shards as they come (the index
last); out of a store, each slab reads its volumes' byte range of every
shard. Other stores (an object store, another layout) go through a local
scratch file laid out block by block (see :mod:`.scratch`), so every object
is written or read once; when all data fits in one slab, or (for writing a
NIfTI) reading each chunk at most twice is enough, it is skipped.
"""

from __future__ import annotations

import itertools
import logging
import os
import posixpath
import sys

import numpy as np
from tqdm.auto import tqdm

from ..errors import InputError
from .background import run_pipelined
from .budget import DEFAULT_MEMORY_LIMIT, parse_memory_limit, plan, store_itemsize
from .fsl import fsl_siblings, read_bvals, read_bvecs
from .axis_order import to_f_order
from .malloc import return_freed_memory, trim
from .meta import DwiMeta
from .nifti_stream import NiftiReader, NiftiWriter
from .scratch import BlockScratch, for_each_block
from .sidecars import read_json_sidecar
from .urls import exists, is_local, kind_of, local_path, user_errors
from .chunk_io import ShardAppender, read_volumes, reads_volumes, require_all_chunks
from .zarr_store import (
    OutputExistsError,
    compressor_for,
    create_dwi_store,
    discard,
    mark_complete,
    open_image,
    is_unfinished,
    write_region,
    zarr_concurrency,
)

__all__ = ["nifti_to_zarr", "zarr_to_nifti"]

logger = logging.getLogger("p2s_dask")

# writing a NIfTI straight from the store decodes every chunk once per pass;
# a second decode costs about what the scratch file's write, read and
# reassembly cost, and needs no disk space, so up to two passes go direct
_MAX_DIRECT_PASSES = 2


def _name(url) -> str:
    return posixpath.basename(os.fspath(url).rstrip("/"))


def _bar(progress, total, desc):
    """A byte progress bar on stderr, on a terminal only: off a terminal (a
    SLURM log) its carriage-return updates would fill the log, and the run's
    stages are reported one line each instead."""
    on_terminal = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not (progress and on_terminal), dynamic_ncols=True, file=sys.stderr)


def _concurrency(slab_bytes, chunk_bytes):
    """Chunks a slab read/write may hold at once: their copies fit in a slab."""
    return max(1, min(8, slab_bytes // max(1, chunk_bytes)))


def _gradient_table(src, bvals, bvecs, storage_options):
    """bvals/bvecs given as arrays or files, else the FSL files next to ``src``."""
    if bvals is None or bvecs is None:
        bval_url, bvec_url = fsl_siblings(src, storage_options)
        bvals = bval_url if bvals is None else bvals
        bvecs = bvec_url if bvecs is None else bvecs
    if isinstance(bvals, (str, os.PathLike)):
        bvals = read_bvals(bvals, storage_options)
    if isinstance(bvecs, (str, os.PathLike)):
        bvecs = read_bvecs(bvecs, storage_options)
    return bvals, bvecs


def _check_kinds(src, want_src, dst, want_dst):
    for url, want, role in ((src, want_src, "source"), (dst, want_dst, "destination")):
        if kind_of(url) != want:
            expected = ".nii or .nii.gz file" if want == "nifti" else ".zarr store"
            raise InputError(f"{os.fspath(url)}: the {role} must be a {expected}")


def nifti_to_zarr(src, dst, *, chunks=None, memory_limit=DEFAULT_MEMORY_LIMIT, bvals=None,
                  bvecs=None, overwrite=False, storage_options=None, tmp_dir=None,
                  progress=True) -> DwiMeta:
    """Convert a NIfTI DWI to a NIfTI-Zarr store, reading the file once.

    Parameters
    ----------
    src : str or os.PathLike
        ``.nii`` or ``.nii.gz``, local or fsspec URL (e.g. ``s3://``).
    dst : str or os.PathLike
        The new ``.zarr`` store, local or fsspec URL. It is marked complete
        only at the end, once every chunk is verified to exist, and removed
        if the conversion fails.
    chunks : sequence of 3 ints, optional
        Spatial chunk shape; each chunk holds all volumes. Default: near-cubic
        blocks of about 32 MiB (less for small ``memory_limit``).
    memory_limit : int or str, optional
        Bytes (or e.g. ``"512 MiB"``) the conversion may hold; default 2 GiB.
    bvals, bvecs : array-like or str, optional
        Arrays or FSL text files. By default the ``.bval``/``.bvec`` files
        next to ``src`` if they exist, else none are stored.
    overwrite : bool, optional
        Replace an existing ``dst``; otherwise refuse.
    storage_options : dict, optional
        fsspec options for every URL involved (credentials, endpoint, ...).
    tmp_dir : str, optional
        Local folder for the scratch file, which takes the uncompressed size
        of the data (created if missing); default the system's temporary
        folder, which is also used for a ``tmp_dir`` that is not local.
    progress : bool, optional
        Show progress bars.

    Returns
    -------
    DwiMeta
        What was stored.

    Raises
    ------
    OutputExistsError
        If ``dst`` exists and ``overwrite`` is false.
    InputError
        For bad input and for storage errors (one line: e.g. "writing
        DST: No space left on device").
    """
    _check_kinds(src, "nifti", dst, "zarr")
    limit = parse_memory_limit(memory_limit)
    return_freed_memory()
    overwrite = overwrite or _unfinished(dst, storage_options)
    if not overwrite and exists(dst, storage_options):
        raise OutputExistsError(f"{os.fspath(dst)} already exists")
    with NiftiReader(src, storage_options) as reader:
        meta = reader.meta.with_gradients(*_gradient_table(src, bvals, bvecs, storage_options))
        # the BIDS sidecar's fields travel in the store's attributes
        meta = meta.with_sidecar(read_json_sidecar(src, storage_options))
        # the chunk policy counts values as denoising holds a store's blocks
        # (float data as stored, else float64: pipeline.working_itemsize), so
        # denoise reads these chunks as they are
        the_plan = plan(meta.shape, meta.raw_dtype.itemsize, limit, chunks,
                        chunk_itemsize=store_itemsize(meta.raw_dtype, meta.scaled))
        # the first slab decides whether the data is worth compressing
        slabs = _nifti_slabs(reader, the_plan)
        first = next(slabs)
        slabs = itertools.chain([first], slabs)
        store = create_dwi_store(dst, meta.shape, meta.raw_dtype, the_plan.chunks, meta,
                                 overwrite=overwrite, storage_options=storage_options,
                                 compressor=compressor_for(first[1], meta.raw_dtype))
        del first
        try:
            total = reader.data_bytes
            if the_plan.single_slab:
                with _bar(progress, total, f"read {_name(src)}") as bar:
                    _nifti_into_store(slabs, store, dst, the_plan, bar)
            elif is_local(dst):
                with _bar(progress, total, f"read {_name(src)}") as bar:
                    _nifti_into_shards(slabs, store, dst, bar)
            else:
                with BlockScratch(meta.shape, the_plan.chunks, meta.raw_dtype,
                                  tmp_dir) as scratch:
                    with _bar(progress, total, f"read {_name(src)}") as bar:
                        _nifti_into_scratch(slabs, scratch, bar)
                    with _bar(progress, total, f"write {_name(dst)}") as bar:
                        _scratch_into_store(scratch, store, dst, the_plan, bar)
            mark_complete(dst, storage_options)
        except BaseException:
            # the store is ours and unusable; nothing of the user's is lost
            discard(dst, storage_options)
            raise
        finally:
            trim()
    return meta


def _unfinished(dst, storage_options) -> bool:
    """``dst`` is a store of ours whose writing never finished (a killed
    conversion): no one's data, so the same command redoes it."""
    if kind_of(dst) != "zarr" or not exists(dst, storage_options) \
            or not is_unfinished(dst, storage_options):
        return False
    logger.warning("%s: an unfinished conversion (killed?) is redone", os.fspath(dst))
    return True


def _runs(the_plan):
    """The volume runs ``(v0, v1)`` of the plan's slabs."""
    return sorted({(v0, v1) for v0, v1, _, _ in the_plan.slabs()})


def _nifti_slabs(reader, the_plan):
    """``((v0, z0), slab)`` in file order; the slab is Fortran ordered, as read."""
    x, y = reader.meta.shape[:2]
    for v0, v1, z0, z1 in the_plan.slabs():
        yield (v0, z0), reader.read_slab((x, y, z1 - z0, v1 - v0))


def _nifti_into_store(slabs, store, url, the_plan, bar):
    """All the data as one slab, straight into the store's chunks."""

    def write(item):
        _, slab = item
        # a NIfTI slab is in the store's order already (volume after volume)
        write_region(store, ..., np.asfortranarray(slab, store.dtype), url)
        bar.update(slab.nbytes)

    with zarr_concurrency(_concurrency(the_plan.slab_bytes, the_plan.chunk_bytes)):
        run_pipelined(slabs, write)


def _nifti_into_shards(slabs, store, url, bar):
    """Each slab's volumes appended to the shards of a local store."""
    appender = ShardAppender(store, os.fspath(url))

    def write(item):
        (v0, z0), slab = item
        appender.append(slab, v0, z0)
        bar.update(slab.nbytes)

    try:
        # gunzip in one thread while this one encodes and appends
        run_pipelined(slabs, write)
        appender.finish()
    except BaseException:
        appender.abort()
        raise


def _nifti_into_scratch(slabs, scratch, bar):
    """Stream the NIfTI's slabs into the scratch file's pieces."""

    def write(item):
        (v0, z0), slab = item
        # cut into pieces here, not in the reading thread, which gunzip keeps busy
        scratch.write_slab(slab, v0, z0)
        bar.update(slab.nbytes)

    # gunzip in one thread while the other cuts and writes pieces
    run_pipelined(slabs, write)


def _scratch_into_store(scratch, store, url, the_plan, bar):
    """Each block's volumes from the scratch file into its store chunk."""
    runs = _runs(the_plan)

    def copy(b, block):
        data = scratch.read_block(b, runs)
        write_region(store, block, data, url)
        return data.nbytes

    with zarr_concurrency(1):  # one chunk per block
        for_each_block(scratch.blocks, copy, workers=the_plan.workers, progress=bar)


def _store_into_scratch(store, url, scratch, the_plan, bar):
    """Each store chunk into the scratch file's pieces."""
    runs = _runs(the_plan)

    def copy(b, block):
        with user_errors(url, "reading"):
            data = store[block]
        scratch.write_block(b, data, runs)
        return data.nbytes

    with zarr_concurrency(1):
        for_each_block(scratch.blocks, copy, workers=the_plan.workers, progress=bar)


def zarr_to_nifti(src, dst, *, memory_limit=DEFAULT_MEMORY_LIMIT, overwrite=False,
                  storage_options=None, tmp_dir=None, progress=True, compresslevel=1):
    """Write a DWI store back to a NIfTI file, with its stored header.

    The file gets the stored header and extensions unchanged (dtype, scaling,
    affine, qform/sform codes, pixdim), so a NIfTI -> Zarr -> NIfTI round trip
    gives the same voxel data and header.

    Another tool's OME-Zarr / NIfTI-Zarr image is written with its
    ``nifti`` header if it has one, else with an affine from its OME scale
    and translation; its values are read as ``denoise`` reads them.

    Parameters
    ----------
    src : str or os.PathLike
        A complete ``.zarr`` DWI store, or another tool's 4D image (OME-Zarr
        0.4, 0.5 or 0.6, Zarr v2 or v3), local or fsspec URL.
    dst : str or os.PathLike
        ``.nii`` or ``.nii.gz`` (gzip), local or fsspec URL. Written under a
        temporary name next to it and renamed when complete.
    memory_limit : int or str, optional
        Bytes the conversion may hold; default 2 GiB.
    overwrite : bool, optional
        Replace an existing ``dst``; otherwise refuse.
    storage_options : dict, optional
        fsspec options for every URL involved.
    tmp_dir : str, optional
        Local folder for a scratch file (the uncompressed size of the data),
        when one is needed (created if missing); default the system's
        temporary folder, which is also used for a ``tmp_dir`` that is not
        local.
    progress : bool, optional
        Show progress bars.
    compresslevel : int, optional
        gzip level for ``.nii.gz``; 1 as nibabel.
    """
    _check_kinds(src, "zarr", dst, "nifti")
    limit = parse_memory_limit(memory_limit)
    return_freed_memory()
    if not overwrite and exists(dst, storage_options):
        raise OutputExistsError(f"{os.fspath(dst)} already exists")
    if is_local(dst) and not os.path.isdir(os.path.dirname(local_path(dst))):
        raise InputError(f"writing {os.fspath(dst)}: the folder does not exist")
    store, meta = _open_source(src, storage_options)
    the_plan = _source_plan(store, meta, limit)
    passes = _decodes_per_chunk(the_plan, store.chunks)
    total = int(np.prod(meta.shape)) * meta.raw_dtype.itemsize
    with NiftiWriter(dst, meta, overwrite=overwrite, storage_options=storage_options,
                     compresslevel=compresslevel) as writer:
        if reads_volumes(store):
            # a shard holds its volumes one after the other: each slab reads
            # only its own bytes of every shard, so no pass is wasted
            with _bar(progress, total, f"write {_name(dst)}") as bar:
                _slabs_into(_volume_reader(store, src, the_plan), writer, meta, the_plan, bar)
        elif passes <= _MAX_DIRECT_PASSES:
            with _bar(progress, total, f"write {_name(dst)}") as bar:
                _slabs_into(_store_reader(store, src), writer, meta, the_plan, bar)
        else:
            with BlockScratch(meta.shape, the_plan.chunks, meta.raw_dtype, tmp_dir) as scratch:
                with _bar(progress, total, f"read {_name(src)}") as bar:
                    _store_into_scratch(store, src, scratch, the_plan, bar)
                with _bar(progress, total, f"write {_name(dst)}") as bar:
                    _slabs_into(scratch.read_slab, writer, meta, the_plan, bar)
        writer.commit()
    trim()


def _open_source(src, storage_options):
    """The store's array and meta (ours, or another tool's image). A store
    that Zarr will read (not :func:`.chunk_io.read_volumes`) is checked for
    missing chunks first: Zarr would take one for the fill value, where the
    rule may say damage (in a store we completed)."""
    store, meta = open_image(src, storage_options)
    if not reads_volumes(store):
        require_all_chunks(store, os.fspath(src))
    return store, meta


def _source_plan(store, meta, limit):
    """The plan on the store's own spatial chunks. Another tool's chunks
    may be too large for the plan's blocks of all volumes (one chunk per
    volume of a whole image): then on the chunk policy's blocks, which Zarr
    reads across the stored chunks."""
    itemsize = meta.raw_dtype.itemsize
    try:
        return plan(meta.shape, itemsize, limit, store.chunks[:3])
    except InputError:
        if store.chunks[3] == meta.shape[3]:
            raise  # its chunks hold all volumes, as the plan's blocks do
        return plan(meta.shape, itemsize, limit)


def _decodes_per_chunk(the_plan, chunks) -> int:
    """How many slabs read the most-read stored chunk: the times writing
    straight from the store decodes it (slabs are runs of volumes times runs
    of z-planes; a chunk spans ``chunks[3]`` volumes and ``chunks[2]`` planes)."""
    z, n = the_plan.shape[2:]

    def most(size, step, extent):
        return max((min(a + extent, size) - 1) // step - a // step + 1
                   for a in range(0, size, extent))

    return (most(n, the_plan.volumes_per_slab, chunks[3])
            * most(z, the_plan.planes_per_slab, chunks[2]))


def _volume_reader(store, url, the_plan):
    def read(v0, v1, z0, z1):
        return read_volumes(store, v0, v1, z0, z1, os.fspath(url), workers=the_plan.workers)
    return read


def _store_reader(store, url):
    def read(v0, v1, z0, z1):
        with user_errors(url, "reading"):
            return store[:, :, z0:z1, v0:v1]
    return read


def _slabs_into(read, writer, meta, the_plan, bar):
    """Write slabs from ``read(v0, v1, z0, z1)`` to the NIfTI in file order."""
    disk = meta.disk_dtype

    def slabs():
        for v0, v1, z0, z1 in the_plan.slabs():
            # Fortran order and the file's byte order, made here in the
            # reading thread so the writing thread only compresses
            slab = read(v0, v1, z0, z1)
            if not (slab.flags.f_contiguous and slab.dtype == disk):
                slab = to_f_order(slab, disk)
            yield slab

    def write(slab):
        writer.write(slab.T)  # the transpose of a Fortran array is C-contiguous
        bar.update(slab.nbytes)

    with zarr_concurrency(_concurrency(the_plan.slab_bytes, the_plan.chunk_bytes)):
        run_pipelined(slabs(), write)
