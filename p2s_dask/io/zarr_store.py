"""Our Zarr v3 stores of one DWI dataset: NIfTI-Zarr images.

Every store we write (a conversion, an output, the staged input) is a
NIfTI-Zarr image (see :mod:`.ome_layout` for its arrays and metadata), so
the field's tools open it. Array ``0`` holds the raw values in the NIfTI's
on-disk type (native byte order), axes (t, z, y, x), sharded: one shard (one
object) holds all volumes of a spatial block, which is what Patch2Self reads
together, and is made of one inner chunk per volume, so a viewer reading one
volume fetches a small part of each shard (the shard index tells which).
Inner chunks are compressed with Blosc LZ4 + byte shuffle (on DWI data it
encodes at over 1 GB/s and decodes faster, with a better ratio than plain
zstd level 1, which encodes 3-5 times slower), or stored raw when a sample
of the data would not shrink enough (:func:`compressor_for`).

A store that is being written has no root ``zarr.json``: to Zarr, xarray,
ome-zarr and nifti-zarr it is no image at all, not one full of zeros. Its
state is in ``p2s_dask_pending.json`` (format, version, the NIfTI meta,
``complete: false``). Once every shard is known to be in the store
(:func:`mark_complete` lists them), the root group is written with the
``ome`` attributes, ours (``p2s_dask``, ``complete: true``) and consolidated
metadata, and the pending file is removed.

Shards equal to the fill value are written too (Zarr's
``write_empty_chunks``, off by default, is switched on for every array this
module hands out). Otherwise an all-zero block (a masked or empty region)
would be indistinguishable from one lost to a failed or interrupted write,
and "every shard exists" could not tell a complete store from a broken one.
So in a complete store of ours a missing shard is damage: reading it stops
with a DataError naming the store and the shard (:func:`.chunk_io.missing_chunk`).
In any other tool's store a missing chunk is the fill value, as the Zarr
specification says, and one warning says how many there are.

Stores of our format 1 (array ``dwi``, axes (x, y, z, n), attributes on the
group) are still read, for one release. Any other OME-Zarr (0.4, 0.5, 0.6) /
NIfTI-Zarr 4D image, on Zarr v2 or v3, is read as input (:func:`open_dwi`,
rechunked by Dask as needed) and converted (:func:`open_image`), both through
:func:`_foreign_image`: its header, if it has one, else its OME metadata.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings

import dask
import dask.array as da
import numcodecs.blosc
import numpy as np
import zarr
from nibabel.spatialimages import HeaderDataError
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from ..errors import InputError, OutputExistsError
from . import ome_layout as ome
from .budget import normalize_chunks
from .chunk_io import (  # noqa: F401 - re-exported: the store's chunk I/O
    ARRAY_CONFIG,
    DwiArray,
    ForeignArray,
    _array_url,
    finish_region_writes,
    missing_chunks,
    read_chunks,
    submit_region,
    write_region,
)
from .meta import DwiMeta, header_class
from .urls import exists, fs_and_path, is_local, local_path, remove, user_errors

logger = logging.getLogger("p2s_dask")

__all__ = [
    "ARRAY_NAME",
    "ATTRS_KEY",
    "FORMAT_VERSION",
    "DwiArray",
    "DwiMeta",
    "OutputExistsError",
    "create_dwi_store",
    "discard",
    "finish_region_writes",
    "is_complete",
    "mark_complete",
    "open_dwi",
    "open_dwi_array",
    "open_image",
    "probe_store",
    "read_chunks",
    "store_state",
    "submit_region",
    "verify_all_chunks",
    "write_dwi",
    "write_region",
    "zarr_concurrency",
]

ATTRS_KEY = "p2s_dask"
ARRAY_NAME = ome.ARRAY_NAME
FORMAT_NAME = "p2s-dask-dwi"
FORMAT_VERSION = 2
PENDING_KEY = "p2s_dask_pending.json"
# format 1 (read for one release): array "dwi", axes (x, y, z, n)
LEGACY_VERSION, LEGACY_ARRAY = 1, "dwi"


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


# below this saving, compression costs more than it gives: every pass of a
# denoising run decodes the whole store (Blosc at ~2 GB/s a core, against a
# copy at ~6), for a store a few per cent smaller
MIN_SAVING = 0.2


def compressor_for(sample, dtype=None):
    """:func:`default_compressor`, or False (store raw) for data it would not
    shrink by :data:`MIN_SAVING`: typically float32 with noise in every
    voxel, whose mantissas do not compress (an HCP-like acquisition saves
    13%), while integer data with a background shrinks several times.

    Parameters
    ----------
    sample : ndarray
        Some of the values to store (e.g. one block of all volumes).
    dtype : numpy dtype, optional
        The stored type (default the sample's).
    """
    codec = default_compressor()
    raw = _spread_sample(np.asarray(sample), np.dtype(dtype or np.asarray(sample).dtype))
    if raw.nbytes == 0:
        return codec
    packed = numcodecs.blosc.compress(memoryview(raw.view(np.uint8)), b"lz4", codec.clevel,
                                      numcodecs.blosc.SHUFFLE, 0, typesize=raw.itemsize)
    return codec if len(packed) <= (1 - MIN_SAVING) * raw.nbytes else False


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



def _spread_sample(values: np.ndarray, dtype, pieces: int = 8, piece_bytes: int = 1 << 19):
    """Up to ``pieces`` runs of ``piece_bytes`` spread over ``values`` in its
    memory order (no transposing copy of a whole slab), as ``dtype``."""
    flat = values.ravel(order="K")
    run = max(1, piece_bytes // max(1, flat.itemsize))
    if flat.size <= pieces * run:
        return np.ascontiguousarray(flat, dtype=dtype)
    starts = np.linspace(0, flat.size - run, pieces).astype(np.int64)
    return np.concatenate([flat[a:a + run] for a in starts]).astype(dtype, copy=False)


def _get_json(store, key):
    """A small JSON object of the store, or None if absent or unreadable."""
    buffer = sync(store.get(key, prototype=default_buffer_prototype()))
    if buffer is None:
        return None
    try:
        return json.loads(buffer.to_bytes())
    except ValueError:
        return None


def _put_json(store, key, value) -> None:
    data = json.dumps(value, indent=1).encode()
    sync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))


def _array_codecs(dtype, shard, compressor):
    """Shards of all volumes of a block; one inner chunk per volume."""
    inner = (1, *shard[1:])
    if compressor is None:
        compressor = default_compressor()
    return dict(shards=shard, chunks=inner, compressors=compressor or None,
                fill_value=0, dimension_names=ome.AXES, config=ARRAY_CONFIG)


def _create_arrays(store, shape, dtype, chunks, meta, compressor):
    """Array ``0`` (empty) and the small arrays, written now."""
    native = tuple(reversed(shape))
    shard = (shape[3], *reversed(chunks))
    array = zarr.create_array(store, name=ARRAY_NAME, shape=native, dtype=dtype,
                              attributes=ome.cf_attributes(meta),
                              **_array_codecs(dtype, shard, compressor))
    header = ome.header_bytes(meta)
    nifti = zarr.create_array(store, name=ome.HEADER_NAME, shape=header.shape, dtype=np.uint8,
                              chunks=header.shape, compressors=None, fill_value=0,
                              dimension_names=("nifti_byte",), attributes=ome.header_json(meta))
    nifti[...] = header
    for name, (values, dims) in ome.gradient_arrays(meta).items():
        zarr.create_array(store, name=name, data=values, chunks=values.shape,
                          compressors=None, dimension_names=dims)
    return array


def create_dwi_store(url, shape, dtype, chunks, meta: DwiMeta, *, overwrite=False,
                     storage_options=None, compressor=None):
    """Create an empty DWI store (incomplete: no image to other readers).

    Parameters
    ----------
    url : str or os.PathLike
        Local path or fsspec URL of the new store.
    shape : tuple of 4 ints
        (x, y, z, volumes).
    dtype : numpy dtype
        Stored as is (native byte order).
    chunks : sequence of 3 ints (or 4, the last being the volume count)
        Spatial block shape (x, y, z); each shard holds all volumes of one.
    meta : DwiMeta
        Stored in the ``nifti`` header array, the gradient arrays and our
        attributes; its shape and raw dtype must match.
    overwrite : bool, optional
        Replace an existing store (or file) at ``url``; otherwise refuse.
    storage_options : dict, optional
    compressor : zarr codec or False, optional
        Of the inner chunks: default :func:`default_compressor`; False
        stores them raw (see :func:`compressor_for`).

    Returns
    -------
    DwiArray
        Array ``0`` in NIfTI order; writes through it store all-zero shards
        too (see the module docstring).

    Raises
    ------
    OutputExistsError
        If ``url`` exists and ``overwrite`` is false.
    """
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype).newbyteorder("=")
    if tuple(meta.shape) != shape or meta.raw_dtype != dtype:
        raise ValueError(f"meta describes {meta.shape} {meta.raw_dtype}, not {shape} {dtype}")
    chunks = normalize_chunks(chunks, shape)
    _require_absent_or_remove(url, overwrite, storage_options)
    attrs = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **meta.to_json(),
             "complete": False}
    try:
        with user_errors(url, "writing"):
            store = zarr_store(url, storage_options)
            # first: whatever a kill leaves behind is then recognisably ours
            _put_json(store, PENDING_KEY, {ATTRS_KEY: attrs})
            array = _create_arrays(store, shape, dtype, chunks, meta, compressor)
            # Zarr wrote the root group with the first array; until the
            # store is complete there must be none
            sync(store.delete("zarr.json"))
            return DwiArray(array.with_config(ARRAY_CONFIG))
    except BaseException:
        # half a store only confuses a later run
        with contextlib.suppress(Exception):
            remove(url, storage_options)
        raise


def is_unfinished(url, storage_options=None) -> bool:
    """Whether ``url`` holds a store of ours whose writing never finished
    (its pending record is ours; the array may not even exist yet)."""
    store = zarr_store(url, storage_options, read_only=True)
    with user_errors(url, "reading"):
        pending = _get_json(store, PENDING_KEY)
    if isinstance(pending, dict) and _ours(pending.get(ATTRS_KEY)):
        return True  # (zarr may have written an empty root group already)
    kind, attrs, _ = _inspect(url, storage_options)
    return kind == "ours" and not attrs.get("complete", False)


def _inspect(url, storage_options, mode="r"):
    """``(kind, attrs, group)`` of what is at ``url``.

    kind: ``'ours'`` (complete, with its root group), ``'pending'`` (ours,
    being written), ``'legacy'`` (our format 1), ``'newer'`` (ours, from a
    newer p2s-dask), ``'foreign'`` (another OME-Zarr image, Zarr v2 or v3)
    or ``'none'``.
    Storage errors (access denied, no connection) raise InputError.
    """
    store = zarr_store(url, storage_options, read_only=mode == "r")
    with user_errors(url, "reading"):
        try:
            # Zarr v2 too: other tools' images (OME-Zarr 0.4, nifti-zarr's v2)
            group = zarr.open_group(store, mode=mode, zarr_format=None)
        except (zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError,
                FileNotFoundError, ValueError, KeyError, TypeError):
            # ValueError covers a zarr.json cut short (json's JSONDecodeError)
            group = None
        pending = _get_json(store, PENDING_KEY) if group is None else None
    if group is None:
        attrs = pending.get(ATTRS_KEY) if isinstance(pending, dict) else None
        return ("pending" if _ours(attrs) else "none"), (attrs if _ours(attrs) else None), None
    attrs = group.attrs.get(ATTRS_KEY)
    if _ours(attrs):
        version = int(attrs.get("version", 0))
        kind = {LEGACY_VERSION: "legacy", FORMAT_VERSION: "ours"}.get(version, "newer")
        return kind, attrs, group
    if "ome" in group.attrs or "multiscales" in group.attrs:
        return "foreign", None, group
    return "none", None, group


def _ours(attrs) -> bool:
    return isinstance(attrs, dict) and attrs.get("format") == FORMAT_NAME


def _dwi_array(url, storage_options, kind, attrs, group, mode):
    """``(DwiArray, meta)`` of one of our stores, or ``(None, meta)`` if its
    array or attributes are missing or inconsistent."""
    try:
        meta = DwiMeta.from_json(attrs)
    except (KeyError, TypeError, ValueError):
        return None, None
    legacy = kind == "legacy"
    with user_errors(url, "reading"):
        try:
            if legacy:
                array = group[LEGACY_ARRAY]
            else:
                array = zarr.open_array(zarr_store(url, storage_options, mode == "r"),
                                        path=ARRAY_NAME, mode=mode, zarr_format=3)
        except (KeyError, ValueError, TypeError, FileNotFoundError,
                zarr.errors.NodeTypeValidationError, zarr.errors.ArrayNotFoundError):
            return None, meta
    if not isinstance(array, zarr.Array):
        return None, meta
    # the setting is not stored with the array: every opener must ask for it.
    # A complete store of format 2 had every shard checked when completed:
    # a missing one is damage (format 1 stores are read as they always were)
    view = DwiArray(array.with_config(ARRAY_CONFIG), reverse=not legacy,
                    complete=kind == "ours" and attrs.get("complete") is True)
    if view.shape != tuple(meta.shape):
        return None, meta
    return view, meta


def open_dwi_array(url, storage_options=None, require_complete=True, mode="r"):
    """The stored raw array and meta of one of our DWI stores.

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
    array : DwiArray
        Raw values, shape (x, y, z, n). Writes through it store all-zero
        shards too.
    meta : DwiMeta
    """
    _require_present(url, storage_options)
    kind, attrs, group = _inspect(url, storage_options, mode)
    _refuse_kind(url, kind)
    if require_complete and (kind == "pending" or not attrs.get("complete", False)):
        raise InputError(f"{os.fspath(url)} is incomplete (its writing did not finish)")
    array, meta = _dwi_array(url, storage_options, kind, attrs, group, mode)
    if array is None:
        raise InputError(f"{os.fspath(url)} is damaged: its '{ARRAY_NAME}' array or its "
                         "attributes are missing or do not match")
    return array, meta


def _refuse_kind(url, kind) -> None:
    if kind == "newer":
        raise InputError(f"{os.fspath(url)} was written by a newer p2s-dask; upgrade "
                         "p2s-dask to read it")
    if kind == "none":
        raise InputError(f"{os.fspath(url)} is not a p2s-dask DWI store, nor an OME-Zarr "
                         "or NIfTI-Zarr image")
    if kind == "foreign":
        # only our own stores are written into or completed
        raise InputError(f"{os.fspath(url)} is not a p2s-dask DWI store (it is another "
                         "tool's OME-Zarr image)")


def open_dwi(url, storage_options=None, require_complete=True):
    """Open a DWI store as a lazy dask array of values.

    Parameters
    ----------
    url : str or os.PathLike
        Local path or fsspec URL of one of our stores, or of any NIfTI-Zarr
        or OME-Zarr 4D image (axes x, y, z, t in any order; gradients from
        its ``bvals``/``bvecs`` arrays if it has them).
    storage_options : dict, optional
    require_complete : bool, optional
        Refuse an incomplete store of ours (default).

    Returns
    -------
    values : dask.array.Array, shape (x, y, z, n)
        Chunked as stored. With a non-trivial scl_slope/scl_inter the values
        are ``raw * slope + inter`` in float64, computed lazily; this is what
        nibabel's ``get_fdata()`` (and DIPY's ``load_nifti``) returns, bit for
        bit, so results match DIPY's on the same file. Otherwise the raw
        values in their stored dtype.
    meta : DwiMeta

    Raises
    ------
    DataError
        When computed, for a damaged chunk, or a missing one in a store we
        completed. In another tool's store a missing chunk is the fill value
        (the Zarr specification), and one warning says how many are.
    """
    _require_present(url, storage_options)
    kind, _, group = _inspect(url, storage_options)
    if kind == "foreign":
        array, meta = _foreign_image(url, group, count_missing=True)
    else:
        array, meta = open_dwi_array(url, storage_options, require_complete)
    return meta.apply_scaling(read_chunks(array, url)), meta


def open_image(url, storage_options=None):
    """The stored raw array and meta of any store p2s-dask reads, for
    reading: one of ours (complete), our format 1, or another tool's
    OME-Zarr / NIfTI-Zarr image, read as :func:`open_dwi` reads it.

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional

    Returns
    -------
    array : DwiArray or ForeignArray
        Raw values, NIfTI axis order (x, y, z, n); ``array[region]`` reads.
    meta : DwiMeta
        From our attributes; for another tool's image from its ``nifti``
        header if it has one, else from its OME metadata. In another tool's
        image a missing chunk is the fill value, and one warning says how
        many are missing.
    """
    _require_present(url, storage_options)
    kind, _, group = _inspect(url, storage_options)
    if kind == "foreign":
        return _foreign_image(url, group, count_missing=True)
    return open_dwi_array(url, storage_options)


def _foreign_image(url, group, count_missing=False):
    """``(ForeignArray, meta)`` of another tool's image; ``count_missing``:
    warn of the chunks it lacks (read as the fill value)."""
    path, names = ome.image_axes(dict(group.attrs), os.fspath(url))
    with user_errors(url, "reading"):
        try:
            array = group[path]
        except KeyError:
            array = None
    if not isinstance(array, zarr.Array):
        raise InputError(f"{os.fspath(url)}: its image array '{path}' is missing")
    order, drop = ome.to_nifti_axes(names, array.shape, os.fspath(url))
    view = ForeignArray(array, order, drop)
    meta = _foreign_meta(url, group, view)
    if count_missing:
        _warn_missing(url, array)
    return view, meta


def _warn_missing(url, array) -> None:
    """One warning saying how many chunks another tool's image lacks (from
    one listing of its store; one that cannot be listed is not counted)."""
    if not getattr(array.store, "supports_listing", False):
        return
    with user_errors(url, "reading"):
        missing, total = missing_chunks(array)
    if missing:
        # a v2 array's fill value may be null: Zarr then reads zeros
        fill = array.fill_value if array.fill_value is not None else 0
        logger.warning("%s: %d of its %d chunks are missing; read as the fill value %s, as "
                       "the Zarr specification says", os.fspath(url), len(missing), total,
                       fill)


def _foreign_meta(url, group, view):
    """Meta from the ``nifti`` header if there is one (the authority, as
    NIfTI-Zarr says: an oblique affine, scaling), else from OME."""
    with user_errors(url, "reading"):
        bvals, bvecs = (np.asarray(group[n][...], np.float64) if n in group else None
                        for n in (ome.BVALS_NAME, ome.BVECS_NAME))
        header = (np.asarray(group[ome.HEADER_NAME][...], np.uint8).tobytes()
                  if ome.HEADER_NAME in group else None)
    bvecs = None if bvecs is None else (bvecs.T if bvecs.shape[-1] == 3 else bvecs)
    if header is None:
        affine = ome.affine_from_ome(dict(group.attrs), os.fspath(url))
        return DwiMeta.for_array(view.shape, view.dtype, affine, bvals, bvecs)
    hdr, extra = _stored_header(url, header)
    dims = tuple(int(d) for d in hdr.get_data_shape())
    # volumes as a 4th or (nifti-zarr's no_time) a 5th dimension
    if dims[:3] != view.shape[:3] or int(np.prod(dims[3:])) != view.shape[3]:
        raise InputError(f"{os.fspath(url)}: its header says shape {dims}, its image "
                         f"has {view.shape}")
    hdr.set_data_shape(view.shape)
    # the stored values are the header's type, as nifti-zarr writes them
    hdr.set_data_dtype(view.dtype)
    return DwiMeta.from_header(hdr, extra, bvals=bvals, bvecs=bvecs)


def _stored_header(url, data: bytes):
    """``(header, extra)`` from a ``nifti`` array: the header's bytes, then
    (if there are extensions) their flag and the extensions; ``extra`` is
    None without extensions, else the bytes up to the header's data offset."""
    size = int.from_bytes(data[:4], "little")
    size = size if size in (348, 540) else int.from_bytes(data[:4], "big")
    try:
        hdr = header_class(data[:size]).from_fileobj(io.BytesIO(data[:size]), check=False)
    except (InputError, ValueError, TypeError, HeaderDataError) as exc:
        raise InputError(f"{os.fspath(url)}: its 'nifti' array is not a NIfTI header "
                         f"({exc})") from None
    extensions = data[size:]
    if len(extensions) <= 4 or extensions[0] == 0:
        return hdr, None
    # the data offset the file had, or one just past the extensions
    offset = max(int(hdr["vox_offset"]), size + len(extensions))
    hdr["vox_offset"] = offset
    return hdr, extensions.ljust(offset - size, b"\0")


def probe_store(url, storage_options=None):
    """``(shape, meta, chunks)`` of a store to denoise; chunks are the stored
    spatial blocks (x, y, z, n) of one of ours, None for another tool's image
    and for our format 1 (its blocks are voxel-major: rechunked as read)."""
    _require_present(url, storage_options)
    kind, _, group = _inspect(url, storage_options)
    if kind == "foreign":
        view, meta = _foreign_image(url, group)
        return view.shape, meta, None
    array, meta = open_dwi_array(url, storage_options)
    return tuple(array.shape), meta, (tuple(array.chunks) if kind == "ours" else None)


def store_state(url, storage_options=None) -> str:
    """What is at ``url``, for deciding whether to read, resume or replace it.

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional

    Returns
    -------
    str
        ``'absent'``: nothing there. ``'complete'``: a DWI store of ours
        marked complete (all shards were verified when it was marked).
        ``'incomplete'``: a store of ours whose writing did not finish; its
        array can be opened with ``open_dwi_array(url,
        require_complete=False, mode='r+')`` and written further.
        ``'invalid'``: something else: not our DWI store (no metadata,
        metadata cut short, another tool's image), one from a newer format,
        an unfinished one of format 1, or one whose array or attributes are
        missing or inconsistent (e.g. a creation that was killed). Only
        replacing it helps.

    Raises
    ------
    InputError
        Only when the storage itself fails (access denied, no connection).
    """
    if not exists(url, storage_options):
        return "absent"
    kind, attrs, group = _inspect(url, storage_options)
    if kind not in ("ours", "pending", "legacy"):
        return "invalid"
    array, _ = _dwi_array(url, storage_options, kind, attrs, group, "r")
    if array is None:
        return "invalid"
    if kind == "pending" or not attrs.get("complete", False):
        return "incomplete" if kind == "pending" else "invalid"
    return "complete"


def verify_all_chunks(url_or_array, storage_options=None) -> None:
    """Check that every shard (chunk, for format 1) of a store exists.

    With empty shards written too (see the module docstring), a missing
    one means a write that failed or never happened.

    Parameters
    ----------
    url_or_array : str, os.PathLike or DwiArray
        The store, or its array as returned by :func:`create_dwi_store` or
        :func:`open_dwi_array`.
    storage_options : dict, optional
        For a URL.

    Raises
    ------
    InputError
        Naming the store and how many shards are missing; or if the store
        cannot be read.
    """
    if isinstance(url_or_array, DwiArray):
        array, url = url_or_array, _array_url(url_or_array.zarr)
    else:
        url = os.fspath(url_or_array)
        array, _ = open_dwi_array(url, storage_options, require_complete=False)
    with user_errors(url, "reading"):
        # one fresh listing of the array's objects
        missing, total = missing_chunks(array)
    if missing:
        raise InputError(f"{url} is incomplete: {len(missing)} of its {total} chunks "
                         "were not written")


def mark_complete(url, storage_options=None) -> None:
    """Record that all data of the store at ``url`` is written, once checked:
    the root group (OME image, our attributes, consolidated metadata) is
    written, and only then the pending state removed.

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional

    Raises
    ------
    InputError
        If any shard is missing (:func:`verify_all_chunks`); the store then
        stays incomplete.
    """
    kind, attrs, _ = _inspect(url, storage_options)
    if kind == "ours" and attrs.get("complete", False):
        verify_all_chunks(url, storage_options)
        return
    if kind != "pending":
        _refuse_kind(url, kind)
        raise InputError(f"{os.fspath(url)} cannot be completed (format {attrs.get('version')})")
    verify_all_chunks(url, storage_options)
    meta = DwiMeta.from_json(attrs)
    store = zarr_store(url, storage_options)
    with user_errors(url, "writing"), warnings.catch_warnings():
        # Zarr warns that consolidated metadata is not in the v3 spec yet;
        # readers that know it (xarray) open the store in one read
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        zarr.create_group(store, zarr_format=3, attributes={
            # no name: a store's bytes do not depend on where it was written
            "ome": ome.ome_attributes(meta),
            ATTRS_KEY: {**attrs, "complete": True}})
        sync(store.delete(PENDING_KEY))
        zarr.consolidate_metadata(store, zarr_format=3)


def is_complete(url, storage_options=None) -> bool:
    """Whether the store at ``url`` is one of ours, completely written.

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional

    Returns
    -------
    bool
    """
    return store_state(url, storage_options) == "complete"


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
