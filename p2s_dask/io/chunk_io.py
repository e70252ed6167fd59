"""Chunks of a stored DWI array, read and written without Zarr's machinery.

Zarr 3 runs every read and write through one event loop thread: a chunk's
bytes are decoded in a worker thread, but copied into (or out of) the
caller's array on the loop's thread, so Dask's threads queue up behind each
other there, and every chunk passes through two or three fresh buffers. For
the arrays our stores hold (one regular grid of objects, raw bytes in native
order, optionally Blosc, optionally sharded with an index at the end) an
object is read and decoded straight into the block a task returns, or
encoded from the block a task computed, in the task's own thread (Blosc
releases the GIL). The stored bytes are what Zarr reads and writes; arrays
with other codecs go through Zarr.

:class:`DwiArray` shows a store's array in NIfTI's axis order
(x, y, z, volumes) whatever its stored order; for the NIfTI-Zarr layout
(t, z, y, x) a volume-major block (a NIfTI slab, a prediction) is the C
order of the stored array, so it is stored without a copy.
:class:`ForeignArray` shows another tool's image the same way, for reading
through Zarr (any codecs, Zarr v2 or v3, any axis order).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import mmap
import os
import sys
import threading
import uuid
from dataclasses import dataclass

import dask.array as da
import google_crc32c
import numpy as np
import numcodecs.blosc
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from ..errors import DataError, InputError
from .background import BackgroundWriter, WriterPool
from .direct_io import ALIGN, RunWriter
from .axis_order import to_c_order, to_f_order
from .scratch import for_each_block
from .urls import user_errors

# a chunk's presence must mean it was written (see zarr_store's docstring)
ARRAY_CONFIG = {"write_empty_chunks": True}
_EMPTY = 2 ** 64 - 1  # an absent inner chunk in a shard index


def grid(array) -> tuple:
    """The shape of one stored object of a zarr array: its shard, or chunk."""
    return tuple(getattr(array, "shards", None) or array.chunks)


class _StoredArray:
    """What every stored array seen in NIfTI's axis order shares: the Zarr
    array (``.zarr``) and what it says of itself."""

    ndim = 4

    @property
    def dtype(self):
        return self.zarr.dtype

    @property
    def store(self):
        return self.zarr.store


class DwiArray(_StoredArray):
    """A stored array seen in NIfTI's axis order (x, y, z, volumes).

    Parameters
    ----------
    array : zarr.Array
        As stored: ``(t, z, y, x)`` (``reverse=True``, the NIfTI-Zarr
        layout) or ``(x, y, z, n)`` (our format-1 stores).
    reverse : bool
    complete : bool, optional
        The store is one of ours that its writer marked complete, having
        checked that every stored object was there: a missing one is then
        damage, not the fill value (see :func:`missing_chunk`).
    """

    def __init__(self, array, reverse: bool = True, complete: bool = False):
        self.zarr, self.reverse, self.complete = array, bool(reverse), bool(complete)

    def axes(self, t) -> tuple:
        """A per-axis tuple between stored and NIfTI order (its own inverse)."""
        return tuple(reversed(tuple(t))) if self.reverse else tuple(t)

    @property
    def shape(self):
        return self.axes(self.zarr.shape)

    @property
    def chunks(self):
        """The shape of one stored object (all volumes of a spatial block)."""
        return self.axes(grid(self.zarr))

    def native_region(self, region) -> tuple:
        """``region`` (NIfTI order) normalised, in stored order."""
        return self.axes(_normalized_region(self, region))

    def native_values(self, values):
        """``values`` (NIfTI order) in stored order, C-contiguous where it can
        be without a copy (a Fortran-ordered block)."""
        values = np.asarray(values)
        if not self.reverse or values.ndim == 0:
            return values
        if values.ndim == 4 and not values.flags.f_contiguous:
            values = to_f_order(values)
        return values.T

    def __getitem__(self, region):
        """Values of a region of slices, read through Zarr, NIfTI order."""
        out = self.zarr[self.native_region(region)]
        return out.T if self.reverse else out

    def __setitem__(self, region, values):
        """Write a region of slices through Zarr (NIfTI order)."""
        self.zarr[self.native_region(region)] = self.native_values(values)


class ForeignArray(_StoredArray):
    """Another tool's image array seen in NIfTI's axis order (x, y, z,
    volumes), for reading: any axis order, Zarr v2 or v3, any codecs and
    chunking (Zarr decodes it), axes of length 1 (a channel) left out.

    Parameters
    ----------
    array : zarr.Array
    order : tuple of 4 ints
        The stored axis of x, y, z and the volumes.
    drop : tuple of ints, optional
        Stored axes of length 1 that NIfTI does not have.
    """

    complete = False  # a missing chunk is the fill value (the Zarr specification)

    def __init__(self, array, order, drop=()):
        self.zarr, self.order, self.drop = array, tuple(order), tuple(drop)
        kept = [i for i in range(array.ndim) if i not in self.drop]
        # where each NIfTI axis is once the dropped axes are indexed away
        self._perm = tuple(kept.index(i) for i in self.order)

    @property
    def shape(self):
        return tuple(self.zarr.shape[i] for i in self.order)

    @property
    def chunks(self):
        """One stored chunk's shape (clipped to the image), NIfTI order."""
        return tuple(min(grid(self.zarr)[i], self.zarr.shape[i]) for i in self.order)

    def _native_region(self, region) -> tuple:
        region = _normalized_region(self, region)
        native = [0] * self.zarr.ndim
        for axis, s in zip(self.order, region):
            native[axis] = s
        return tuple(native)

    def __getitem__(self, region):
        """Values of a region of slices, NIfTI order (a transposed view)."""
        return self.zarr[self._native_region(region)].transpose(self._perm)

    def to_dask(self) -> da.Array:
        """The image as a lazy dask array, one task per stored chunk."""
        values = da.from_zarr(self.zarr)
        if self.drop:
            values = values[tuple(0 if i in self.drop else slice(None)
                                  for i in range(values.ndim))]
        return values.transpose(self._perm)


def _native(array):
    """``(zarr array, DwiArray or None)`` of what a caller passed."""
    if isinstance(array, ForeignArray):
        return array.zarr, None
    return (array.zarr, array) if isinstance(array, DwiArray) else (array, None)


def read_chunks(array, url=None) -> da.Array:
    """A lazy dask array of a stored array, one task per stored chunk.

    Each task reads its chunk's bytes and decodes them straight into the
    block it returns (see :class:`_ChunkCodec`), in the task's own thread:
    Blosc runs without the GIL, and nothing goes through Zarr's event loop,
    whose single thread would otherwise copy every decoded chunk of every
    task into place one after the other. Arrays whose codecs this module
    does not write fall back to :func:`dask.array.from_zarr`.

    A chunk missing from the store reads as the fill value, as the Zarr
    specification says, unless ``array`` is a :class:`DwiArray` of a store
    we completed (see :func:`missing_chunk`).

    Parameters
    ----------
    array : DwiArray, ForeignArray or zarr.Array
    url : str, optional
        The store, for error messages (default: from the array).

    Returns
    -------
    dask.array.Array
        Chunked as stored, in the axis order of ``array`` (NIfTI order for a
        DwiArray); every block is the stored chunk itself (C-contiguous in
        stored order: Fortran-contiguous for the NIfTI-Zarr layout).

    Raises
    ------
    DataError
        When computed, for a damaged chunk; at once, for a missing one of a
        store we completed whose codecs Zarr decodes (found by one listing).
    """
    if isinstance(array, ForeignArray):
        # another tool's codecs and axis order: Zarr decodes, Dask transposes
        return array.to_dask()
    native, view = _native(array)
    url = _array_url(native) if url is None else os.fspath(url)
    codec = _ChunkCodec.of(native)
    if codec is None:
        # Zarr reads a missing chunk as the fill value: look for them first
        require_all_chunks(array, url)
        values = da.from_zarr(native)
        return values.transpose() if view is not None and view.reverse else values
    reader = _ChunkReader(native, codec, url, reverse=view is not None and view.reverse,
                          complete=view is not None and view.complete)
    shape = array.shape
    chunks = da.core.normalize_chunks(array.chunks if view is not None else grid(native), shape)
    return da.map_blocks(
        _read_chunk_task, dtype=native.dtype, chunks=chunks,
        meta=np.empty((0,) * len(shape), native.dtype), reader=reader,
        name=f"read-zarr-{uuid.uuid4().hex}")



def _array_url(array) -> str:
    """The store's location, for messages."""
    store = array.store
    if isinstance(store, LocalStore):
        return str(store.root)
    if isinstance(store, FsspecStore):
        return store.fs.unstrip_protocol(store.path)
    return str(store)



# ---------------------------------------------------------------------------
# What a damaged or missing chunk means.


def damaged(url, key, why) -> DataError:
    """The error for a stored chunk that cannot be used: one line naming the
    store and the chunk, and why (a DataError: the run keeps nothing)."""
    return DataError(f"reading {url}: chunk {key} is damaged: {why}")


_LOST = "it is missing, though it was there when p2s-dask completed the store"


def missing_chunk(url, key, complete: bool) -> None:
    """The rule for a chunk that is not in its store (every reader's).

    In a store we completed (``complete``: its writer checked that every
    stored object was there before marking it complete, and wrote chunks
    equal to the fill value too) a missing one was lost since: damage.
    Elsewhere (another tool's store, or one of ours still being written) a
    missing chunk is the fill value, as the Zarr specification says: the
    caller reads it as such.

    Raises
    ------
    DataError
        Naming the store and the chunk, for a store we completed.
    """
    if complete:
        raise damaged(url, key, _LOST)


def missing_chunks(array) -> tuple[list, int]:
    """The stored objects (shards, or chunks) of an array that are absent,
    from one listing of its store (no object is read).

    Parameters
    ----------
    array : DwiArray or zarr.Array

    Returns
    -------
    missing : list of str
        Their store keys, in C order of the grid.
    total : int
        How many objects the array has.
    """
    native, _ = _native(array)
    counts = [math.ceil(s / g) for s, g in zip(native.shape, grid(native))]
    prefix = f"{native.path}/" if native.path else ""
    listed = sync(_listed_keys(native.store, prefix))
    expected = (_chunk_key(native.metadata, native.path, c)
                for c in itertools.product(*(range(n) for n in counts)))
    return [key for key in expected if key not in listed], math.prod(counts)


async def _listed_keys(store, prefix) -> set:
    # an object being written sits under a temporary name until renamed,
    # and matches no chunk key
    return {key async for key in store.list_prefix(prefix)}


def require_all_chunks(array, url) -> None:
    """Apply :func:`missing_chunk` to every chunk of ``array`` at once, from
    one listing, where no reader of ours sees each chunk (Zarr reads them).

    Raises
    ------
    DataError
        Naming the store and its first missing chunk, for a :class:`DwiArray`
        of a store we completed.
    """
    if not (isinstance(array, DwiArray) and array.complete):
        return
    with user_errors(url, "reading"):
        missing, total = missing_chunks(array)
    if missing:
        raise damaged(url, missing[0], f"{_LOST} ({len(missing)} of its {total} chunks "
                      "are missing)")


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
    """``region`` normalised; ValueError unless it is aligned to the stored
    objects (chunks, or shards) of the zarr array ``array``."""
    region = _normalized_region(array, region)
    for s, c, n in zip(region, grid(array), array.shape):
        if s.start % c or (s.stop % c and s.stop != n):
            raise ValueError(f"region {region} is not aligned to the chunks {grid(array)}")
    return region


def _to_native(array, region, values):
    """The zarr array, region and values of a write, in stored order."""
    native, view = _native(array)
    if view is None:
        return native, region, values
    return native, view.native_region(region), view.native_values(values)


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
    array : DwiArray or zarr.Array
        From :func:`create_dwi_store` or :func:`open_dwi_array` (``mode='r+'``).
    region : tuple of slices or Ellipsis
        In the axis order of ``array`` (NIfTI order for a DwiArray).
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
    array, region, values = _to_native(array, region, values)
    region = _chunk_aligned(array, region)
    if not array.config.write_empty_chunks:
        array = array.with_config(ARRAY_CONFIG)
    pieces = _chunk_regions(region, grid(array))
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
    # sharded: the inner chunks' shape, and whether the index has a CRC32C
    inner: tuple | None = None
    index_crc: bool = False

    @classmethod
    def of(cls, array) -> "_ChunkCodec | None":
        """The codec of a Zarr v3 array whose chunks this module can read and
        write itself (regular grid, native byte order, [Blosc]), else None."""
        meta = getattr(array, "metadata", None)
        if not isinstance(array, zarr.Array) or getattr(meta, "zarr_format", None) != 3:
            return None
        shape = getattr(meta.chunk_grid, "chunk_shape", None)
        codecs = tuple(meta.codecs)
        if shape is None or tuple(shape) != grid(array) or not codecs:
            return None
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            return cls._sharded(array, codecs[0], tuple(int(g) for g in shape))
        return cls._plain(array, codecs, shape)

    @classmethod
    def _sharded(cls, array, sharding, shape) -> "_ChunkCodec | None":
        """A sharded array's codec: its inner chunks' must be ours, its
        index at the end, with or without a checksum."""
        inner = tuple(int(c) for c in sharding.chunk_shape)
        index = tuple(sharding.index_codecs)
        if (_value(sharding.index_location) != "end" or not index
                or not isinstance(index[0], BytesCodec) or _value(index[0].endian) != "little"
                or not all(isinstance(c, Crc32cCodec) for c in index[1:]) or len(index) > 2):
            return None
        plain = cls._plain(array, tuple(sharding.codecs), inner)
        if plain is None or any(s % i for s, i in zip(shape, inner)):
            return None
        return cls(shape, plain.dtype, plain.fill_value, plain.blosc, inner, len(index) == 2)

    @classmethod
    def _plain(cls, array, codecs, shape) -> "_ChunkCodec | None":
        meta = array.metadata
        dtype = np.dtype(array.dtype)
        if not isinstance(codecs[0], BytesCodec) or dtype.kind not in "biuf":
            return None
        if dtype.itemsize > 1 and (_value(codecs[0].endian) != _NATIVE or not dtype.isnative):
            return None
        nbytes = int(np.prod(shape)) * dtype.itemsize
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
        return cls(tuple(int(g) for g in shape), dtype, meta.fill_value, blosc)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    @property
    def inner_codec(self) -> "_ChunkCodec":
        """The codec of one inner chunk of a shard."""
        return _ChunkCodec(self.inner, self.dtype, self.fill_value, self.blosc)

    def inner_regions(self) -> list:
        """Each inner chunk's slices within a shard, in the index's (C) order."""
        axes = [[slice(a, a + i) for a in range(0, s, i)]
                for s, i in zip(self.chunk_shape, self.inner)]
        return list(itertools.product(*axes))

    def decode(self, data, out: np.ndarray) -> None:
        """Stored bytes into ``out`` (a C-contiguous chunk or shard)."""
        if self.inner is not None:
            self._decode_shard(data, out)
            return
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

    @property
    def index_bytes(self) -> int:
        """The size of a shard's index (its last bytes)."""
        count = math.prod(s // i for s, i in zip(self.chunk_shape, self.inner))
        return 16 * count + 4 * self.index_crc

    def _index(self, data) -> np.ndarray:
        """A shard's ``(offset, nbytes)`` rows, checked against its size."""
        size = self.index_bytes
        if len(data) < size:
            raise ValueError(f"it holds {len(data)} bytes, less than its index ({size})")
        return self.parse_index(np.frombuffer(data, np.uint8, size, len(data) - size),
                                len(data))

    def parse_index(self, raw: np.ndarray, shard_bytes: int) -> np.ndarray:
        """The index from its bytes ``raw``, checked against its checksum and
        the size of its shard."""
        if len(raw) != self.index_bytes or shard_bytes < len(raw):
            raise ValueError(f"it holds {shard_bytes} bytes, less than its index")
        if self.index_crc and google_crc32c.value(raw[:-4].tobytes()) != int(
                raw[-4:].view("<u4")[0]):
            raise ValueError("its index fails its checksum")
        index = raw[:len(raw) - 4 * self.index_crc].view("<u8").reshape(-1, 2)
        body = shard_bytes - len(raw)
        live = index[:, 0] != _EMPTY
        if np.any(index[live, 0] + index[live, 1] > body):
            raise ValueError("its index points past its data")
        return index

    def _decode_shard(self, data, out: np.ndarray) -> None:
        inner = self.inner_codec
        view = memoryview(data).cast("B")
        for (offset, nbytes), region in zip(self._index(data), self.inner_regions()):
            target = out[region]
            if offset == _EMPTY:
                target[...] = self.fill_value
                continue
            piece = view[int(offset):int(offset + nbytes)]
            if target.flags.c_contiguous:
                inner.decode(piece, target)
            else:
                whole = np.empty(self.inner, self.dtype)
                inner.decode(piece, whole)
                target[...] = whole

    def _encode_shard(self, shard: np.ndarray):
        inner = self.inner_codec
        parts, index, offset = [], [], 0
        for region in self.inner_regions():
            part = inner.encode(np.ascontiguousarray(shard[region]))
            parts.append(part)
            index.append((offset, len(part)))
            offset += len(part)
        table = np.asarray(index, "<u8").tobytes()
        if self.index_crc:
            table += np.uint32(google_crc32c.value(table)).astype("<u4").tobytes()
        return b"".join([*(bytes(p) for p in parts), table])

    def encode(self, chunk: np.ndarray):
        """A C-contiguous chunk (or shard) as stored bytes (a view of it when
        raw and not sharded)."""
        if self.inner is not None:
            return self._encode_shard(chunk)
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
    key layout, its :class:`_ChunkCodec`, and whether a missing chunk is
    damage (``complete``: see :func:`missing_chunk`)."""

    def __init__(self, array, codec: _ChunkCodec, url: str, reverse: bool = False,
                 complete: bool = False):
        self.array_meta = array.metadata
        self.store, self.path = array.store, array.path
        self.shape, self.codec, self.url = tuple(array.shape), codec, url
        self.reverse, self.complete = reverse, complete

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
            missing_chunk(self.url, self.key(coords), self.complete)
            return np.full(shape, codec.fill_value, codec.dtype)
        whole = np.empty(codec.chunk_shape, codec.dtype)
        try:
            codec.decode(data, whole)
        except (ValueError, RuntimeError) as exc:
            raise damaged(self.url, self.key(coords), exc) from exc
        finally:
            if isinstance(data, mmap.mmap):
                with contextlib.suppress(BufferError):  # else it goes with the object
                    data.close()
        if shape == codec.chunk_shape:
            return whole
        return np.ascontiguousarray(whole[tuple(slice(0, n) for n in shape)])


def _read_chunk_task(block_info=None, reader: _ChunkReader = None):
    coords = block_info[None]["chunk-location"]
    if not reader.reverse:
        return reader.read(coords)
    # NIfTI order: the stored chunk's transpose, a Fortran-ordered view
    return reader.read(tuple(reversed(coords))).T


# ---------------------------------------------------------------------------
# Chunks written by background threads.


class ChunkWriter(BackgroundWriter):
    """Stores encoded chunks of one store from background threads.

    A prediction task encodes its chunk (CPU work, in its own thread) and
    hands the bytes over (see :class:`.background.BackgroundWriter`: a
    short queue, errors raised in the caller). Each thread keeps one aligned
    buffer for direct writes (see :func:`_write_file`), reused from chunk to
    chunk.

    Parameters
    ----------
    url : str
        The store, named in error messages.
    depth, threads : int, optional
    """

    def __init__(self, url, depth: int = 1, threads: int = 2):
        self.url = url
        self._local = threading.local()
        super().__init__(depth, threads, name="p2s-chunk-writer")

    def submit(self, store, key, data, then=None) -> None:
        """Queue one object (waits while the queue is full); raises the
        error of an earlier write, if any."""
        super().submit((store, key, data), then)

    def write(self, store, key, data) -> None:
        with user_errors(self.url, "writing"):
            _put_chunk(store, key, data, self._scratch)

    def _scratch(self, n: int) -> np.ndarray:
        """This thread's aligned buffer, at least ``n`` bytes."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None or buffer.size < n:
            self._local.buffer = buffer = None  # the old one freed first
            self._local.buffer = buffer = _aligned(n)
        return buffer[:n]


_WRITERS = WriterPool()


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
    array, region, values = _to_native(array, region, values)
    region = _chunk_aligned(array, region)
    codec = _ChunkCodec.of(array)
    if (codec is None or len(_chunk_regions(region, grid(array))) != 1
            or _on_distributed_worker()):
        write_region(array, region, values, url)
        if then is not None:
            then()
        return
    coords, data = codec.encode_region(region, values)
    del values
    key = _chunk_key(array.metadata, array.path, coords)
    _WRITERS.get(url, lambda: ChunkWriter(url)).submit(array.store, key, data, then)


def finish_region_writes(url) -> bool:
    """Wait for this process's background writes to ``url`` (if any) and
    raise the first error. Run on every worker (``client.run``) once all
    tasks are done. Returns whether there was a writer."""
    return _WRITERS.finish(url)

# ---------------------------------------------------------------------------
# Runs of volumes read from shards: what writing a NIfTI (volume after
# volume) needs from a store. A shard's inner chunks are one per volume,
# stored in volume order, so the volumes v0..v1 of a block are one byte
# range of its object, found in its index.


def reads_volumes(array) -> bool:
    """Whether :func:`read_volumes` reads ``array`` itself (our layout: one
    shard per block of all volumes, one inner chunk per volume)."""
    if not isinstance(array, DwiArray) or not array.reverse:
        return False
    codec = _ChunkCodec.of(array.zarr)
    return (codec is not None and codec.inner is not None
            and codec.inner == (1, *codec.chunk_shape[1:])
            and codec.chunk_shape[0] == array.shape[3])


def _get_range(store, key, start: int, stop: int):
    """Bytes ``start:stop`` of an object (a buffer)."""
    if isinstance(store, LocalStore):
        path = os.path.join(str(store.root), *key.split("/"))
        with open(path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), stop - start, start)
    else:
        from zarr.abc.store import RangeByteRequest
        buffer = sync(store.get(key, prototype=default_buffer_prototype(),
                                byte_range=RangeByteRequest(start, stop)))
        data = b"" if buffer is None else buffer.to_bytes()
    if len(data) != stop - start:
        raise ValueError(f"it ends before byte {stop}")
    return data


def _shard_size(store, key) -> int:
    if isinstance(store, LocalStore):
        return os.path.getsize(os.path.join(str(store.root), *key.split("/")))
    return int(sync(store.getsize(key)))


def _volumes_of_shard(reader: _ChunkReader, coords, v0, v1, out) -> None:
    """Volumes ``v0:v1`` of one shard (grid position ``coords``, stored
    order) decoded into ``out`` (its region of the slab, stored order)."""
    codec, store, key = reader.codec, reader.store, reader.key(coords)
    try:
        size = _shard_size(store, key)
    except FileNotFoundError:
        missing_chunk(reader.url, key, reader.complete)
        out[...] = codec.fill_value
        return
    # a shard cut shorter than its index is said so by parse_index
    tail = np.frombuffer(_get_range(store, key, max(0, size - codec.index_bytes), size),
                         np.uint8)
    rows = codec.parse_index(tail, size)[v0:v1]
    if np.any(rows[:, 0] == _EMPTY):
        raise ValueError("a volume of it was never written")
    start, stop = int(rows[:, 0].min()), int((rows[:, 0] + rows[:, 1]).max())
    data = memoryview(_get_range(store, key, start, stop))
    inner = codec.inner_codec
    whole = np.empty(codec.inner, codec.dtype)
    cut = tuple(slice(0, n) for n in out.shape[1:])
    for j, (offset, nbytes) in enumerate(rows):
        inner.decode(data[int(offset) - start:int(offset + nbytes) - start], whole)
        out[j] = whole[0][cut]



def read_volumes(array: DwiArray, v0: int, v1: int, z0: int, z1: int, url: str,
                 workers: int = 1) -> np.ndarray:
    """Volumes ``v0:v1`` of z-planes ``z0:z1`` (whole blocks in z) of a store
    in our layout (:func:`reads_volumes`), reading of each shard only its
    index and the byte range of those volumes.

    Returns
    -------
    ndarray, shape (x, y, z1 - z0, v1 - v0)
        Fortran-ordered: volume after volume, as a NIfTI holds them.
    """
    native = array.zarr
    codec = _ChunkCodec.of(native)
    reader = _ChunkReader(native, codec, url, complete=array.complete)
    _, cz, cy, cx = codec.chunk_shape
    _, nz, ny, nx = native.shape
    out = np.empty((v1 - v0, z1 - z0, ny, nx), codec.dtype)
    shards = [(k, j, i) for k in range(z0 // cz, -(-z1 // cz))
              for j in range(-(-ny // cy)) for i in range(-(-nx // cx))]

    def read(_, coords):
        k, j, i = coords
        view = out[:, k * cz - z0:min((k + 1) * cz, nz) - z0, j * cy:(j + 1) * cy,
                   i * cx:(i + 1) * cx]
        try:
            with user_errors(url, "reading"):
                _volumes_of_shard(reader, (0, k, j, i), v0, v1, view)
        except InputError:
            raise  # a storage error, or a missing chunk already said
        except (ValueError, RuntimeError) as exc:
            raise damaged(url, reader.key((0, k, j, i)), exc) from exc
        return view.nbytes

    for_each_block(shards, read, workers=workers)
    return out.T


class ShardAppender:
    """Builds the shards of a new local store from runs of volumes (a NIfTI's
    order), with no scratch copy of the data.

    A shard may hold its inner chunks in any order, its index says where:
    each volume's inner chunk is appended to its shard's file as the volume
    arrives, and the index is written last. Until :meth:`finish` each file
    has a temporary name, so a shard that exists is whole.

    Parameters
    ----------
    array : DwiArray
        Of a local store in our layout (:func:`reads_volumes`), just created.
    url : str
        For messages.
    """

    def __init__(self, array: DwiArray, url: str):
        native = array.zarr
        self.codec = _ChunkCodec.of(native)
        self.reader = _ChunkReader(native, self.codec, url)
        self.root, self.url = str(native.store.root), url
        self.index: dict = {}
        self.ends: dict = {}
        self.tag = uuid.uuid4().hex

    def _path(self, coords, final=False) -> str:
        path = os.path.join(self.root, *self.reader.key(coords).split("/"))
        return path if final else f"{path}.{self.tag}.partial"

    def append(self, slab: np.ndarray, v0: int, z0: int) -> None:
        """Volumes ``v0:v0+k`` of z-planes ``z0:z0+p`` (whole blocks in z).

        Parameters
        ----------
        slab : ndarray, shape (x, y, p, k)
        """
        n, cz, cy, cx = self.codec.chunk_shape
        nx, ny = slab.shape[:2]
        for k in range(z0 // cz, (z0 + slab.shape[2] + cz - 1) // cz):
            for j in range(-(-ny // cy)):
                for i in range(-(-nx // cx)):
                    piece = slab[i * cx:(i + 1) * cx, j * cy:(j + 1) * cy,
                                 k * cz - z0:(k + 1) * cz - z0]
                    self._append_shard((0, k, j, i), piece, v0)

    def _append_shard(self, coords, piece, v0) -> None:
        inner = self.codec.inner_codec
        index = self.index.setdefault(coords, np.full((self.codec.chunk_shape[0], 2), _EMPTY,
                                                       "<u8"))
        path = self._path(coords)
        if coords not in self.ends:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        # every volume's chunk in its own buffer: raw chunks are written from
        # it as they are (one gathered write, no joined copy)
        k = piece.shape[3]
        chunks = np.full((k, *self.codec.inner[1:]), self.codec.fill_value, self.codec.dtype)
        chunks[(slice(None), *(slice(0, s) for s in piece.shape[:3][::-1]))] = piece.T
        parts, offset = [], self.ends.get(coords, 0)
        for v in range(k):
            parts.append(memoryview(inner.encode(chunks[v])).cast("B"))
            index[v0 + v] = (offset, len(parts[-1]))
            offset += len(parts[-1])
        with user_errors(self.url, "writing"):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                _writev_all(fd, parts)
            finally:
                os.close(fd)
        self.ends[coords] = offset

    def finish(self) -> None:
        """Write every shard's index and give it its final name; ValueError
        if a volume of any shard is missing (a bug in the caller)."""
        for coords, index in self.index.items():
            if np.any(index[:, 0] == _EMPTY):
                raise ValueError(f"shard {coords} lacks volumes")
            table = index.tobytes()
            if self.codec.index_crc:
                table += np.uint32(google_crc32c.value(table)).astype("<u4").tobytes()
            with user_errors(self.url, "writing"):
                with open(self._path(coords), "ab") as f:
                    f.write(table)
                os.replace(self._path(coords), self._path(coords, final=True))

    def abort(self) -> None:
        """Remove the unfinished shards."""
        for coords in self.index:
            with contextlib.suppress(OSError):
                os.unlink(self._path(coords))


def _writev_all(fd, parts) -> None:
    """All of ``parts`` (byte buffers) appended, in order, few calls."""
    parts = [p for p in parts if len(p)]
    while parts:
        done = os.writev(fd, parts[:512])
        while parts and done >= len(parts[0]):
            done -= len(parts[0])
            parts.pop(0)
        if done:
            parts[0] = parts[0][done:]
