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
"""

from __future__ import annotations

import os
import posixpath
import uuid
import zlib

import numpy as np

from ..errors import DataError, InputError, OutputExistsError
from .gzip_writer import GzipWriter
from .meta import DwiMeta, header_class
from .urls import fs_and_path, is_local, local_path, user_errors

__all__ = ["NiftiReader", "NiftiWriter"]

_GZIP_MAGIC = b"\x1f\x8b"
# compressed bytes per read and per zlib call: large enough that per-call
# costs vanish, small enough that the decompressed piece stays in cache
_INPUT_BLOCK = 256 << 10
# most decompressed bytes made per zlib call, bounding transients
_OUTPUT_BLOCK = 8 << 20
# object stores read ahead and upload in parts held in memory; 16 MiB parts
# keep that small and still allow files up to ~160 GB on S3 (10,000 parts)
_PART_BYTES = 16 << 20


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


def _readinto_fully(stream, view: memoryview) -> int:
    filled = 0
    while filled < len(view):
        got = stream.readinto(view[filled:])
        if not got:
            break
        filled += got
    return filled


class NiftiReader:
    """Reads one NIfTI file from start to end, exactly once.

    Parameters
    ----------
    url : str or os.PathLike
        ``.nii`` or ``.nii.gz`` (compression is detected from the content),
        local or any fsspec URL.
    storage_options : dict, optional

    Attributes
    ----------
    meta : DwiMeta
        Header (with extensions), shape, dtype and scaling; no gradients.
    """

    def __init__(self, url, storage_options=None):
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
        try:
            magic = self._file.read(2)
            self._file.seek(0)
            self._stream = _Gunzip(self._file) if magic == _GZIP_MAGIC else self._file
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
                return _readinto_fully(self._stream, view)
        except _Truncated:
            problem = "the file is truncated (the gzip stream ends early)"
        except (zlib.error, EOFError) as exc:
            problem = f"the file is corrupt ({exc})"
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
        return out

    def close(self):
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
        gzip level; 1 (nibabel's default) is several times faster than 6 and
        only slightly larger for noisy MRI data.
    """

    def __init__(self, url, meta: DwiMeta, *, overwrite=False, storage_options=None,
                 compresslevel=1):
        self.url = os.fspath(url)
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
        self._gzip = None
        if self.url.rstrip("/").lower().endswith(".gz"):
            self._gzip = GzipWriter(self._file, compresslevel)
        self._committed = False
        try:
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
