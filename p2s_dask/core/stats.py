"""Sufficient statistics of patch features: count, mean and centred scatter.

Everything a linear Patch2Self model needs is ``(N, mu, S)`` over the fitting
voxels. Blocks are reduced separately and merged exactly with the pairwise
update of Chan, Golub & LeVeque, which is associative, so any chunking and any
reduction tree give the same statistics up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np
import scipy.linalg.blas

from .layout import piece_rows, select_rows, voxel_rows
from .patches import features, interior_shape, shifted_views, sub_boxes


@dataclass(frozen=True)
class Stats:
    """Count, mean ``(F,)`` and centred scatter ``(F, F)`` of feature vectors.

    The scatter is ``sum_i (f_i - mean)(f_i - mean)^T`` in float64.
    """

    count: int
    mean: np.ndarray
    scatter: np.ndarray

    @classmethod
    def empty(cls, n_features: int) -> "Stats":
        """Statistics of no voxels (the identity of :func:`merge`)."""
        return cls(0, np.zeros(n_features), np.zeros((n_features, n_features)))

    @property
    def n_features(self) -> int:
        return self.mean.shape[0]

    def subset(self, features) -> "Stats":
        """Statistics of a subset of the features (exact: a sub-block of S)."""
        idx = np.asarray(features)
        return Stats(self.count, self.mean[idx], self.scatter[np.ix_(idx, idx)])


def rows_stats(x: np.ndarray, overwrite: bool = False) -> Stats:
    """Statistics of the rows of a ``(n, F)`` matrix.

    With ``overwrite=True`` a float64 ``x`` is centred in place (saves a copy
    of the block, which matters for memory more than for time).
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n == 0:
        return Stats.empty(x.shape[1])
    mean = x.mean(axis=0)
    if overwrite:
        x -= mean
        xc = x
    else:
        xc = x - mean
    # ``xc.T @ xc`` is recognised by NumPy as a symmetric rank-k update (syrk).
    return Stats(n, mean, xc.T @ xc)


def merge(a: Stats, b: Stats, overwrite_a: bool = False) -> Stats:
    """Exact statistics of the union of two disjoint voxel sets.

    With ``overwrite_a`` the result's scatter is ``a``'s, updated in place
    (when it is writable and contiguous): one F x F matrix less at once, which for
    ``patch_radius > 0`` is hundreds of MB. ``a`` is then spent.
    """
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n)
    flags = a.scatter.flags
    if overwrite_a and flags.writeable and (flags.c_contiguous or flags.f_contiguous):
        scatter = a.scatter
        scatter += b.scatter
    else:
        scatter = a.scatter + b.scatter
    # rank-1 update in place: np.outer would allocate another F x F matrix,
    # which for r = 1 (F in the thousands) is most of a merge's cost
    target = scatter if scatter.flags.f_contiguous else scatter.T
    scipy.linalg.blas.dger(a.count * b.count / n, delta, delta, a=target, overwrite_a=1)
    return Stats(n, mean, scatter)


def merge_all(items) -> Stats:
    """Merge an iterable of :class:`Stats` (at least one)."""
    return reduce(merge, items)


# up to this many features a piece's statistics are merged (cheap); beyond,
# pieces are centred on the block mean and accumulated
SMALL_F = 1024


def _pieces(block, radius, mask, shape, n_features, max_bytes):
    """Float64 feature matrices of the (masked) voxels, sub-box by sub-box."""
    for box in sub_boxes(shape, n_features, max_bytes):
        x = features(block, radius, box)
        if mask is not None:
            (x0, x1), (y0, y1), (z0, z1) = box
            x = x[mask[x0:x1, y0:y1, z0:z1].reshape(-1)]
            if x.shape[0] == 0:
                continue
        yield x


def feature_means(block: np.ndarray, radius, mask: np.ndarray | None = None):
    """Count and mean ``(F,)`` of the interior features, without forming them.

    The mean of feature ``u * P + p`` is the mean of volume ``u`` over the
    interior shifted by offset ``p``.
    """
    m = block.shape[-1]
    views = shifted_views(block, radius)
    n = int(np.count_nonzero(mask)) if mask is not None else \
        int(np.prod(views[0].shape[:3]))
    means = np.empty((m, len(views)))
    for p, view in enumerate(views):
        rows = view[mask] if mask is not None else view.reshape(-1, m)
        means[:, p] = rows.sum(axis=0, dtype=np.float64) / max(n, 1)
    return n, means.reshape(-1)


def block_stats(block: np.ndarray, radius, mask: np.ndarray | None = None,
                max_bytes: int = 4 * 2**20, min_rows: int = 1024) -> Stats:
    """Statistics of the patch features of the interior voxels of a block.

    Parameters
    ----------
    block : ndarray, shape (bx + 2 r0, by + 2 r1, bz + 2 r2, m)
        One group's volumes with a halo of ``radius`` voxels (zeros beyond the
        image border).
    radius : tuple of int
    mask : ndarray of bool, shape (bx, by, bz), optional
        Only voxels where the mask is true are counted.
    max_bytes, min_rows : int
        Bound on the feature matrix held at once: the block is walked in
        sub-boxes of about ``max_bytes``, but of at least ``min_rows`` voxels
        (enough rows keep each rank-k update efficient and its addition
        into the F x F scatter cheap).

    Returns
    -------
    Stats
    """
    m = block.shape[-1]
    n_features = m * int(np.prod([2 * r + 1 for r in radius]))
    if not any(radius):
        rows, order = voxel_rows(block)
        if rows is not None:
            if mask is not None:
                rows = select_rows(rows, order, mask)
            return _matrix_stats(rows, order, max_bytes)
    shape = interior_shape(block.shape, radius)
    # Wide features (patches): the exact block mean first (no feature matrix
    # needed), then the centred scatter accumulated by rank-k updates: no
    # cancellation, and no F x F merge per piece.
    max_bytes = max(max_bytes, min_rows * n_features * 8)
    if n_features <= SMALL_F:
        # merging per-piece statistics costs F^2 a piece: nothing for small F
        total = Stats.empty(n_features)
        for x in _pieces(block, radius, mask, shape, n_features, max_bytes):
            total = merge(total, rows_stats(x, overwrite=True))
        return total
    count, mean = feature_means(block, radius, mask)
    if count == 0:
        return Stats.empty(n_features)
    scatter = np.zeros((n_features, n_features))
    for x in _pieces(block, radius, mask, shape, n_features, max_bytes):
        x -= mean
        # NumPy runs ``x.T @ x`` as a rank-k update (syrk) and, unlike SciPy's
        # BLAS wrappers, releases the GIL, so Dask's threads run in parallel;
        # enough rows per update make the F x F addition a small overhead
        scatter += x.T @ x
    return Stats(count, mean, scatter)


def _exact_unit(dtype) -> int:
    """Rows per exact integer unit for data of ``dtype`` (0: not integers).

    For integers of at most 16 bits, float64 holds every product and every
    sum over this many rows exactly, and int64 holds ``n * S = n * G - s s^T``
    (see :func:`_integer_stats`).
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "biu" or dtype.itemsize > 2:
        return 0
    info = np.iinfo(np.uint8 if dtype.kind == "b" else dtype)
    top = max(abs(int(info.min)), int(info.max))
    return max(1, min((1 << 53) // (top * top), math.isqrt(1 << 61) // top))


def _integer_stats(rows: np.ndarray, order: str, max_bytes: int) -> Stats:
    """Exact statistics of integer rows (at most :func:`_exact_unit` of them).

    The uncentred Gram matrix of the rows with a column of ones appended,
    ``[X 1]^T [X 1]``, holds ``G = X^T X``, the column sums ``s`` and the
    count: one rank-k update per piece and no separate passes for the mean
    or the centring. Every entry is an integer that float64 holds exactly,
    and ``n S = n G - s s^T`` is formed exactly in int64, so the scatter is
    the true one rounded once (no cancellation error at all).
    """
    count, n_features = rows.shape
    step = piece_rows(n_features + 1, 8, max_bytes)
    buf = np.empty((min(step, count), n_features + 1), dtype=np.float64, order=order)
    buf[:, n_features] = 1.0
    gram = np.zeros((n_features + 1, n_features + 1))
    for j in range(0, count, step):
        piece = rows[j:j + step]
        b = buf[:piece.shape[0]]
        np.copyto(b[:, :n_features], piece)
        gram += b.T @ b
    sums = gram[n_features, :n_features].astype(np.int64)
    n_scatter = gram[:n_features, :n_features].astype(np.int64) * count - np.outer(sums, sums)
    return Stats(count, sums / count, n_scatter / count)


def _matrix_stats(rows: np.ndarray, order: str, max_bytes: int) -> Stats:
    """Statistics of the rows of a ``(voxels, F)`` matrix in either layout.

    Integers of up to 16 bits (scanner data) take the exact path of
    :func:`_integer_stats`, unit by unit; other data the following.

    The exact mean first, then the scatter of the centred rows accumulated
    piece by piece: centring and the float64 conversion are one pass into a
    cache-sized buffer, and each ``b.T @ b`` is a rank-k update (syrk) that
    releases the GIL.
    """
    count, n_features = rows.shape
    if count == 0:
        return Stats.empty(n_features)
    unit = _exact_unit(rows.dtype)
    if unit:
        return merge_all(_integer_stats(rows[j:j + unit], order, max_bytes)
                         for j in range(0, count, unit))
    mean = rows.sum(axis=0, dtype=np.float64) / count
    scatter = np.zeros((n_features, n_features))
    step = piece_rows(n_features, 8, max_bytes)
    buf = np.empty((min(step, count), n_features), dtype=np.float64, order=order)
    for j in range(0, count, step):
        piece = rows[j:j + step]
        b = buf[:piece.shape[0]]
        np.subtract(piece, mean, out=b)
        scatter += b.T @ b
    return Stats(count, mean, scatter)
