"""Patch statistics from lagged cross products (patch radius > 0).

:func:`lag_block_stats` returns exactly what :func:`.stats.block_stats` returns
for a block with its ``r``-halo (the count, the mean and the centred scatter of
the patch features of the block's interior voxels, or of its masked voxels),
without forming the ``(voxels, 27 m)`` feature matrix.

Patch features are shifted copies of the volumes. With ``Omega`` the fitting
voxels, the cross product of the features ``(u, d)`` and ``(w, d')`` is

    T[(u, d), (w, d')] = sum_{x in Omega} I_u(x + d) I_w(x + d')
                       = sum_{y in Omega + d} I_u(y) I_w(y + delta),   delta = d' - d,

an ``m x m`` *lag product* of the block with itself shifted by ``delta``, summed
over the window ``Omega + d``. Every pair ``(d, d')`` with the same lag shares
the products ``I(y) I(y + delta)^T`` of one voxel ``y``; only the window that
sums them differs. The block is split, per lag, into *cells*: sets of voxels
that lie in the same windows. One product per cell, then each window is a sum
of cells. The lags ``delta`` and ``-delta`` give transposed blocks, so only half
of the lags are computed (63 for ``r = 1``): about ``63 m^2`` multiply-adds per
voxel instead of ``(27 m)^2 / 2 = 364 m^2``, plus the products over the thin
cells at the faces.

- Without a mask the windows are boxes; per axis they differ only in their
  first and last ``2 r - |delta|`` layers, so cells are boxes. The bulk cell
  of each plane is one matrix product of two contiguous, shifted views of a
  padded copy of the block (nothing gathered), less the thin cells inside it;
  the thin cells (faces, edges) are copied out, each product once.
- With a mask the windows are the shifted masks. The voxels are split once
  into classes of equal membership in the windows of all offsets. A voxel of
  a rare membership joins the class whose windows differ least from its own;
  every class is gathered once, and per lag it costs one gather of its
  partners and one product, added to the windows it lies in; the voxels
  whose windows differ from their class's are then corrected window by
  window (signed products over a few voxels).

Cost per voxel, ``r = 1``, 160 volumes, one thread (bench_lagstats.py): about
63 m^2 multiply-adds plus the halo planes (a block 12 planes thick: 5x less
CPU than the direct scatter, 3 planes: 3.6x); with a brain mask about 3.3x
(12 planes), the mask's shell and the gathers costing the difference. Memory:
the working copy (``(m + 1) x`` voxels float64, walked in slabs of at most
``max_bytes``), the gathered classes (with a mask, about as much again) and
the ``F x F`` result.

Centring: for integers of up to 16 bits the values minus an integer reference
per volume give products and sums that float64 holds exactly (checked per
block), and the scatter is formed from them in int64 up to a last division
(as in :func:`.stats._integer_stats`). Other data are centred on the
per-volume mean of the fitting voxels (float64), including the halo (whose
zeros beyond the image become minus the reference: the algebra is exact), so
no large cancellation is left; the means come from the same sums.

:class:`LagSum` adds the products of block after block into one running
``F x F`` matrix (each block still centred on its own reference, then merged
by rank-1 updates), so a run of blocks holds one such matrix. The engine's
lanes hold less: the compact lag parts of :mod:`.lagparts` (one reference per
lane, no ``F x F`` until the merged lanes are done), which reuse
:func:`_lag_products` (its window sums go to any ``sink``) and the centring
and finishing here.

Plain NumPy; one thread (the caller limits BLAS).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import scipy.linalg.blas

from .patches import interior_shape, patch_offsets, patch_size
from .stats import Stats, block_stats

# float64 holds every integer below this exactly
_EXACT = 1 << 53
# with a mask: a class of at least this many voxels (equal windows at every
# lag) is gathered once and gets its own product per lag
BIG_CLASS = 32
# gather a class's partners by slices when its runs of consecutive voxels
# are at least this long on average
_RUN_LENGTH = 8
# with a mask and fewer volumes than this, the direct scatter is cheaper
# (measured on 81x106x(3..12) blocks, r = 1: 0.8x at 16 volumes, 1.3x at 24)
MIN_MASKED_VOLUMES = 20


def lags_pay_off(n_volumes: int, radius, masked: bool) -> bool:
    """Whether :func:`lag_block_stats` beats :func:`.stats.block_stats` for a
    group of ``n_volumes`` (both give the same statistics).

    Without a mask always (r > 0); with one from ``MIN_MASKED_VOLUMES`` volumes
    per unit of radius (r = 2, 4-plane blocks: even at 24 volumes, 2.8x at 60).
    """
    top = max(int(r) for r in radius)
    return top > 0 and (not masked or n_volumes >= MIN_MASKED_VOLUMES * top)


def lag_block_stats(block: np.ndarray, radius, mask: np.ndarray | None = None,
                    max_bytes: int = 64 << 20) -> Stats:
    """Statistics of the patch features of the interior voxels of a block.

    The same input and output as :func:`p2s_dask.core.stats.block_stats`,
    computed from lagged cross products (see the module docstring).

    Parameters
    ----------
    block : ndarray, shape (bx + 2 r0, by + 2 r1, bz + 2 r2, m)
        One group's volumes with a halo of ``radius`` voxels (zeros beyond the
        image border), in any memory layout.
    radius : tuple of int
    mask : ndarray of bool, shape (bx, by, bz), optional
        Only voxels where the mask is true are counted.
    max_bytes : int
        About the most memory the float64 working copy of the block may take;
        the block is then walked in slabs along its thinnest axis.

    Returns
    -------
    Stats
        Feature ``u * P + p`` is volume ``u`` at patch offset ``p`` (C order).
    """
    radius = tuple(int(r) for r in radius)
    if not any(radius):
        return block_stats(block, radius, mask)
    block, mask, count = _checked(block, radius, mask)
    m = block.shape[-1]
    n_offsets = patch_size(radius)
    n_features = m * n_offsets
    if count == 0 or m == 0:
        return Stats.empty(n_features)
    cross = np.zeros((n_features, n_features))
    sums = np.zeros((m, n_offsets))
    ref, exact = _reference(block, radius, mask, count)
    sink = functools.partial(_add_windows, cross, sums, m)
    _lag_products(block, radius, mask, ref, max_bytes, sink)
    _volume_major(cross, m, n_offsets)
    if exact:
        return _finish_exact(cross, sums, ref, count)
    return _finish_float(cross, sums, ref, count)


def _checked(block, radius, mask):
    """The block as an array, its mask (None for all voxels) and the number
    of voxels counted."""
    block = np.asarray(block)
    shape = interior_shape(block.shape, radius)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != tuple(shape):
            raise ValueError(f"mask has shape {mask.shape}, the block's interior {shape}")
        if mask.all():
            mask = None
    if min(shape) <= 0:
        return block, mask, 0
    count = int(np.prod(shape)) if mask is None else int(np.count_nonzero(mask))
    return block, mask, count


def _lag_products(block, radius, mask, ref, max_bytes, sink, augmented=False):
    """The block's lag products about the per-volume reference ``ref``,
    window by window: ``sink(lag, pairs, blocks)`` gets each lag's window sums
    (see :func:`_add_windows`). With ``augmented`` every lag's products carry
    the row and column of the volume of ones (window sums and counts), not
    only the zero lag's."""
    m = block.shape[-1]
    geo = _Geometry(block.shape[:3], radius, m, augmented)
    classes = None if mask is None else _Classes(geo.memberships(mask), geo)
    for z0, z1 in geo.chunks(max_bytes):
        work, flat = geo.working_copy(block, ref, z0, z1)
        if classes is None:
            _box_chunk(work, flat, z0, z1, geo, sink)
        else:
            _mask_chunk(flat, z0, z1, geo, classes, sink)
        del work, flat


class LagSum:
    """Statistics of the patch features of several blocks, summed into one
    F x F matrix as the blocks come.

    Each block's lag products are added straight into the running matrix,
    held in the offset-major order the products come in (see
    :func:`_add_windows`); the block's own centring and its merge with the
    blocks before it are then two rank-1 updates (those of
    :func:`_finish_float` and :func:`.stats.merge`). A run of blocks thus
    holds one F x F matrix, where a :class:`Stats` per block and their
    merges hold two or three at once (with a patch, F x F is hundreds of MB:
    457 MB for 280 volumes at ``r = 1``).

    Parameters
    ----------
    m : int
        Volumes of the group.
    radius : tuple of 3 ints
        Patch radius (not all zero).
    """

    def __init__(self, m: int, radius):
        self.m = int(m)
        self.radius = tuple(int(r) for r in radius)
        self.n_offsets = patch_size(self.radius)
        self.count = 0
        self.mean = np.zeros(self.m * self.n_offsets)  # offset-major
        self.cross = None  # offset-major centred scatter, from the first block

    def add(self, block: np.ndarray, mask: np.ndarray | None = None,
            max_bytes: int = 64 << 20) -> None:
        """Add the interior voxels of a block (as :func:`lag_block_stats`
        takes it) to the sum."""
        block, mask, count = _checked(block, self.radius, mask)
        if count == 0:
            return
        f = self.m * self.n_offsets
        if self.cross is None:
            self.cross = np.zeros((f, f))
        sums = np.zeros((self.m, self.n_offsets))
        ref, _ = _reference(block, self.radius, mask, count)
        sink = functools.partial(_add_windows, self.cross, sums, self.m)
        _lag_products(block, self.radius, mask, ref, max_bytes, sink)
        s = sums.T.reshape(-1)  # offset-major, as the cross products
        target = self.cross.T  # Fortran-ordered: BLAS updates it in place
        t = s / math.sqrt(count)
        scipy.linalg.blas.dger(-1.0, t, t, a=target, overwrite_a=1)
        mean = np.tile(ref, self.n_offsets) + s / count
        if self.count:
            total = self.count + count
            delta = mean - self.mean
            # scaled first, so that d_i d_j == d_j d_i keeps the sum symmetric
            d = delta * math.sqrt(self.count * count / total)
            scipy.linalg.blas.dger(1.0, d, d, a=target, overwrite_a=1)
            mean = self.mean + delta * (count / total)
        self.count += count
        self.mean = mean

    def stats(self) -> Stats:
        """The statistics summed so far, features in the order of
        :func:`lag_block_stats`. The sum is spent: its matrix becomes the
        result's."""
        if self.cross is None:
            return Stats.empty(self.m * self.n_offsets)
        cross, self.cross = self.cross, None
        _volume_major(cross, self.m, self.n_offsets)
        mean = self.mean.reshape(self.n_offsets, self.m).T.reshape(-1)
        return Stats(self.count, mean, cross)


# ----------------------------------------------------------------------------
# centring and the final scatter


def _reference(block, radius, mask, count):
    """Per-volume reference (mean of the fitting voxels) and whether the
    integer path is exact for this block."""
    inner = block[tuple(slice(r, block.shape[i] - r) for i, r in enumerate(radius))]
    kind = block.dtype.kind
    small_int = kind in "biu" and block.dtype.itemsize <= 2
    if small_int:
        vals = inner if mask is None else inner[mask]
        axes = (0, 1, 2) if mask is None else 0
        total = vals.sum(axis=axes, dtype=np.int64)
        ref = (2 * total + count) // (2 * count)  # nearest integer
        top = block.max(axis=(0, 1, 2)).astype(np.int64)
        bottom = block.min(axis=(0, 1, 2)).astype(np.int64)
        spread = int(max(np.abs(top - ref).max(), np.abs(bottom - ref).max()))
        voxels = int(np.prod(block.shape[:3]))
        # every partial sum is at most twice a sum of |products| over the block
        if 2 * spread * spread * voxels < _EXACT and count < (1 << 26):
            return ref.astype(np.int64), True
        return ref.astype(np.float64), False
    if mask is None:
        total = inner.sum(axis=(0, 1, 2), dtype=np.float64)
    else:
        total = inner[mask].sum(axis=0, dtype=np.float64)
    return total / count, False


def _finish_float(cross, sums, ref, count):
    """``S = T - s s^T / N`` of the centred products, in place."""
    s = sums.reshape(-1)
    mean = np.repeat(ref, sums.shape[1]) + s / count
    t = s / math.sqrt(count)
    # rank-1 update in place; t_i t_j == t_j t_i keeps S symmetric
    scipy.linalg.blas.dger(-1.0, t, t, a=cross.T, overwrite_a=1)
    return Stats(count, mean, cross)


def _finish_exact(cross, sums, ref, count, rows=256):
    """Integer data: every product sum is an exact integer. With
    ``s = N q + rem`` (``0 <= rem < N``), ``S = T - s s^T / N`` is
    ``[T - N q q^T - q rem^T - rem q^T] - rem rem^T / N``: the bracket exactly
    in int64, then one division and one subtraction rounded."""
    s = np.rint(sums.reshape(-1)).astype(np.int64)
    mean = (np.repeat(ref, sums.shape[1]) * count + s) / count
    q = s // count
    rem = s - q * count
    for i in range(0, cross.shape[0], rows):
        block = cross[i:i + rows]
        whole = np.rint(block).astype(np.int64)
        whole -= count * np.outer(q[i:i + rows], q)
        whole -= np.outer(q[i:i + rows], rem)
        whole -= np.outer(rem[i:i + rows], q)
        block[...] = whole
        block -= np.outer(rem[i:i + rows], rem) / count
    return Stats(count, mean, cross)


# ----------------------------------------------------------------------------
# geometry


def _centred_into(src, ref, dst):
    """``dst = src - ref`` per volume (axis 0), in int64 for an integer
    reference (exact), then stored as float64."""
    if ref.dtype.kind == "i":
        np.subtract(src, ref[:, None, None, None], out=dst, casting="unsafe",
                    dtype=np.int64)
    else:
        np.subtract(src, ref[:, None, None, None], out=dst, dtype=np.float64)


class _Geometry:
    """The block in permuted axes: slow (thinnest), middle, fast.

    The working copy holds the centred values in float64 with ``2 r2`` zeros
    at the end of every line (a product of two contiguous shifted runs of a
    line then pairs a voxel whose partner is off the line's end with zeros,
    never with a wrapped-around voxel), plus a volume of ones (sums and counts
    come out of the same products). Without a mask it is volume-major, so
    each lag product is an ``A B^T`` of two row-major ``(volumes, voxels)``
    views (the fastest form of the product in OpenBLAS, ~12% faster than
    ``A^T B``); with a mask it is voxel-major, as gathering voxels copies
    whole rows.
    """

    def __init__(self, block_shape, radius, m, augmented=False):
        self.augmented = augmented
        self.perm = tuple(int(a) for a in np.argsort(block_shape, kind="stable"))
        self.b = tuple(int(block_shape[a]) for a in self.perm)
        self.r = tuple(int(radius[a]) for a in self.perm)
        self.n = tuple(b - 2 * r for b, r in zip(self.b, self.r))
        self.m = m
        self.sx = self.b[2] + 2 * self.r[2]  # voxels per line, with padding
        self.sz = self.b[1] * self.sx        # voxels per plane
        offsets = patch_offsets(radius)[:, list(self.perm)]
        self.offsets = [tuple(int(v) for v in o) for o in offsets]
        # half of the lags (lexicographically >= 0)
        ranges = [range(-2 * r, 2 * r + 1) for r in self.r]
        self.lags = [d for d in itertools.product(*ranges) if d >= (0, 0, 0)]

    def chunks(self, max_bytes):
        """Ranges of slow-axis planes worked on at once."""
        plane = self.sz * (self.m + 1) * 8
        if plane * self.b[0] <= max_bytes:
            return [(0, self.b[0])]
        step = max(1, int(max_bytes // plane) - 2 * self.r[0])
        return [(z, min(self.b[0], z + step)) for z in range(0, self.b[0], step)]

    def working_copy(self, block, ref, z0, z1):
        """Planes ``[z0, z1 + 2 r0)`` of the padded, centred float64 copy,
        ``(m + 1, planes, B1, B2 + 2 r2)``, and its ``(m + 1, voxels + 1)``
        flat view (the last column is zero: see :func:`_partners`)."""
        top = min(self.b[0], z1 + 2 * self.r[0])
        src = np.moveaxis(block.transpose(self.perm + (3,))[z0:top], 3, 0)
        voxels = (top - z0) * self.sz
        flat = np.empty((self.m + 1, voxels + 1))
        flat[:, voxels] = 0.0
        work = flat[:, :voxels].reshape(self.m + 1, top - z0, self.b[1], self.sx)
        work[:, :, :, self.b[2]:] = 0.0
        work[self.m, :, :, :self.b[2]] = 1.0
        _centred_into(src, ref, work[:self.m, :, :, :self.b[2]])
        return work, flat

    def memberships(self, mask):
        """Bool ``(P, B0, B1, B2)``: voxel ``y`` lies in the window of offset
        ``p``, i.e. ``y - d_p`` is a masked interior voxel."""
        maskp = np.asarray(mask, bool).transpose(self.perm)
        memb = np.zeros((len(self.offsets),) + self.b, dtype=bool)
        for p, d in enumerate(self.offsets):
            memb[(p,) + tuple(slice(r + e, r + e + n)
                              for r, e, n in zip(self.r, d, self.n))] = maskp
        return memb

    def shift(self, lag):
        return lag[0] * self.sz + lag[1] * self.sx + lag[2]

    def rows(self, lag):
        """Rows of the working copy in the products of ``lag``: the volumes,
        and the volume of ones for the zero lag (or every lag, augmented)."""
        return self.m + 1 if self.augmented or not any(lag) else self.m

    def windows(self, lag):
        """Per axis: the offsets of the windows of ``lag``, their segments,
        the window/segment incidence and the segment in every window."""
        return [_axis_windows(n, r, e) for n, r, e in zip(self.n, self.r, lag)]

    def pairs(self, lag):
        """Feature blocks ``(p, q)`` of the windows of ``lag`` (C order over
        the three axes' window lists)."""
        return _pairs(self.r, self.perm, lag)


@functools.lru_cache(maxsize=4096)
def _axis_windows(n, r, e):
    ds = [d for d in range(-r, r + 1) if abs(d + e) <= r]
    starts = [r + d for d in ds]
    cuts = sorted(set(starts) | {s + n for s in starts})
    segs = list(zip(cuts[:-1], cuts[1:]))
    inc = np.array([[1.0 if s <= a and b <= s + n else 0.0 for a, b in segs]
                    for s in starts])
    inc.flags.writeable = False
    core = [i for i in range(len(segs)) if inc[:, i].all()]
    return ds, segs, inc, (core[0] if core else None)


@functools.lru_cache(maxsize=64)
def _offset_index(r, perm):
    """Feature offset index of each offset (in permuted axes)."""
    radius = [0, 0, 0]
    for a, v in zip(perm, r):
        radius[a] = v
    offsets = patch_offsets(radius)[:, list(perm)]
    return {tuple(int(v) for v in o): p for p, o in enumerate(offsets)}


@functools.lru_cache(maxsize=4096)
def _pairs(r, perm, lag):
    index = _offset_index(r, perm)
    ds = [[d for d in range(-rr, rr + 1) if abs(d + e) <= rr] for rr, e in zip(r, lag)]
    return tuple((index[d], index[(d[0] + lag[0], d[1] + lag[1], d[2] + lag[2])])
                 for d in itertools.product(*ds))


def _add_windows(cross, sums, m, lag, pairs, blocks):
    """Add the window sums ``blocks`` (K, mm, mm) of ``lag`` into ``T``,
    held offset-major: block ``(p, q)`` is ``cross[p m:(p+1) m, q m:(q+1) m]``
    (contiguous rows; :func:`_volume_major` reorders at the end)."""
    zero = not any(lag)
    for (p, q), b in zip(pairs, blocks):
        if zero:
            cross[p * m:(p + 1) * m, p * m:(p + 1) * m] += b[:m, :m]
            sums[:, p] += b[m, :m]
        else:
            cross[p * m:(p + 1) * m, q * m:(q + 1) * m] += b[:m, :m]
            cross[q * m:(q + 1) * m, p * m:(p + 1) * m] += b[:m, :m].T


def _volume_major(cross, m, n_offsets):
    """Reorder an offset-major ``(p, u) x (q, w)`` matrix to the feature order
    ``(u, p) x (w, q)`` in place: rows follow the cycles of the permutation,
    each moved with its columns reordered (one row of scratch)."""
    size = m * n_offsets

    def source(i):  # the offset-major row that becomes feature row i
        u, p = divmod(i, n_offsets)
        return p * m + u

    def reorder(row):
        return row.reshape(n_offsets, m).T.reshape(-1)

    done = np.zeros(size, dtype=bool)
    for start in range(size):
        if done[start]:
            continue
        first = cross[start].copy()
        i = start
        while True:
            done[i] = True
            k = source(i)
            if k == start:
                cross[i] = reorder(first)
                break
            cross[i] = reorder(cross[k])
            i = k
    return cross


# ----------------------------------------------------------------------------
# no mask: boxes


def _fast_major(view):
    """Copy of a ``(c, z, x, y)`` box as ``(c, y z x)``: a cell of one fast
    segment is then a run of columns."""
    return np.ascontiguousarray(view.transpose(0, 3, 1, 2)).reshape(view.shape[0], -1)


def _box_chunk(work, flat, z0, z1, geo, sink):
    """Lag products over the box windows, left voxels in planes ``[z0, z1)``.

    Per lag, the segments of each axis give cells (boxes). The cell that is
    the core along the middle and fast axes is the bulk: per plane, one
    product of two contiguous runs of voxels (the lines of the middle core,
    all of each line), less the thin cells inside those lines. The other
    cells are thin (at most ``2 r - |lag|`` layers) and are copied out.
    """
    b2 = geo.b[2]
    for lag in geo.lags:
        zero = not any(lag)
        mm = geo.rows(lag)
        (ds0, segs0, inc0, _), (ds1, segs1, inc1, core1), (ds2, segs2, inc2, core2) = \
            geo.windows(lag)
        used = [i0 for i0, (a0, e0) in enumerate(segs0) if max(a0, z0) < min(e0, z1)]
        if not used:
            continue
        cells = np.empty((len(used), len(segs1), len(segs2), mm, mm))
        s = geo.shift(lag)
        for c0, i0 in enumerate(used):
            a0, e0 = segs0[i0]
            la, lb = max(a0, z0) - z0, min(e0, z1) - z0
            for i1, (a1, e1) in enumerate(segs1):
                bulk = i1 == core1 and core2 is not None
                if bulk:
                    acc = cells[c0, i1, core2]
                    for z in range(la, lb):
                        j0 = z * geo.sz + a1 * geo.sx
                        j1 = z * geo.sz + (e1 - 1) * geo.sx + b2
                        left = flat[:mm, j0:j1]
                        part = left @ left.T if zero else left @ flat[:mm, j0 + s:j1 + s].T
                        if z == la:
                            acc[...] = part
                        else:
                            acc += part
                # the thin cells of these lines: one copy with the fast axis
                # slowest, so that each cell is a run of its columns
                runs = [range(len(segs2))]
                if bulk:
                    runs = [range(core2), range(core2 + 1, len(segs2))]
                per = (lb - la) * (e1 - a1)
                for run in runs:
                    if not run:
                        continue
                    f0, f1 = segs2[run[0]][0], segs2[run[-1]][1]
                    left = _fast_major(work[:mm, la:lb, a1:e1, f0:f1])
                    if not zero:
                        right = _fast_major(work[:mm, la + lag[0]:lb + lag[0],
                                                 a1 + lag[1]:e1 + lag[1],
                                                 f0 + lag[2]:f1 + lag[2]])
                    for i2 in run:
                        a2, e2 = segs2[i2]
                        cols = slice((a2 - f0) * per, (e2 - f0) * per)
                        lc = left[:, cols]
                        part = lc @ lc.T if zero else lc @ right[:, cols].T
                        cells[c0, i1, i2] = part
                        if bulk:
                            acc -= part
        # window sums: contract the segments of each axis with the incidences
        n0, n1, n2 = cells.shape[:3]
        x = np.matmul(inc2, cells.reshape(n0 * n1, n2, mm * mm))   # (n0 n1, K2, .)
        x = np.matmul(inc1, x.reshape(n0, n1, -1))                 # (n0, K1, K2 .)
        x = inc0[:, used] @ x.reshape(n0, -1)                      # (K0, K1 K2 .)
        sink(lag, geo.pairs(lag), x.reshape(-1, mm, mm))


# ----------------------------------------------------------------------------
# mask: groups of voxels that lie in the same windows


def _pattern_groups(bits):
    """Group the rows of a bool matrix by equal rows: the first row of each
    group, each row's group and the group sizes."""
    packed = np.ascontiguousarray(np.packbits(bits, axis=1))
    keys = packed.view(np.dtype((np.void, packed.shape[1]))).ravel()
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True,
                                          return_counts=True)
    return first, inverse.reshape(-1), counts


class _Classes:
    """The voxels that lie in some window, split once per block into classes
    of equal membership in the windows of all offsets.

    Classes of at least :data:`BIG_CLASS` voxels are kept. A voxel of a
    smaller class joins the kept class whose windows differ least from its
    own (or none, if it lies in fewer windows than that difference plus one);
    per lag, its product goes with its class's, and the windows where it
    differs are corrected by signed products.
    """

    def __init__(self, memb, geo):
        bits = memb.reshape(memb.shape[0], -1)
        inside = np.flatnonzero(bits.any(axis=0))
        self.bits = bits[:, inside].T                     # (voxels, P)
        self.z, rest = np.divmod(inside, geo.b[1] * geo.b[2])
        x, y = np.divmod(rest, geo.b[2])
        self.inplane = x * geo.sx + y                     # index within a plane
        first, inverse, counts = _pattern_groups(self.bits)
        big = np.flatnonzero(counts >= BIG_CLASS)
        rank = np.full(counts.size, -1)
        rank[big] = np.arange(big.size)
        self.cls = rank[inverse]
        self.patterns = self.bits[first[big]]             # (classes, P)
        loose = np.flatnonzero(self.cls < 0)
        if loose.size and big.size:
            twice = 2.0 * self.patterns.T
            sizes = self.patterns.sum(axis=1)
            for a in range(0, loose.size, 4096):
                part = self.bits[loose[a:a + 4096]]
                ones = part.sum(axis=1)
                # rows joining a class: 1 + Hamming(b, c) = 1 + |b| + |c| - 2 b.c
                cost = 1 + ones[:, None] + sizes - part @ twice
                best = np.argmin(cost, axis=1)
                join = cost[np.arange(best.size), best] < ones
                self.cls[loose[a:a + 4096][join]] = best[join]


def _partners(idx, shift, size):
    """Flat indices of the partners at ``shift`` of the voxels ``idx``.

    A voxel that lies in no window of the lag (it joined a class, and its
    product is taken back by the corrections) may have its partner beyond
    the working copy: it is paired with the zero column at ``size``.
    """
    out = idx + shift
    if out.size and (out.min() < 0 or out.max() >= size):
        out[(out < 0) | (out >= size)] = size
    return out


class _Voxels:
    """Fixed voxels of the working copy, gathered (as the columns of a
    ``(volumes, voxels)`` matrix) at a shift: by runs of consecutive voxels
    (slices) when they are long, else index by index."""

    def __init__(self, idx):
        self.idx = idx
        cut = np.flatnonzero(np.diff(idx) != 1) + 1
        self.starts = idx[np.concatenate(([0], cut))].tolist() if idx.size else []
        self.lengths = np.diff(np.concatenate(([0], cut, [idx.size]))).tolist() \
            if idx.size else []
        self.by_runs = idx.size >= _RUN_LENGTH * max(1, len(self.starts))

    def gather(self, flat, shift, rows, out):
        size = flat.shape[1] - 1
        if not self.by_runs or self.idx[0] + shift < 0 or self.idx[-1] + shift >= size:
            return np.take(flat[:rows], _partners(self.idx, shift, size), axis=1, out=out)
        o = 0
        for a, n in zip(self.starts, self.lengths):
            out[:, o:o + n] = flat[:rows, a + shift:a + shift + n]
            o += n
        return out


def _mask_chunk(flat, z0, z1, geo, classes, sink):
    """Lag products over the shifted masks, left voxels in planes ``[z0, z1)``.

    The voxels of every class (:class:`_Classes`) are gathered once; per lag,
    a class lying in any window of the lag costs one gather of its partners
    and one product, added to the windows it lies in; then the voxels whose
    windows differ from their class's are corrected window by window.
    """
    m = geo.m
    size = flat.shape[1] - 1
    here = (classes.z >= z0) & (classes.z < z1)
    where = (classes.z - z0) * geo.sz + classes.inplane   # flat index in the working copy
    chosen = np.flatnonzero(here & (classes.cls >= 0))
    order = chosen[np.argsort(classes.cls[chosen], kind="stable")]
    n_classes = classes.patterns.shape[0]
    bounds = np.searchsorted(classes.cls[order], np.arange(n_classes + 1))
    present = np.flatnonzero(np.diff(bounds) > 0)
    members = {c: _Voxels(where[order[bounds[c]:bounds[c + 1]]]) for c in present}
    lefts = {c: np.take(flat, v.idx, axis=1) for c, v in members.items()}
    # one buffer for the partners of every class: a fresh array per product
    # would be mapped (and faulted in) anew each time
    partner = np.empty((m + 1) * int(np.diff(bounds).max(initial=0)))
    # voxels whose windows differ from their class's somewhere
    voxels = np.flatnonzero(here)
    taken = np.zeros((voxels.size, classes.bits.shape[1]), dtype=bool)
    has = classes.cls[voxels] >= 0
    taken[has] = classes.patterns[classes.cls[voxels[has]]]
    odd = (classes.bits[voxels] != taken).any(axis=1)
    voxels, taken = voxels[odd], taken[odd]
    own = classes.bits[voxels]
    for lag in geo.lags:
        zero = not any(lag)
        mm = geo.rows(lag)
        pairs = geo.pairs(lag)
        ps = np.array([p for p, _ in pairs])
        s = geo.shift(lag)
        active = present[classes.patterns[present][:, ps].any(axis=1)]
        products = np.empty((active.size, mm, mm))
        for i, c in enumerate(active):
            lc = lefts[c][:mm]
            if zero:
                products[i] = lc @ lc.T
            else:
                out = partner[:mm * lc.shape[1]].reshape(mm, -1)
                products[i] = lc @ members[c].gather(flat, s, mm, out).T
        weights = classes.patterns[active][:, ps].T.astype(np.float64)
        blocks = (weights @ products.reshape(active.size, mm * mm)).reshape(len(ps), mm, mm)
        if voxels.size:
            # window by window, the voxels whose membership differs from
            # their class's: + where only the voxel lies in it, - the reverse
            ks, rows = np.nonzero((own[:, ps] != taken[:, ps]).T)
            if ks.size:
                idx = where[voxels[rows]]
                lc = np.take(flat[:mm], idx, axis=1)
                lc[:, ~own[rows, ps[ks]]] *= -1.0
                rc = np.take(flat[:mm], _partners(idx, s, size), axis=1)
                cuts = np.flatnonzero(np.diff(ks)) + 1
                for a, b in zip(np.concatenate(([0], cuts)),
                                np.concatenate((cuts, [ks.size]))):
                    blocks[ks[a]] += lc[:, a:b] @ rc[:, a:b].T
                if zero:  # signed corrections are products of two operands
                    blocks = 0.5 * (blocks + blocks.transpose(0, 2, 1))
        sink(lag, pairs, blocks)
