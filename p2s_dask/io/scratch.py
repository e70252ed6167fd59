"""A scratch file for turning volume-major slabs into block-major chunks.

Our store chunks hold all n volumes of a spatial block; a NIfTI holds one
volume after another. Streaming k volumes at a time and writing them straight
into store chunks would rewrite every chunk n/k times. Instead each slab is
cut into per-block pieces written to a local scratch file at offsets fixed
in advance, laid out block after block, so that afterwards each block's n
volumes are one contiguous read (pangeo rechunker's two-step plan, with a
flat file as the intermediate). The way back (store to NIfTI) writes whole
blocks and reads pieces.

Why a flat file and not a scratch Zarr array: no encoding or decoding, no
per-chunk overhead (there can be thousands of small pieces under a small
memory limit), and the pieces go through the page cache at memory speed.
The price is disk space: the scratch file is as large as the uncompressed
data. So it goes where the user says (``tmp_dir``), its blocks are reserved
when it is created (a full disk shows up before any work, not after a long
gunzip), errors while using it are one line, and it is deleted however the
conversion ends.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import tempfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
from dask.utils import format_bytes

from ..errors import InputError
from .direct_io import preallocate
from .urls import is_local, local_path, user_errors

__all__ = ["BlockScratch", "for_each_block", "scratch_folder", "spatial_blocks"]

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)


def scratch_folder(tmp_dir=None) -> str:
    """The local folder for scratch files: ``tmp_dir``, created if missing.

    Parameters
    ----------
    tmp_dir : str or os.PathLike, optional
        A local path or ``file://`` URL. None, or a URL of another kind (the
        work store may live in an object store; a scratch file must be a
        local file), means the system's temporary folder.

    Returns
    -------
    str
    """
    if tmp_dir is None or not is_local(tmp_dir):
        return tempfile.gettempdir()
    folder = local_path(tmp_dir)
    with user_errors(folder, "creating the folder"):
        os.makedirs(folder, exist_ok=True)
    return folder


def spatial_blocks(shape, chunks):
    """Slices of each spatial block (x, y, z), in C order of the chunk grid.

    Parameters
    ----------
    shape : tuple of at least 3 ints
    chunks : tuple of at least 3 ints
        Spatial chunk shape.

    Returns
    -------
    list of tuple of 3 slices
    """
    ranges = [range(0, s, c) for s, c in zip(shape[:3], chunks[:3])]
    return [tuple(slice(a, min(a + c, s)) for a, c, s in zip(starts, chunks, shape))
            for starts in itertools.product(*ranges)]


def _pwrite_all(fd, array: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _f_bytes(values: np.ndarray, dtype) -> np.ndarray:
    """A C-contiguous array whose bytes are ``values`` in Fortran order."""
    return np.asfortranarray(values, dtype=dtype).T


def _pread_into(fd, array: np.ndarray, offset: int) -> None:
    view = memoryview(array).cast("B")
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise OSError(f"scratch file ended early at byte {offset}")
        view, offset = view[got:], offset + got


class BlockScratch:
    """Values of a 4D array kept block by block in a temporary local file.

    Within a block's region, the values are stored as consecutive pieces,
    one per run of volumes ``[v0, v1)``: each piece is the Fortran-ordered
    ``(bx, by, bz, v1 - v0)`` array (volume after volume, as in a NIfTI),
    at offset ``voxels * v0 * itemsize`` from the start of the block's
    region. So a piece can be written or read on its own, and a whole block
    (all pieces, which together are the block in Fortran order) in one read.

    Parameters
    ----------
    shape : tuple of 4 ints
    chunks : tuple of 3 ints
        Spatial block shape (the store's chunks).
    dtype : numpy dtype
    tmp_dir : str, optional
        Folder for the file (see :func:`scratch_folder`); default the
        system's temporary folder.

    Raises
    ------
    InputError
        One line, if the file cannot be created or has no room (then it is
        already deleted), and likewise from every method.
    """

    def __init__(self, shape, chunks, dtype, tmp_dir=None):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.blocks = spatial_blocks(shape, chunks)
        n = self.shape[3]
        self._voxels = [math.prod(s.stop - s.start for s in b) for b in self.blocks]
        sizes = [v * n * self.dtype.itemsize for v in self._voxels]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.nbytes = int(self._offsets[-1])
        self.folder = scratch_folder(tmp_dir)
        self._fd = None
        with user_errors(self.folder, "creating a scratch file in"):
            fd, self.path = tempfile.mkstemp(prefix="p2s-dask-", suffix=".scratch",
                                             dir=self.folder)
        self._fd = fd
        try:
            with self._errors("reserving"):
                # where the file system cannot reserve blocks the file stays
                # sparse, and a full disk shows up at the first write instead
                preallocate(fd, 0, self.nbytes)
                os.ftruncate(fd, self.nbytes)
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _errors(self, action):
        """Storage errors as one line naming the file, plus the room it needs."""
        try:
            with user_errors(self.path, f"{action} scratch file"):
                yield
        except InputError as exc:
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno in _NO_ROOM:
                raise InputError(f"{exc} (it needs {format_bytes(self.nbytes)} in "
                                 f"{self.folder})") from cause
            raise

    def _piece_offset(self, b: int, v0: int) -> int:
        return int(self._offsets[b]) + self._voxels[b] * v0 * self.dtype.itemsize

    def _block_shape(self, b: int):
        return tuple(s.stop - s.start for s in self.blocks[b])

    def blocks_within(self, z0: int, z1: int):
        """Indices of the blocks lying in the z-planes ``[z0, z1)``."""
        return [b for b, (_, _, zs) in enumerate(self.blocks) if z0 <= zs.start and zs.stop <= z1]

    # -- slabs: all blocks of some volumes (and z-planes) ----------------

    def write_slab(self, slab: np.ndarray, v0: int, z0: int) -> None:
        """Store a slab covering volumes ``v0:v0+k`` and z-planes from ``z0``.

        Parameters
        ----------
        slab : ndarray, shape (x, y, p, k)
            z-planes ``z0:z0+p`` must be whole blocks.
        v0, z0 : int
        """
        with self._errors("writing"):
            for b in self.blocks_within(z0, z0 + slab.shape[2]):
                xs, ys, zs = self.blocks[b]
                piece = slab[xs, ys, zs.start - z0:zs.stop - z0, :]
                _pwrite_all(self._fd, _f_bytes(piece, self.dtype), self._piece_offset(b, v0))

    def read_slab(self, v0: int, v1: int, z0: int, z1: int) -> np.ndarray:
        """Volumes ``v0:v1``, z-planes ``z0:z1`` (whole blocks), Fortran ordered."""
        out = np.empty((*self.shape[:2], z1 - z0, v1 - v0), dtype=self.dtype, order="F")
        with self._errors("reading"):
            for b in self.blocks_within(z0, z1):
                xs, ys, zs = self.blocks[b]
                piece = np.empty((v1 - v0, *self._block_shape(b)[::-1]), dtype=self.dtype)
                _pread_into(self._fd, piece, self._piece_offset(b, v0))
                out[xs, ys, zs.start - z0:zs.stop - z0, :] = piece.T
        return out

    # -- blocks: all volumes of one spatial block -------------------------

    def write_block(self, b: int, data: np.ndarray, runs) -> None:
        """Store block ``b`` (shape (bx, by, bz, n)) as pieces of the volume ``runs``."""
        with self._errors("writing"):
            for v0, v1 in runs:
                _pwrite_all(self._fd, _f_bytes(data[..., v0:v1], self.dtype),
                            self._piece_offset(b, v0))

    def read_block(self, b: int, runs) -> np.ndarray:
        """Block ``b``, all volumes, Fortran ordered (one read, no copy: its
        pieces, one after the other, are the block in Fortran order)."""
        shape = self._block_shape(b)
        flat = np.empty((self.shape[3], *shape[::-1]), dtype=self.dtype)
        with self._errors("reading"):
            _pread_into(self._fd, flat, int(self._offsets[b]))
        return flat.T

    def close(self) -> None:
        """Delete the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def for_each_block(blocks, work, *, workers=1, progress=None):
    """Run ``work(index, block)`` for every block, ``workers`` at a time.

    At most ``workers`` blocks are in progress, which bounds memory; the first
    error stops the rest and is raised.

    Parameters
    ----------
    blocks : sequence
    work : callable
        ``work(index, block) -> bytes handled`` (for the progress bar).
    workers : int, optional
    progress : tqdm.tqdm, optional
    """
    with ThreadPoolExecutor(max(1, workers)) as pool:
        running = set()

        def collect(futures):
            for future in futures:
                nbytes = future.result()  # re-raises a worker's error here
                if progress is not None:
                    progress.update(nbytes)

        try:
            for index, block in enumerate(blocks):
                if len(running) >= workers:
                    done, running = wait(running, return_when=FIRST_COMPLETED)
                    collect(done)
                running.add(pool.submit(work, index, block))
            done, running = wait(running)
            collect(done)
        except BaseException:
            for future in running:
                future.cancel()
            raise
