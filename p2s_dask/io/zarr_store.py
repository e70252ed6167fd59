"""Our Zarr v3 layout for one DWI dataset.

A Zarr group holding:

* array ``dwi``, shape (x, y, z, n), the raw values in the NIfTI's on-disk
  type (native byte order), chunked (cx, cy, cz, n): every chunk holds all
  volumes of a spatial block, which is what Patch2Self reads together.
  Compressed with Blosc LZ4 + byte shuffle: on noisy int16 and float32 DWI
  data it encodes at over 1 GB/s and decodes faster, with a better ratio
  than plain zstd level 1 (which encodes 3-5 times slower). No sharding, so
  chunk-aligned writes from many tasks never touch the same object.
* group attributes under ``"p2s_dask"``: format name and version, the NIfTI
  header and extension bytes (base64), affine, shape, raw dtype, scl_slope,
  scl_inter, bvals, bvecs (lists or null) and ``complete``, which becomes
  true only after every chunk of ``dwi`` is known to be in the store
  (:func:`mark_complete` lists them first).

Chunks equal to the fill value are written too (Zarr's
``write_empty_chunks``, off by default, is switched on for every array this
module hands out). Otherwise an all-zero chunk (a masked or empty region)
would be indistinguishable from one lost to a failed or interrupted write,
and "every chunk exists" could not tell a complete store from a broken one.
The price is small: an all-zero chunk compresses to a few hundred bytes.

Reading and writing chunks: for arrays in this layout (one regular chunk
grid, raw bytes in native order, Blosc or nothing) a chunk is one object,
read by :func:`read_chunks` (one Dask task per chunk, each decoding straight
into the block it returns) and written by :func:`write_region` and
:func:`submit_region` (encoded in the caller's thread, stored with direct
I/O where the file system allows, optionally from background threads),
without Zarr's event loop. The bytes are exactly those Zarr reads and
writes; arrays with other codecs go through Zarr.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import numcodecs.blosc
import zarr
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from ..errors import InputError, OutputExistsError
from .budget import normalize_chunks
from .direct_io import ALIGN, RunWriter
from .layout import to_c_order
from .meta import DwiMeta
from .scratch import for_each_block
from .urls import exists, fs_and_path, is_local, local_path, remove, user_errors

__all__ = [
    "ARRAY_NAME",
    "ATTRS_KEY",
    "FORMAT_VERSION",
    "DwiMeta",
    "OutputExistsError",
    "create_dwi_store",
    "discard",
    "finish_region_writes",
    "is_complete",
    "mark_complete",
    "open_dwi",
    "open_dwi_array",
    "read_chunks",
    "store_state",
    "submit_region",
    "verify_all_chunks",
    "write_dwi",
    "write_region",
    "zarr_concurrency",
]

ATTRS_KEY = "p2s_dask"
ARRAY_NAME = "dwi"
FORMAT_NAME = "p2s-dask-dwi"
FORMAT_VERSION = 1
DIMENSION_NAMES = ("x", "y", "z", "volume")
# see the module docstring: a chunk's presence must mean it was written
ARRAY_CONFIG = {"write_empty_chunks": True}


@contextlib.contextmanager
def zarr_concurrency(n: int):
    """Let one Zarr read or write work on at most ``n`` chunks at a time.

    Each chunk in flight holds a decoded copy; Zarr's default (10) would
    multiply the memory that reading or writing large chunks needs.
    """
    with zarr.config.set({"async.concurrency": max(1, int(n))}):
        yield


def default_compressor() -> BloscCodec:
    """The codec for DWI chunks (see the module docstring for why)."""
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


def zarr_store(url, storage_options=None, read_only=False):
    """A Zarr store for a local path (LocalStore) or fsspec URL (FsspecStore).

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional
        Passed to fsspec for URLs.
    read_only : bool, optional

    Returns
    -------
    zarr.abc.store.Store
    """
    url = os.fspath(url)
    if is_local(url):
        return LocalStore(local_path(url), read_only=read_only)
    with user_errors(url):
        return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)


def _require_absent_or_remove(url, overwrite, storage_options):
    fs, path = fs_and_path(url, storage_options)
    with user_errors(url, "writing"):
        if not fs.exists(path):
            return
        if not overwrite:
            raise OutputExistsError(f"{os.fspath(url)} already exists")
        fs.rm(path, recursive=True)


def _require_present(url, storage_options):
    """InputError naming the missing piece (file, or bucket) if ``url`` is absent."""
    fs, path = fs_and_path(url, storage_options)
    with user_errors(url, "reading"):
        if fs.exists(path):
            return
        if not is_local(url):
            bucket = path.split("/", 1)[0]
            if bucket and not fs.exists(bucket):
                raise InputError(f"reading {os.fspath(url)}: the bucket does not exist")
        raise FileNotFoundError(path)


def create_dwi_store(url, shape, dtype, chunks, meta: DwiMeta, *, overwrite=False,
                     storage_options=None, compressor=None):
    """Create an empty DWI store (marked incomplete) and return its array.

    Parameters
    ----------
    url : str or os.PathLike
        Local path or fsspec URL of the new store.
    shape : tuple of 4 ints
    dtype : numpy dtype
        Stored as is (native byte order).
    chunks : sequence of 3 ints (or 4, the last being the volume count)
        Spatial chunk shape; every chunk holds all volumes.
    meta : DwiMeta
        Written to the group attributes; its shape and raw dtype must match.
    overwrite : bool, optional
        Replace an existing store (or file) at ``url``; otherwise refuse.
    storage_options : dict, optional
    compressor : zarr codec, optional
        Default :func:`default_compressor`.

    Returns
    -------
    zarr.Array
        Writes through it store all-zero chunks too (see the module docstring).

    Raises
    ------
    OutputExistsError
        If ``url`` exists and ``overwrite`` is false.
    """
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype).newbyteorder("=")
    if tuple(meta.shape) != shape or meta.raw_dtype != dtype:
        raise ValueError(f"meta describes {meta.shape} {meta.raw_dtype}, not {shape} {dtype}")
    chunks = (*normalize_chunks(chunks, shape), shape[3])
    _require_absent_or_remove(url, overwrite, storage_options)
    attrs = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta.to_json(),
             "complete": False}
    try:
        with user_errors(url, "writing"):
            group = zarr.create_group(zarr_store(url, storage_options), zarr_format=3,
                                      attributes={ATTRS_KEY: attrs})
            return group.create_array(
                ARRAY_NAME, shape=shape, dtype=dtype, chunks=chunks,
                compressors=compressor or default_compressor(), fill_value=0,
                dimension_names=DIMENSION_NAMES, config=ARRAY_CONFIG)
    except BaseException:
        # half a store (a group without its array) would only confuse a later run
        with contextlib.suppress(Exception):
            remove(url, storage_options)
        raise


def _read_group(url, storage_options, mode):
    """The group and our attributes, or ``(group, None)`` if it is not our store.

    Storage errors (access denied, no connection) are raised as InputError;
    anything that only says "this is not a store we made" is not.
    """
    store = zarr_store(url, storage_options, read_only=mode == "r")
    with user_errors(url, "reading"):
        try:
            group = zarr.open_group(store, mode=mode, zarr_format=3)
        except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError,
                ValueError, KeyError, TypeError):
            # ValueError covers a zarr.json cut short (json's JSONDecodeError)
            return None, None
    attrs = group.attrs.get(ATTRS_KEY)
    if not isinstance(attrs, dict) or attrs.get("format") != FORMAT_NAME:
        return group, None
    return group, attrs


def _open_group(url, storage_options, mode):
    _require_present(url, storage_options)
    group, attrs = _read_group(url, storage_options, mode)
    if attrs is None:
        raise InputError(f"{os.fspath(url)} is not a p2s-dask DWI store (a Zarr v3 group "
                         "made by p2s-dask)")
    if int(attrs.get("version", 0)) > FORMAT_VERSION:
        raise InputError(f"{os.fspath(url)} was written by a newer p2s-dask (store format "
                         f"{attrs['version']}); upgrade p2s-dask to read it")
    return group, attrs


def _dwi_array(url, group, attrs):
    """The ``dwi`` array (writing empty chunks) and meta, or ``(None, None)`` if
    either is missing, unreadable or inconsistent."""
    try:
        meta = DwiMeta.from_json(attrs)
    except (KeyError, TypeError, ValueError):
        return None, None
    with user_errors(url, "reading"):
        try:
            array = group[ARRAY_NAME]
        except (KeyError, ValueError, TypeError, zarr.errors.NodeTypeValidationError):
            return None, meta
    if not isinstance(array, zarr.Array) or array.shape != tuple(meta.shape):
        return None, meta
    # the setting is not stored with the array: every opener must ask for it
    return array.with_config(ARRAY_CONFIG), meta


def open_dwi_array(url, storage_options=None, require_complete=True, mode="r"):
    """The stored raw array and meta of a DWI store.

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional
    require_complete : bool, optional
        Refuse a store whose writing did not finish (default). False lets a
        caller resume or inspect it (see :func:`store_state`).
    mode : {'r', 'r+'}, optional

    Returns
    -------
    array : zarr.Array
        Raw values, shape (x, y, z, n). Writes through it store all-zero
        chunks too.
    meta : DwiMeta
    """
    group, attrs = _open_group(url, storage_options, mode)
    if require_complete and not attrs.get("complete", False):
        raise InputError(f"{os.fspath(url)} is incomplete (its writing did not finish)")
    array, meta = _dwi_array(url, group, attrs)
    if array is None:
        raise InputError(f"{os.fspath(url)} is damaged: its '{ARRAY_NAME}' array or its "
                         "attributes are missing or do not match")
    return array, meta


def read_chunks(array, url=None) -> da.Array:
    """A lazy dask array of a stored array, one task per stored chunk.

    Each task reads its chunk's bytes and decodes them straight into the
    block it returns (see :class:`_ChunkCodec`), in the task's own thread:
    Blosc runs without the GIL, and nothing goes through Zarr's event loop,
    whose single thread would otherwise copy every decoded chunk of every
    task into place one after the other. Arrays whose codecs this module
    does not write fall back to :func:`dask.array.from_zarr`.

    Parameters
    ----------
    array : zarr.Array
    url : str, optional
        The store, for error messages (default: from the array).

    Returns
    -------
    dask.array.Array
        Chunked as stored; every block C-contiguous, as Zarr returns it.
    """
    codec = _ChunkCodec.of(array)
    if codec is None:
        return da.from_zarr(array)
    reader = _ChunkReader(array, codec, _array_url(array) if url is None else os.fspath(url))
    chunks = da.core.normalize_chunks(array.chunks, array.shape)
    return da.map_blocks(
        _read_chunk_task, dtype=array.dtype, chunks=chunks,
        meta=np.empty((0,) * array.ndim, array.dtype), reader=reader,
        name=f"read-zarr-{uuid.uuid4().hex}")


def open_dwi(url, storage_options=None, require_complete=True):
    """Open a DWI store as a lazy dask array of values.

    Parameters
    ----------
    url : str or os.PathLike
        Local path or fsspec URL of a store made by :func:`create_dwi_store`
        (e.g. through ``nifti_to_zarr``).
    storage_options : dict, optional
    require_complete : bool, optional
        Refuse an incomplete store (default).

    Returns
    -------
    values : dask.array.Array, shape (x, y, z, n)
        Chunked as stored. With a non-trivial scl_slope/scl_inter the values
        are ``raw * slope + inter`` in float64, computed lazily; this is what
        nibabel's ``get_fdata()`` (and DIPY's ``load_nifti``) returns, bit for
        bit, so results match DIPY's on the same file. Otherwise the raw
        values in their stored dtype.
    meta : DwiMeta
    """
    array, meta = open_dwi_array(url, storage_options, require_complete)
    return meta.apply_scaling(read_chunks(array, url)), meta


def store_state(url, storage_options=None) -> str:
    """What is at ``url``, for deciding whether to read, resume or replace it.

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional

    Returns
    -------
    str
        ``'absent'``: nothing there. ``'complete'``: a DWI store marked
        complete (all chunks were verified when it was marked).
        ``'incomplete'``: a readable DWI store whose writing did not finish;
        its array can be opened with ``open_dwi_array(url,
        require_complete=False, mode='r+')`` and written further.
        ``'invalid'``: something else: not a DWI store (no group metadata,
        metadata cut short, foreign attributes), one from a newer format, or
        one whose array or attributes are missing or inconsistent (e.g. a
        creation that was killed). Only replacing it helps.

    Raises
    ------
    InputError
        Only when the storage itself fails (access denied, no connection).
    """
    if not exists(url, storage_options):
        return "absent"
    group, attrs = _read_group(url, storage_options, "r")
    if attrs is None or int(attrs.get("version", 0)) > FORMAT_VERSION:
        return "invalid"
    array, _ = _dwi_array(url, group, attrs)
    if array is None:
        return "invalid"
    return "complete" if attrs.get("complete", False) else "incomplete"


def _array_url(array) -> str:
    """The store's location, for messages."""
    store = array.store
    if isinstance(store, LocalStore):
        return str(store.root)
    if isinstance(store, FsspecStore):
        return store.fs.unstrip_protocol(store.path)
    return str(store)


def verify_all_chunks(url_or_array, storage_options=None) -> None:
    """Check that every chunk of a store's ``dwi`` array exists.

    With empty chunks written too (see the module docstring), a missing
    chunk means a write that failed or never happened.

    Parameters
    ----------
    url_or_array : str, os.PathLike or zarr.Array
        The store, or its ``dwi`` array as returned by :func:`create_dwi_store`
        or :func:`open_dwi_array`.
    storage_options : dict, optional
        For a URL.

    Raises
    ------
    InputError
        Naming the store and how many chunks are missing; or if the store
        cannot be read.
    """
    if isinstance(url_or_array, zarr.Array):
        array, url = url_or_array, _array_url(url_or_array)
    else:
        url = os.fspath(url_or_array)
        array, _ = open_dwi_array(url, storage_options, require_complete=False)
    with user_errors(url, "reading"):
        # one listing of the array's keys; fresh, not from a listing cache
        written = array.nchunks_initialized
    missing = array.nchunks - written
    if missing:
        raise InputError(f"{url} is incomplete: {missing} of its {array.nchunks} chunks "
                         "were not written")


def _set_complete(url, storage_options, complete: bool) -> None:
    group, attrs = _open_group(url, storage_options, "r+")
    with user_errors(url, "writing"):
        group.attrs[ATTRS_KEY] = {**attrs, "complete": bool(complete)}


def mark_complete(url, storage_options=None) -> None:
    """Record that all data of the store at ``url`` is written, once checked.

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional

    Raises
    ------
    InputError
        If any chunk is missing (:func:`verify_all_chunks`); the store then
        stays incomplete.
    """
    verify_all_chunks(url, storage_options)
    _set_complete(url, storage_options, True)


def is_complete(url, storage_options=None) -> bool:
    """Whether the store at ``url`` was completely written.

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional

    Returns
    -------
    bool
    """
    _, attrs = _open_group(url, storage_options, "r")
    return bool(attrs.get("complete", False))


def _normalized_region(array, region) -> tuple:
    """``region`` as one ``slice(start, stop)`` per axis (Ellipsis: all)."""
    region = () if region is Ellipsis else tuple(region)
    region += (slice(None),) * (array.ndim - len(region))
    out = []
    for s, n in zip(region, array.shape):
        if not isinstance(s, slice) or s.step not in (None, 1):
            raise ValueError(f"write_region takes slices, not {s!r}")
        out.append(slice(*s.indices(n)[:2]))
    return tuple(out)


def _chunk_aligned(array, region) -> tuple:
    """``region`` normalised; ValueError unless it is aligned to the chunks."""
    region = _normalized_region(array, region)
    for s, c, n in zip(region, array.chunks, array.shape):
        if s.start % c or (s.stop % c and s.stop != n):
            raise ValueError(f"region {region} is not aligned to the chunks {array.chunks}")
    return region


def _chunk_regions(region, chunks):
    """The chunk-sized pieces of a chunk-aligned ``region``, in C order."""
    axes = [[slice(a, min(a + c, s.stop)) for a in range(s.start, s.stop, c)]
            for s, c in zip(region, chunks)]
    return list(itertools.product(*axes))


def write_region(array, region, values, url) -> None:
    """Write whole chunks of ``array``; storage errors become one-line InputErrors.

    Safe to call from many Dask tasks (threads or processes) at once, as long
    as their regions do not share a chunk, which is why ``region`` must be
    chunk-aligned: two tasks writing parts of one chunk would each rewrite it
    whole, and one of them would lose.

    Parameters
    ----------
    array : zarr.Array
        From :func:`create_dwi_store` or :func:`open_dwi_array` (``mode='r+'``).
    region : tuple of slices or Ellipsis
        Starts on chunk boundaries; ends on one or at the array's edge.
    values : array-like or scalar
        Of the region's shape (or broadcastable to it).
    url : str
        The store, named in error messages ("writing URL: No space left on
        device").

    Raises
    ------
    InputError
        On a storage error (full disk, quota, I/O error, lost connection...).
        When it is raised, no write of this call is still running.
    ValueError
        If ``region`` is not chunk-aligned (a bug in the caller).

    Notes
    -----
    Chunks of arrays in this module's layout are encoded and stored here, in
    the caller's thread (see :class:`_ChunkCodec`); others through Zarr.
    """
    region = _chunk_aligned(array, region)
    if not array.config.write_empty_chunks:
        array = array.with_config(ARRAY_CONFIG)
    pieces = _chunk_regions(region, array.chunks)
    codec = _ChunkCodec.of(array)

    def store(piece, part):
        if codec is None:
            array[piece] = part
        else:
            _write_chunk(array, codec, piece, part)

    if len(pieces) == 1:
        with user_errors(url, "writing"):
            store(region, values)
        return
    # Zarr writes a many-chunk region with asyncio.gather, which on the first
    # error leaves the other chunk writes running in the background, even
    # after the caller has removed the store: one chunk per Zarr call instead,
    # from threads that are all finished when the error is raised
    values = np.asarray(values)

    def write(_, piece):
        part = values if values.ndim == 0 else values[tuple(
            slice(p.start - r.start, p.stop - r.start) for p, r in zip(piece, region))]
        with user_errors(url, "writing"):
            store(piece, part)
        return 0

    for_each_block(pieces, write, workers=int(zarr.config.get("async.concurrency")))


def _regular_chunks(chunks) -> tuple:
    """The zarr chunk size for each axis of dask chunks (the first block's size)."""
    return tuple(max(c[0], 1) for c in chunks)


def _is_zarr_grid(dask_chunks, zarr_chunks) -> bool:
    """True if every dask block is exactly one zarr chunk (so no two tasks share one)."""
    for blocks, size in zip(dask_chunks, zarr_chunks):
        if any(b != size for b in blocks[:-1]) or blocks[-1] > size:
            return False
    return True


def write_dwi(values, url, meta: DwiMeta, *, chunks=None, overwrite=False,
              storage_options=None, compute=True):
    """Write values (e.g. denoised output) to a new DWI store.

    The store's header gets the values' dtype and shape and no scaling
    (slope 1, intercept 0); affine, extensions and gradients are kept. The
    store is marked complete only once every chunk is verified to exist.

    Parameters
    ----------
    values : dask.array.Array or ndarray, shape (x, y, z, n)
        Stored in its own dtype (e.g. float32).
    url : str or os.PathLike
        Local path or fsspec URL of the new store.
    meta : DwiMeta
        Meta of the input the values were computed from.
    chunks : sequence of 3 ints, optional
        Spatial chunk shape. By default the dask array's (its first block);
        the values are rechunked only if their blocks do not match.
    overwrite : bool, optional
        Replace an existing store at ``url``; otherwise refuse.
    storage_options : dict, optional
    compute : bool, optional
        Write now (default); if that fails, the store is removed. If False,
        return a ``dask.delayed`` object that writes and marks the store
        complete when computed (on failure the store stays, incomplete).

    Returns
    -------
    None or dask.delayed.Delayed

    Raises
    ------
    OutputExistsError
        If ``url`` exists and ``overwrite`` is false.
    InputError
        On a storage error while writing (one line).
    """
    values = values if isinstance(values, da.Array) else da.asarray(values)
    if values.ndim != 4:
        raise InputError(f"values must be 4D (x, y, z, volumes); got shape {values.shape}")
    if any(np.isnan(s) for s in values.shape):
        raise InputError("values have unknown chunk sizes; call compute_chunk_sizes() first")
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    out_meta = meta.for_values(values.dtype, values.shape)
    if chunks is None:
        spatial = _regular_chunks(values.chunks)[:3]
    else:
        spatial = normalize_chunks(chunks, values.shape)
    zarr_chunks = (*spatial, values.shape[3])
    if not _is_zarr_grid(values.chunks, zarr_chunks):
        values = values.rechunk(zarr_chunks)
    url = os.fspath(url)
    array = create_dwi_store(url, values.shape, values.dtype, spatial, out_meta,
                             overwrite=overwrite, storage_options=storage_options)
    # each task writes whole chunks of its own, so no locking is needed
    stored = da.store(values, _RegionWriter(array, url), lock=False, compute=False)
    if not compute:
        return dask.delayed(_complete_after)(stored, url, storage_options)
    try:
        stored.compute()
        mark_complete(url, storage_options)
    except BaseException:
        # ours and unusable; removing it also frees the room a full disk lacked
        discard(url, storage_options)
        raise
    return None


def discard(url, storage_options=None, *, settle=0.2, attempts=5) -> None:
    """Remove a store this process was writing, after a failure; never raises.

    Dask's local scheduler raises a task's error at once, while tasks already
    running in other threads go on, and one may write its chunk after a
    first removal (recreating folders). So the store is removed again until
    it stays gone for ``settle`` seconds. Where the storage cannot be reached
    (the likely cause of the failure) it is left: incomplete, never complete.

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional
    settle : float, optional
        Seconds the store must stay absent.
    attempts : int, optional
    """
    for _ in range(attempts):
        with contextlib.suppress(Exception):
            remove(url, storage_options)
        time.sleep(settle)
        try:
            if not exists(url, storage_options):
                return
        except Exception:  # noqa: BLE001 - unreachable: nothing more to do
            return


class _RegionWriter:
    """A ``da.store`` target writing each block through :func:`write_region`."""

    def __init__(self, array, url):
        self.array, self.url = array, url
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __setitem__(self, region, values):
        write_region(self.array, region, values, self.url)


def _complete_after(_stored, url, storage_options):
    mark_complete(url, storage_options)


# ---------------------------------------------------------------------------
# Chunks read and written without Zarr's machinery.
#
# Zarr 3 runs every read and write through one event loop thread: a chunk's
# bytes are decoded in a worker thread, but copied into (or out of) the
# caller's array on the loop's thread, so Dask's threads queue up behind each
# other there, and every chunk passes through two or three fresh buffers. For
# the arrays this module makes (one regular chunk grid, raw bytes in native
# order, optionally Blosc) a chunk is one object: its bytes are read and
# decoded straight into the block a task returns, or encoded from the block a
# task computed, in the task's own thread (Blosc releases the GIL). The
# stored bytes are exactly what Zarr reads and writes.

_BLOSC_SHUFFLE = {"noshuffle": numcodecs.blosc.NOSHUFFLE, "shuffle": numcodecs.blosc.SHUFFLE,
                  "bitshuffle": numcodecs.blosc.BITSHUFFLE}
_NATIVE = "little" if np.little_endian else "big"
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _value(x):
    """An enum's value (zarr's codec settings), or ``x`` itself."""
    return getattr(x, "value", x)


@dataclass(frozen=True)
class _ChunkCodec:
    """How one chunk of an array is stored: its shape, dtype and fill value,
    and the Blosc settings ``(cname, clevel, shuffle, blocksize, typesize)``
    (None: raw bytes)."""

    chunk_shape: tuple
    dtype: np.dtype
    fill_value: object
    blosc: tuple | None

    @classmethod
    def of(cls, array) -> "_ChunkCodec | None":
        """The codec of a Zarr v3 array whose chunks this module can read and
        write itself (regular grid, native byte order, [Blosc]), else None."""
        meta = getattr(array, "metadata", None)
        if not isinstance(array, zarr.Array) or getattr(meta, "zarr_format", None) != 3:
            return None
        grid = getattr(meta.chunk_grid, "chunk_shape", None)
        codecs = tuple(meta.codecs)
        dtype = np.dtype(array.dtype)
        if grid is None or tuple(grid) != tuple(array.chunks) or not codecs:
            return None
        if not isinstance(codecs[0], BytesCodec) or dtype.kind not in "biuf":
            return None
        if dtype.itemsize > 1 and (_value(codecs[0].endian) != _NATIVE or not dtype.isnative):
            return None
        nbytes = int(np.prod(grid)) * dtype.itemsize
        blosc = None
        if len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
            c = codecs[1]
            shuffle = _BLOSC_SHUFFLE.get(_value(c.shuffle))
            if shuffle is None or nbytes > numcodecs.blosc.MAX_BUFFERSIZE:
                return None
            blosc = (str(_value(c.cname)), int(c.clevel), shuffle, int(c.blocksize or 0),
                     int(c.typesize or dtype.itemsize))
        elif len(codecs) != 1:
            return None
        return cls(tuple(int(g) for g in grid), dtype, meta.fill_value, blosc)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    def decode(self, data, out: np.ndarray) -> None:
        """Stored bytes into ``out`` (a C-contiguous chunk)."""
        target = out.reshape(-1).view(np.uint8)
        if self.blosc is None:
            if len(data) != self.nbytes:
                raise ValueError(f"it holds {len(data)} bytes, not {self.nbytes}")
            target[:] = np.frombuffer(data, np.uint8)
            return
        # the header's sizes first: Blosc trusts them, so a cut or foreign
        # object must not reach the decoder
        if len(data) < numcodecs.blosc.MAX_OVERHEAD:
            raise ValueError(f"{len(data)} bytes are no Blosc chunk")
        size, stored, _ = numcodecs.blosc._cbuffer_sizes(data)
        if stored != len(data) or size != self.nbytes:
            raise ValueError(f"its Blosc header says {stored} bytes decoding to {size}; "
                             f"it has {len(data)} and should decode to {self.nbytes}")
        numcodecs.blosc.decompress(data, target)

    def encode(self, chunk: np.ndarray):
        """A C-contiguous chunk as stored bytes (a view of it when raw)."""
        data = memoryview(chunk.reshape(-1).view(np.uint8))
        if self.blosc is None:
            return data
        cname, clevel, shuffle, blocksize, typesize = self.blosc
        return numcodecs.blosc.compress(data, cname.encode(), clevel, shuffle, blocksize,
                                        typesize=typesize)

    def encode_region(self, region, values):
        """``(chunk grid position, stored bytes)`` of one chunk: ``region``
        (slices) is one chunk, cut at the array's edge; ``values`` of its
        shape, or broadcastable to it."""
        coords = tuple(s.start // c for s, c in zip(region, self.chunk_shape))
        shape = tuple(s.stop - s.start for s in region)
        values = np.asarray(values)
        if shape == self.chunk_shape and values.shape == shape:
            chunk = _c_order(values, self.dtype)
        else:
            # an edge chunk is stored whole, padded with the fill value (as
            # Zarr does); a scalar is broadcast
            chunk = np.empty(self.chunk_shape, self.dtype)
            if shape != self.chunk_shape:
                chunk[...] = self.fill_value
            inner = chunk[tuple(slice(0, n) for n in shape)]
            inner[...] = _c_order(values, self.dtype) if values.shape == shape else values
        return coords, self.encode(chunk)


def _c_order(values: np.ndarray, dtype) -> np.ndarray:
    """``values`` as a C-contiguous array of ``dtype`` (itself when it is
    one). A volume-major block (predicted from a NIfTI) is transposed a
    z-plane at a time, several times faster than one numpy copy."""
    if values.flags.c_contiguous and values.dtype == dtype:
        return values
    if values.ndim == 4:
        return to_c_order(values, dtype)
    return np.ascontiguousarray(values, dtype=dtype)


def _chunk_key(metadata, path, coords) -> str:
    """The store key of the chunk at grid position ``coords`` of the array
    at ``path`` in its store."""
    key = metadata.encode_chunk_key(tuple(int(c) for c in coords))
    return f"{path}/{key}" if path else key


def _write_chunk(array, codec: _ChunkCodec, region, values) -> None:
    """Encode and store one chunk (see :meth:`_ChunkCodec.encode_region`)."""
    coords, data = codec.encode_region(region, values)
    _put_chunk(array.store, _chunk_key(array.metadata, array.path, coords), data)


def _put_chunk(store, key, data, scratch=None) -> None:
    """Write one object; on a local store under a temporary name that is
    renamed into place (as Zarr does), so a chunk file is always whole.
    ``scratch(n)``, if given, lends an aligned buffer of ``n`` bytes."""
    if getattr(store, "read_only", False):
        # what Zarr says for a write through a read-only array
        raise ValueError("store was opened in read-only mode and does not support writing")
    if isinstance(store, LocalStore):
        path = os.path.join(str(store.root), *key.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"
        try:
            _write_file(tmp, data, scratch)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    buffer = default_buffer_prototype().buffer.from_bytes(bytes(data))
    sync(store.set(key, buffer))


# below this, a file is written with one plain write
_DIRECT_MIN = 1 << 20


def _aligned(n: int) -> np.ndarray:
    """An empty byte buffer of ``n`` bytes starting on an :data:`ALIGN` boundary."""
    raw = np.empty(n + ALIGN, np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + n]


def _write_file(path, data, scratch=None) -> None:
    """A new file holding ``data``; a large one mostly with direct I/O.

    A buffered write costs the kernel a fresh page-cache page per 4 KiB
    (measured here: often ten times the cost of the copy itself); a direct
    write sends the bytes from memory to the device. The encoder's output is
    not aligned, so it is copied into an aligned buffer first (``scratch``'s
    or a new one). Where direct I/O is unavailable or refused, everything
    goes through the page cache (see :class:`.direct_io.RunWriter`).
    """
    data = memoryview(data).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    if len(data) < _DIRECT_MIN or not getattr(os, "O_DIRECT", 0):
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        return
    os.close(fd)
    aligned = scratch(len(data)) if scratch is not None else _aligned(len(data))
    aligned[:] = np.frombuffer(data, np.uint8)
    writer = RunWriter(path)
    try:
        writer.write(aligned, 0)
    finally:
        writer.close(sync=False)


def _write_all(fd, view) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], done)


def _get_chunk(store, key):
    """One object's bytes (a buffer), or None if it does not exist."""
    if isinstance(store, LocalStore):
        path = os.path.join(str(store.root), *key.split("/"))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            if os.fstat(fd).st_size == 0:
                return b""
            # the file's cached pages mapped in (one call for all), not
            # copied: the decoder reads them where they are. Chunk files are
            # replaced by renames, never truncated, so none shrinks while it
            # is mapped.
            return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | _MAP_POPULATE,
                             prot=mmap.PROT_READ)
        finally:
            os.close(fd)
    buffer = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buffer is None else buffer.as_numpy_array()


class _ChunkReader:
    """What a read task needs (plain, picklable): the store, the array's
    key layout and its :class:`_ChunkCodec`."""

    def __init__(self, array, codec: _ChunkCodec, url: str):
        self.array_meta = array.metadata
        self.store, self.path = array.store, array.path
        self.shape, self.codec, self.url = tuple(array.shape), codec, url

    def key(self, coords) -> str:
        return _chunk_key(self.array_meta, self.path, coords)

    def read(self, coords) -> np.ndarray:
        """The chunk at grid position ``coords``, cut at the array's edge
        (C-contiguous; the fill value where the chunk does not exist)."""
        codec = self.codec
        starts = [c * n for c, n in zip(coords, codec.chunk_shape)]
        shape = tuple(min(n, s - a) for n, s, a in zip(codec.chunk_shape, self.shape, starts))
        with user_errors(self.url, "reading"):
            data = _get_chunk(self.store, self.key(coords))
        if data is None:
            return np.full(shape, codec.fill_value, codec.dtype)
        whole = np.empty(codec.chunk_shape, codec.dtype)
        try:
            codec.decode(data, whole)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"reading {self.url}: chunk {self.key(coords)} is damaged: "
                             f"{exc}") from exc
        finally:
            if isinstance(data, mmap.mmap):
                with contextlib.suppress(BufferError):  # else it goes with the object
                    data.close()
        if shape == codec.chunk_shape:
            return whole
        return np.ascontiguousarray(whole[tuple(slice(0, n) for n in shape)])


def _read_chunk_task(block_info=None, reader: _ChunkReader = None):
    return reader.read(block_info[None]["chunk-location"])


# ---------------------------------------------------------------------------
# Chunks written by background threads.


class ChunkWriter:
    """Stores encoded chunks of one store from background threads.

    A prediction task encodes its chunk (CPU work, in its own thread) and
    hands the bytes over; it goes on computing while a writer thread waits
    for the storage, then runs ``then`` (e.g. marking the chunk done). The
    queue is short, so at most ``depth + threads`` encoded chunks wait in
    memory. Each thread keeps one aligned buffer for direct writes (see
    :func:`_write_file`), reused from chunk to chunk.
    """

    def __init__(self, url, depth: int = 1, threads: int = 2):
        self.url = url
        self.queue = queue.Queue(maxsize=depth)
        self.error = None
        self.threads = [threading.Thread(target=self._run, name=f"p2s-chunk-writer-{i}",
                                         daemon=True) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def submit(self, store, key, data, then=None) -> None:
        """Queue one object (waits while the queue is full); raises the
        error of an earlier write, if any."""
        if self.error is not None:
            raise self.error
        self.queue.put((store, key, data, then))

    def _run(self):
        buffer = np.empty(0, np.uint8)

        def scratch(n):
            nonlocal buffer
            if buffer.size < n:
                buffer = np.empty(0, np.uint8)  # the old one freed first
                buffer = _aligned(n)
            return buffer[:n]

        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                store, key, data, then = item
                item = None  # the bytes go once written
                if self.error is None:
                    with user_errors(self.url, "writing"):
                        _put_chunk(store, key, data, scratch)
                    del data
                    if then is not None:
                        then()
            except BaseException as exc:  # reported by submit() and close()
                self.error = exc
            finally:
                self.queue.task_done()

    def close(self) -> None:
        """Wait for every queued chunk; raise the first error, if any."""
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        if self.error is not None:
            raise self.error


_WRITERS: dict = {}
_WRITERS_LOCK = threading.Lock()


def _on_distributed_worker() -> bool:
    worker = sys.modules.get("distributed.worker")
    if worker is None:
        return False
    try:
        worker.get_worker()
    except ValueError:
        return False
    return True


def submit_region(array, region, values, url, then=None) -> None:
    """:func:`write_region` for a prediction task: the chunk is encoded now
    and stored by this process's background writer of ``url``, then
    ``then()`` runs. :func:`finish_region_writes` waits for them.

    On a ``distributed`` worker (which may die with chunks still queued,
    after the scheduler has taken its tasks as done), for a region of several
    chunks, or for an array whose codecs this module does not write itself,
    the write happens now, as :func:`write_region`.

    Raises
    ------
    InputError
        For this chunk, or for an earlier one of the same writer that failed.
    """
    region = _chunk_aligned(array, region)
    codec = _ChunkCodec.of(array)
    if (codec is None or len(_chunk_regions(region, array.chunks)) != 1
            or _on_distributed_worker()):
        write_region(array, region, values, url)
        if then is not None:
            then()
        return
    coords, data = codec.encode_region(region, values)
    del values
    key = _chunk_key(array.metadata, array.path, coords)
    with _WRITERS_LOCK:
        writer = _WRITERS.get(url)
        if writer is None:
            writer = _WRITERS[url] = ChunkWriter(url)
    writer.submit(array.store, key, data, then)


def finish_region_writes(url) -> bool:
    """Wait for this process's background writes to ``url`` (if any) and
    raise the first error. Run on every worker (``client.run``) once all
    tasks are done. Returns whether there was a writer."""
    with _WRITERS_LOCK:
        writer = _WRITERS.pop(url, None)
    if writer is None:
        return False
    writer.close()
    return True
