"""Sequential NIfTI (.nii, .nii.gz) reading and writing, one slab at a time.

A NIfTI file is a header followed by the voxel data in Fortran order, so each
3D volume (and each z-plane of a volume) is one contiguous run of bytes. A
gzip stream cannot be read at random, so we never seek: :class:`NiftiReader`
reads the data from start to end exactly once, in pieces the caller chooses,
and :class:`NiftiWriter` writes it the same way.

Why not nibabel's ``ArrayProxy``: slicing it reopens the file and, for gzip,
decompresses from the start for every slice unless ``keep_file_open`` is set,
and it only takes paths or a single file object. Reading the bytes ourselves
makes "one pass" explicit, lets us read straight into a preallocated buffer,
and lets us say "truncated" in one line. nibabel still parses and checks the
header.

gzip goes through ISA-L (the ``isal`` package) when it is importable: it
inflates about twice as fast as zlib, and its threaded writer deflates on
several cores at a fraction of zlib's CPU. zlib (the standard library) is the
fallback, and ``P2S_DASK_GZIP=zlib`` (or ``gzip_backend="zlib"``) forces it.
Both write ordinary gzip that any reader takes, and both read multi-member
files with zero padding after the last member.
"""

from __future__ import annotations

import gzip
import operator
import os
import posixpath
import uuid
import zlib

import numpy as np

from ..errors import DataError, InputError, OutputExistsError
from .meta import DwiMeta, header_class
from .urls import fs_and_path, is_local, local_path, user_errors

__all__ = ["GZIP_ENV", "NiftiReader", "NiftiWriter", "resolve_gzip_backend"]

_GZIP_MAGIC = b"\x1f\x8b"
# bytes per zlib call (compressed ones when reading, also the read size;
# raw ones when writing): large enough that per-call costs vanish, small
# enough that the piece stays in cache
_INPUT_BLOCK = 256 << 10
# most decompressed bytes made per zlib call, bounding transients
_OUTPUT_BLOCK = 8 << 20
# object stores read ahead and upload in parts held in memory; 16 MiB parts
# keep that small and still allow files up to ~160 GB on S3 (10,000 parts)
_PART_BYTES = 16 << 20
# decompressed bytes asked of ISA-L's reader per call: GzipFile has no real
# readinto (it reads into a new bytes object and copies), so a bounded piece
# keeps that transient small
_READ_PIECE = 1 << 20

GZIP_ENV = "P2S_DASK_GZIP"
_BACKENDS = ("auto", "isal", "zlib")
# ISA-L's threaded writer: blocks handed to the compressing threads (each is
# deflated with the previous block's last 32 KiB as its dictionary, so the
# size barely depends on it: +0.02% against 1 MiB blocks), and at most this
# many threads; about five blocks per thread are in flight (queued, being
# compressed, compressed, being written, the output buffer), so this also
# bounds the writer's memory: under 6 MiB
_ISAL_BLOCK = 256 << 10
_ISAL_MAX_THREADS = 4


def resolve_gzip_backend(requested: str | None = None) -> str:
    """The gzip implementation to use: ``"isal"`` or ``"zlib"``.

    Parameters
    ----------
    requested : {"auto", "isal", "zlib"}, optional
        Default ``$P2S_DASK_GZIP``, else ``"auto"``: ISA-L when the ``isal``
        package is importable, else zlib (the standard library).

    Raises
    ------
    InputError
        For an unknown name, or ``"isal"`` when isal is not importable.
    """
    choice = requested if requested is not None else os.environ.get(GZIP_ENV) or "auto"
    choice = str(choice).strip().lower()
    if choice not in _BACKENDS:
        raise InputError(f"unknown gzip backend {choice!r} (from ${GZIP_ENV} or "
                         f"gzip_backend=); use one of {', '.join(_BACKENDS)}")
    if choice == "zlib":
        return "zlib"
    try:
        import isal.igzip  # noqa: F401
        import isal.igzip_threaded  # noqa: F401
    except ImportError:
        if choice == "isal":
            raise InputError("the gzip backend 'isal' was asked for but the isal package "
                             "is not installed (pip install isal)") from None
        return "zlib"
    return "isal"


def _isal_level(level: int) -> int:
    """ISA-L's level (0-3) for a gzip level (1-9).

    Measured on noisy DWI phantoms (benchmarks/bench_gzip.py): ISA-L 1 gives
    zlib 1's size within 1.5% (float32: 0.896 of the data against 0.901;
    int16: 0.582 against 0.577) at 4-14x less CPU, so it stands for zlib 1.
    On int16, ISA-L 2 is about zlib 2-4 in size and ISA-L 3 about zlib 6,
    each still at a fifth of zlib 1's CPU or less.
    ISA-L's level 0 is no "store" level (it still codes, and makes float data
    18% larger than it is), so gzip level 0 goes to zlib instead.
    """
    return 1 if level <= 1 else 2 if level <= 5 else 3


class _Truncated(Exception):
    """The compressed stream ended in the middle of a gzip member."""


class _Gunzip:
    """A forward-only gunzip of a binary file object.

    Faster than :class:`gzip.GzipFile` (no separate CRC pass: zlib checks the
    trailer itself) and fills a caller's buffer. Handles multi-member files
    (as written by ``pigz --independent`` or ``cat a.gz b.gz``) and ignores
    zero padding after the last member.
    """

    def __init__(self, raw):
        self._raw = raw
        self._input = b""
        self._output = memoryview(b"")  # decompressed, not yet handed out
        self._inflate = None  # the current member's decompressor, None between members
        self._raw_done = False

    def _next_input(self) -> bool:
        """Fetch more compressed bytes; False at the end of the file."""
        if self._raw_done:
            return False
        block = self._raw.read(_INPUT_BLOCK)
        if not block:
            self._raw_done = True
            return False
        self._input = block
        return True

    def _inflate_more(self) -> bool:
        """Decompress the next piece into ``_output``; False at the clean end."""
        while True:
            if not self._input and not self._next_input():
                if self._inflate is not None:
                    raise _Truncated()
                return False
            if self._inflate is None:
                if not self._input.strip(b"\x00"):
                    self._input = b""  # padding after the last member
                    continue
                self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
            # the cap only bites on extremely compressible input (e.g. zeros)
            out = self._inflate.decompress(self._input, _OUTPUT_BLOCK)
            if self._inflate.eof:
                self._input = self._inflate.unused_data
                self._inflate = None
            else:
                self._input = self._inflate.unconsumed_tail
            if out:
                self._output = memoryview(out)
                return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            if not self._output and not self._inflate_more():
                break
            n = min(len(view) - filled, len(self._output))
            view[filled:filled + n] = self._output[:n]
            self._output = self._output[n:]
            filled += n
        return filled

    def close(self) -> None:
        self._inflate = None
        self._input = b""
        self._output = memoryview(b"")


def _readinto_fully(stream, view: memoryview, piece: int | None = None) -> int:
    filled = 0
    while filled < len(view):
        end = len(view) if piece is None else min(len(view), filled + piece)
        got = stream.readinto(view[filled:end])
        if not got:
            break
        filled += got
    return filled


def _gunzip(raw, backend: str):
    """``(stream, piece, corrupt)``: a gunzipping reader of ``raw``, the most
    bytes to ask of it per call, and the exceptions that mean corrupt data
    (truncation is :class:`_Truncated` or EOFError for both)."""
    if backend == "isal":
        from isal import igzip, isal_zlib
        stream = igzip.IGzipFile(fileobj=raw, mode="rb")
        return stream, _READ_PIECE, (isal_zlib.error, gzip.BadGzipFile)
    return _Gunzip(raw), None, (zlib.error,)


class NiftiReader:
    """Reads one NIfTI file from start to end, exactly once.

    Parameters
    ----------
    url : str or os.PathLike
        ``.nii`` or ``.nii.gz`` (compression is detected from the content),
        local or any fsspec URL.
    storage_options : dict, optional
    gzip_backend : {"auto", "isal", "zlib"}, optional
        Which gzip implementation reads a ``.nii.gz``; default
        ``$P2S_DASK_GZIP``, else ISA-L when installed (see
        :func:`resolve_gzip_backend`).

    Attributes
    ----------
    meta : DwiMeta
        Header (with extensions), shape, dtype and scaling; no gradients.
    gzip_backend : str or None
        ``"isal"`` or ``"zlib"`` for a gzip file, None for a plain one.
    """

    def __init__(self, url, storage_options=None, *, gzip_backend=None):
        self.url = os.fspath(url)
        fs, path = fs_and_path(url, storage_options)
        with user_errors(self.url, "reading"):
            if is_local(url):
                self._file = open(path, "rb")
            else:
                if fs.isdir(path):
                    raise IsADirectoryError(path)
                # read ahead in bounded pieces (s3fs's default is 50 MB)
                self._file = fs.open(path, "rb", block_size=_PART_BYTES,
                                     cache_type="readahead")
        self._stream, self._piece, self._corrupt = self._file, None, ()
        self.gzip_backend = None
        try:
            magic = self._file.read(2)
            self._file.seek(0)
            if magic == _GZIP_MAGIC:
                self.gzip_backend = resolve_gzip_backend(gzip_backend)
                self._stream, self._piece, self._corrupt = _gunzip(self._file,
                                                                   self.gzip_backend)
            self._data_read = 0
            self.meta = self._read_header()
        except BaseException:
            self._file.close()
            raise

    # -- reading -------------------------------------------------------------

    def _fail(self, what: str):
        raise DataError(f"reading {self.url}: {what}")

    def _readinto(self, view: memoryview) -> int:
        try:
            with user_errors(self.url, "reading"):
                return _readinto_fully(self._stream, view, self._piece)
        except (_Truncated, EOFError):
            problem = "the file is truncated (the gzip stream ends early)"
        except self._corrupt as exc:
            problem = f"the file is corrupt ({' '.join(str(exc).split())})"
        self._fail(problem)

    def _read_bytes(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        if self._readinto(memoryview(buf)) != n:
            self._fail(f"the file ends inside the {what}; not a complete NIfTI file")
        return bytes(buf)

    def _read_header(self) -> DwiMeta:
        first = self._read_bytes(4, "header")
        sizes = {int.from_bytes(first, "little"), int.from_bytes(first, "big")}
        size = next((s for s in (348, 540) if s in sizes), None)
        if size is None:
            self._fail("not a NIfTI file (bad header size)")
        raw = first + self._read_bytes(size - 4, "header")
        klass = header_class(raw)
        unchecked = klass(raw, check=False)
        if unchecked["magic"].item() not in (b"n+1", b"n+2"):
            self._fail("not a single-file NIfTI (.nii) image; .hdr/.img pairs are not supported")
        try:
            # nibabel fixes what it can (as nibabel.load would) and refuses the rest
            hdr = klass(raw, check=True)
        except Exception as exc:
            hdr, problem = None, " ".join(str(exc).split())
        if hdr is None:
            self._fail(f"bad NIfTI header ({problem})")
        offset = int(hdr["vox_offset"])
        extra = self._read_bytes(offset - size, "header extensions") if offset > size else b""
        try:
            return DwiMeta.from_header(hdr, extra)
        except InputError as exc:
            problem = str(exc)
        self._fail(problem)

    @property
    def data_bytes(self) -> int:
        """Bytes of voxel data in the file."""
        return int(np.prod(self.meta.shape)) * self.meta.raw_dtype.itemsize

    def read_slab(self, shape) -> np.ndarray:
        """The next ``prod(shape)`` values, as they are in the file.

        Parameters
        ----------
        shape : tuple of ints
            E.g. ``(x, y, z, k)`` for the next k volumes, or ``(x, y, p, 1)``
            for the next p planes of a volume.

        Returns
        -------
        ndarray
            Fortran ordered, in the file's dtype and byte order
            (``meta.disk_dtype``).
        """
        disk = self.meta.disk_dtype
        out = np.empty(shape, dtype=disk, order="F")
        view = memoryview(out.reshape(-1, order="F")).cast("B")
        got = self._readinto(view)
        if got != len(view):
            self._fail(
                f"the file is truncated (the data ends after {self._data_read + got} "
                f"of {self.data_bytes} bytes)"
            )
        self._data_read += got
        if self._data_read == self.data_bytes and self.gzip_backend is not None:
            self._finish_gzip()
        return out

    def _finish_gzip(self) -> None:
        """Read the gzip stream to its end once the data is in.

        The last member's trailer (CRC and length) is only checked when it is
        read, and a reader that stops at the last voxel may never get to it:
        so a file cut inside the trailer, a wrong checksum or garbage after
        the stream would pass unnoticed. Bytes after the data inside the
        stream are allowed (nibabel ignores them too).
        """
        view = memoryview(bytearray(64 << 10))
        while self._readinto(view) == len(view):
            pass

    def close(self):
        try:
            if self._stream is not self._file:
                self._stream.close()
        finally:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ZlibGzip:
    """One gzip member through zlib, in the calling thread."""

    backend = "zlib"

    def __init__(self, file, level: int):
        self._file = file
        # wbits 16 + 15: zlib writes the gzip header (mtime 0) and trailer
        self._deflate = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)

    def write(self, view: memoryview) -> None:
        for start in range(0, len(view), _INPUT_BLOCK):
            out = self._deflate.compress(view[start:start + _INPUT_BLOCK])
            if out:
                self._file.write(out)

    def close(self) -> None:
        self._file.write(self._deflate.flush())

    def abort(self) -> None:
        self._deflate = None


class _Discardable:
    """Passes writes on to a file, or drops them once ``discarding`` is set."""

    def __init__(self, file):
        self._file = file
        self.discarding = False

    def write(self, data):
        if not self.discarding:
            self._file.write(data)
        return len(data)

    def flush(self):
        if not self.discarding:
            self._file.flush()


class _IsalGzip:
    """One gzip member through ISA-L's threaded writer.

    Blocks are deflated in parallel and written in order by a background
    thread; a write error there (a full disk, a failed upload) comes back
    from a later :meth:`write` or from :meth:`close`. The threads end when
    the thread that opened the writer ends, so open, write and close it in
    one thread (as ``zarr_to_nifti`` does).
    """

    backend = "isal"

    def __init__(self, file, level: int):
        from isal import igzip_threaded
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        self._sink = _Discardable(file)
        self._gzip = igzip_threaded.open(
            self._sink, "wb", compresslevel=_isal_level(level),
            threads=max(1, min(_ISAL_MAX_THREADS, cores)), block_size=_ISAL_BLOCK)

    def write(self, view: memoryview) -> None:
        self._gzip.write(view)

    def close(self) -> None:
        self._gzip.close()

    def abort(self) -> None:
        # closing is the writer's only public way to stop its threads; what
        # it still writes (the blocks in flight, the trailer) is dropped
        self._sink.discarding = True
        try:
            self._gzip.close()
        except Exception:
            pass


class NiftiWriter:
    """Writes a NIfTI file sequentially, under a temporary name until committed.

    The temporary file sits next to the destination (same folder or bucket
    prefix), so a crash never leaves a half-written file under the real name.
    Leaving the ``with`` block without :meth:`commit` deletes it.

    Parameters
    ----------
    url : str or os.PathLike
        Destination; ``.gz`` at the end means gzip.
    meta : DwiMeta
        Its header and extension bytes are written first, unchanged.
    overwrite : bool, optional
        Replace an existing destination on commit.
    storage_options : dict, optional
    compresslevel : int, optional
        gzip level 0-9; 1 (nibabel's default) is several times faster than 6
        and only slightly larger for noisy MRI data. With ISA-L, levels 1, 2-5
        and 6-9 are its levels 1, 2 and 3 (level 0, stored, goes to zlib).
    gzip_backend : {"auto", "isal", "zlib"}, optional
        Which gzip implementation writes a ``.nii.gz``; default
        ``$P2S_DASK_GZIP``, else ISA-L when installed (see
        :func:`resolve_gzip_backend`).

    Attributes
    ----------
    gzip_backend : str or None
        ``"isal"`` or ``"zlib"`` for a gzip file, None for a plain one.
    """

    def __init__(self, url, meta: DwiMeta, *, overwrite=False, storage_options=None,
                 compresslevel=1, gzip_backend=None):
        self.url = os.fspath(url)
        self._gzip = None
        self._committed = False
        gzipped = self.url.rstrip("/").lower().endswith(".gz")
        if gzipped:
            try:
                level = operator.index(compresslevel)
            except TypeError:
                level = -1
            if not 0 <= level <= 9:
                raise InputError(f"compresslevel must be an integer from 0 to 9, "
                                 f"not {compresslevel!r}")
            backend = resolve_gzip_backend(gzip_backend)
        self.gzip_backend = None
        self._overwrite = overwrite
        self._fs, self._path = fs_and_path(url, storage_options)
        self._check_destination()
        name = posixpath.basename(self._path.rstrip("/"))
        tmp_name = f".{name}.{uuid.uuid4().hex[:8]}.partial"
        if is_local(url):
            self._tmp = os.path.join(os.path.dirname(local_path(url)), tmp_name)
        else:
            self._tmp = posixpath.join(posixpath.dirname(self._path), tmp_name)
        with user_errors(self.url, "writing"):
            if is_local(url):
                self._file = open(self._tmp, "wb")
            else:
                self._file = self._fs.open(self._tmp, "wb", block_size=_PART_BYTES)
        try:
            if gzipped:
                use_isal = backend == "isal" and level > 0
                self._gzip = (_IsalGzip if use_isal else _ZlibGzip)(self._file, level)
                self.gzip_backend = self._gzip.backend
            self.write(meta.header + meta.extra)
        except BaseException:
            self.abort()
            raise

    def _check_destination(self):
        with user_errors(self.url, "writing"):
            self._fs.invalidate_cache(self._path)  # object-store listings are cached
            if self._fs.exists(self._path) and not self._overwrite:
                raise OutputExistsError(f"{self.url} already exists")

    def write(self, data) -> None:
        """Append bytes (any buffer, e.g. a contiguous ndarray)."""
        with user_errors(self.url, "writing"):
            (self._gzip or self._file).write(memoryview(data).cast("B"))

    def commit(self) -> None:
        """Finish the file and move it to its real name."""
        with user_errors(self.url, "writing"):
            if self._gzip is not None:
                self._gzip.close()
            self._file.close()
            self._check_destination()
            if is_local(self.url):
                os.replace(self._tmp, self._path)
            else:
                if self._overwrite and self._fs.exists(self._path):
                    self._fs.rm(self._path)
                self._fs.mv(self._tmp, self._path)
        self._committed = True

    def abort(self) -> None:
        """Discard the temporary file."""
        if self._committed:
            return
        if self._gzip is not None:
            self._gzip.abort()
            self._gzip = None
        try:
            discard = getattr(self._file, "discard", None)
            if not is_local(self.url) and discard is not None and not self._file.closed:
                discard()  # drop the multipart upload instead of completing it
            self._file.close()
        except Exception:
            pass
        try:
            if self._fs.exists(self._tmp):
                self._fs.rm(self._tmp)
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()
