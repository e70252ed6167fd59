"""Lag statistics of a run of blocks in compact form (a lane's running sums).

A lane (a thread summing a run of blocks, see :mod:`p2s_dask.graph.engine`)
needs the ``F x F`` scatter of the patch features (``F = P m``, ``P`` offsets,
``m`` volumes) only once, for the solve. :class:`LagParts` holds instead the
lag products of :mod:`.lagstats` that make it up, in ``(m + 1) x (m + 1)``
pieces (the volumes and one more row), summed block after block, and forms
the scatter once, from the sum of all lanes (:meth:`LagParts.stats`).

Every block of a lane is centred on one per-volume reference ``a`` (the first
block's mean, nearest integer for integers of up to 16 bits), so the pieces
of all blocks add; two lanes with different references merge exactly after
moving one onto the other's reference (each piece carries its sums and
counts: :func:`_rebase`).

Two forms:

- **cells** (no mask; the engine's unmasked lanes). With ``K = I - a``
  inside the image and 0 outside, and ``B`` the indicator of the image (the
  extra row), the cross product of the features ``(u, d)`` and
  ``(w, d + delta)`` over the image ``Box`` is, with ``h = floor(delta / 2)``
  (per axis) and ``e = d + h``,

      sum_{x in Box} K(x + d) K(x + d + delta)^T
          = sum_{z in Box, z - e in Box} K(z - h) K(z + delta - h)^T,

  a sum over the voxels ``z`` *owned* by the blocks, whose partners lie
  within the radius (``|h|, |delta - h| <= r``), so a block's halo of ``r``
  reaches them and no voxel is counted by two blocks. The windows ``z - e in
  Box`` differ only on the image's face layers (``r`` thick), and only along
  the axes where the products there are not zero (for ``r = 1``: where
  ``delta`` is 0). A lane keeps, per lag (half of them, by symmetry), one
  piece for the bulk and one per face layer (and edge, corner) of those
  axes: at most 185 pieces at ``r = 1`` (one lane touching every face; 63
  for the bulk alone), against the ``729 m^2`` numbers of the scatter.
  Centring: the features are zero beyond the image, i.e. ``-a`` about the
  reference; the terms of that padding come from the extra row and column
  (sums of ``K`` where a partner lies outside, and counts), see
  :func:`_centred_cells`. The sum over all blocks of the image is the
  image's statistics; a part of the image alone is not a block's (the
  blocks own voxels ``z``, not fitting voxels).
- **windows** (with a mask). The window sums of :func:`.lagstats._lag_products`
  (every block's fitting voxels ``x``, products over ``x + d``), one piece
  per lag and window: about half an ``F x F`` (378 pieces at ``r = 1``), as
  a mask's shell leaves no two windows equal. The pieces of any blocks add
  up to those blocks' statistics.

Integers of up to 16 bits stay exact (every piece an integer that float64
holds) while ``2 spread^2 voxels < 2^53`` over the lane (``spread`` the
largest distance of a value from the reference); past that bound the sums
are rounded as float sums are. The scatter is then formed in int64 as in
:func:`.lagstats._finish_exact`.

Plain NumPy; one thread (the caller limits BLAS).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from .lagstats import (_EXACT, _centred_into, _checked, _finish_exact,
                       _finish_float, _lag_products, _reference, _volume_major)
from .patches import patch_offsets, patch_size
from .stats import Stats

# the working copy of a block's lag products holds about this much (never
# fewer than 1 + 2 r planes of all volumes)
SLAB_BYTES = 64 << 20
# exact integer statistics need fewer fitting voxels than this (the int64
# forming of the scatter, as in lagstats._reference)
_EXACT_COUNT = 1 << 26


class LagParts:
    """Lag statistics of a run of blocks, summed in compact form.

    Parameters
    ----------
    m : int
        Volumes of the group.
    radius : tuple of 3 ints
        Patch radius (not all zero).
    image_shape : tuple of 3 ints, optional
        The whole image's spatial shape: the *cells* form (no mask; blocks
        are added with their origin, and only the sum over every block of the
        image is a statistic). Without it, the *windows* form (masks allowed;
        any set of blocks).

    Notes
    -----
    :meth:`add` a block, :meth:`merge` another lane (same form), then
    :meth:`stats` once: it forms the ``F x F`` scatter and spends the parts.
    """

    def __init__(self, m: int, radius, image_shape=None):
        self.m = int(m)
        self.radius = tuple(int(r) for r in radius)
        self.image_shape = None if image_shape is None else \
            tuple(int(s) for s in image_shape)
        self.parts = {}   # key -> (m + 1, m + 1) float64 piece
        self.count = 0    # fitting voxels (cells: voxels owned)
        self.ref = None   # per-volume reference, from the first block
        self.exact = False
        self.spread = 0   # integers: largest |value - ref| seen (with |ref|)
        self.voxels = 0   # integers: voxels of the blocks' working copies

    @property
    def nbytes(self) -> int:
        """Bytes of the pieces held."""
        return sum(a.nbytes for a in self.parts.values())

    def add(self, block: np.ndarray, mask: np.ndarray | None = None, origin=None,
            max_bytes: int = SLAB_BYTES) -> None:
        """Add a block's lag products.

        Parameters
        ----------
        block : ndarray, shape (bx + 2 r0, by + 2 r1, bz + 2 r2, m)
            One group's volumes with a halo of ``radius`` (zeros beyond the
            image), as :func:`.lagstats.lag_block_stats` takes it.
        mask : ndarray of bool, shape (bx, by, bz), optional
            Fitting voxels (windows form only).
        origin : tuple of 3 ints
            The block's first interior voxel in the image (cells form).
        max_bytes : int
            About the most memory of the block's float64 working copy.
        """
        block, mask, count = _checked(block, self.radius, mask)
        if count == 0:
            return
        self._reference(block, mask, count)
        if self.image_shape is None:
            sink = functools.partial(_store_windows, self.parts, patch_offsets(self.radius))
            _lag_products(block, self.radius, mask, self.ref, max_bytes, sink, True)
        elif mask is not None:
            raise ValueError("the cells form takes no mask (use image_shape=None)")
        else:
            geo = _CellGeometry(block.shape[:3], self.radius, self.m,
                                origin, self.image_shape)
            _cell_products(block, geo, self.ref, max_bytes, self.parts)
        self.count += count

    def _reference(self, block, mask, count):
        """Take the first block's reference; keep the integer bound."""
        if self.ref is None:
            self.ref, self.exact = _reference(block, self.radius, mask, count)
        if not self.exact:
            return
        top = block.max(axis=(0, 1, 2)).astype(np.int64)
        bottom = block.min(axis=(0, 1, 2)).astype(np.int64)
        # |ref| too: the features are -ref beyond the image
        spread = max(np.abs(top - self.ref).max(), np.abs(bottom - self.ref).max(),
                     np.abs(self.ref).max())
        self.spread = max(self.spread, int(spread))
        self.voxels += int(np.prod(block.shape[:3]))
        self.exact = self._bounded()

    def _bounded(self) -> bool:
        # every partial sum is at most twice a sum of |products| over the
        # working copies (a piece is a run's product less thin ones)
        spread = max(1, self.spread)
        return 2 * spread * spread * self.voxels < _EXACT and \
            self.count < _EXACT_COUNT

    def merge(self, other: "LagParts") -> "LagParts":
        """Add another lane's parts (same group and form) into these, in
        place; ``other`` is spent. Returns ``self``."""
        if other is self or other.ref is None:
            return self
        if (other.m, other.radius, other.image_shape) != (self.m, self.radius,
                                                          self.image_shape):
            raise ValueError("merging lag parts of another group or form")
        if self.ref is None:
            self.__dict__.update(other.__dict__)
            other.parts = {}
            return self
        exact = self.exact and other.exact
        if not np.array_equal(self.ref, other.ref):
            shift = np.asarray(other.ref) - np.asarray(self.ref)
            for piece in other.parts.values():
                _rebase(piece, shift)
            other.spread += int(np.ceil(np.abs(shift).max()))
        for key, piece in other.parts.items():
            held = self.parts.get(key)
            if held is None:
                self.parts[key] = piece
            else:
                held += piece
        other.parts = {}
        self.count += other.count
        self.voxels += other.voxels
        self.spread = max(self.spread, other.spread)
        self.exact = exact and self._bounded()
        return self

    def stats(self) -> Stats:
        """The statistics (features in the order of
        :func:`.lagstats.lag_block_stats`), formed once; the parts are spent.

        In the cells form, only once every block of the image is in.
        """
        m, n_offsets = self.m, patch_size(self.radius)
        if self.ref is None:
            return Stats.empty(m * n_offsets)
        if self.image_shape is not None and self.count != math.prod(self.image_shape):
            raise ValueError(f"the cells of {self.count} voxels are not the image's "
                             f"{math.prod(self.image_shape)}: merge every lane first")
        self.exact = self.exact and self._bounded()  # with the last block's count
        parts, self.parts = self.parts, {}
        if self.image_shape is None:
            cross, sums = _assemble_windows(parts, m, self.radius)
        else:
            cross, sums = _centred_cells(parts, self)
        del parts
        _volume_major(cross, m, n_offsets)
        finish = _finish_exact if self.exact else _finish_float
        return finish(cross, sums, self.ref, self.count)


def _rebase(piece, shift):
    """Move a piece onto a reference ``shift`` lower, in place.

    With ``c' = c + shift * b`` for the volumes' rows (``b`` the last row: the
    ones of the windows form, the image indicator of the cells form):
    ``L' = L + shift bk^T + kb shift^T + bb shift shift^T``, ``kb' = kb + bb
    shift``, ``bk' = bk + bb shift``.
    """
    m = piece.shape[0] - 1
    v = np.asarray(shift, dtype=np.float64)
    kb, bk, bb = piece[:m, m].copy(), piece[m, :m].copy(), piece[m, m]
    body = piece[:m, :m]
    # the two terms summed first: a symmetric piece stays exactly symmetric
    body += np.outer(v, bk) + np.outer(kb, v)
    body += bb * np.outer(v, v)
    piece[:m, m] = kb + bb * v
    piece[m, :m] = bk + bb * v


def _accumulate(parts, key, piece):
    held = parts.get(key)
    if held is None:
        parts[key] = np.array(piece, order="C")  # its own memory
    else:
        held += piece


# ----------------------------------------------------------------------------
# windows form (masks)


def _store_windows(parts, offsets, lag, pairs, blocks):
    """A sink of :func:`.lagstats._lag_products`: each window sum under
    ``(lag, p)`` of the lag in the image's axes (lexicographically >= 0) and
    the window's left offset ``p`` (a block's lag in its permuted axes may be
    the opposite one: then its pieces are transposed)."""
    p0, q0 = pairs[0]
    lag_o = tuple(int(v) for v in offsets[q0] - offsets[p0])
    flip = lag_o < (0, 0, 0)
    if flip:
        lag_o = tuple(-v for v in lag_o)
    for (p, q), piece in zip(pairs, blocks):
        if flip:
            _accumulate(parts, (lag_o, q), piece.T)
        else:
            _accumulate(parts, (lag_o, p), piece)


def _assemble_windows(parts, m, radius):
    """The offset-major cross products and the per-offset sums from the
    window pieces (popped as they are placed)."""
    offsets = patch_offsets(radius)
    index = {tuple(int(v) for v in o): i for i, o in enumerate(offsets)}
    n_offsets = len(offsets)
    cross = np.zeros((n_offsets * m, n_offsets * m))
    sums = np.zeros((m, n_offsets))
    for key in sorted(parts):
        lag, p = key
        piece = parts.pop(key)
        q = index[tuple(int(v) for v in offsets[p] + lag)]
        cross[p * m:(p + 1) * m, q * m:(q + 1) * m] = piece[:m, :m]
        if p == q:
            sums[:, p] = piece[:m, m]
        else:
            cross[q * m:(q + 1) * m, p * m:(p + 1) * m] = piece[:m, :m].T
    return cross, sums


# ----------------------------------------------------------------------------
# cells form (no mask)

_ZERO = "zero"


@functools.lru_cache(maxsize=4096)
def _segments(n, r, origin, size, e):
    """Runs ``(start, stop, key)`` of a block's interior along one axis for
    the lag component ``e``.

    ``key`` is None for the bulk (every window of the lag holds the voxel),
    else the image coordinate of a face layer whose windows differ; layers
    where every product is zero (a partner beyond the image) are left out.
    The block's interior is ``[origin, origin + n)`` of an axis of ``size``.
    """
    h = e // 2
    wins = [d + h for d in range(-r, r + 1) if abs(d + e) <= r]
    keys = []
    for g in range(origin, origin + n):
        if r <= g < size - r:
            keys.append(None)
        elif not (0 <= g - h < size and 0 <= g + e - h < size):
            keys.append(_ZERO)
        elif all(0 <= g - w < size for w in wins):
            keys.append(None)
        else:
            keys.append(g)
    runs, start = [], 0
    for key, group in itertools.groupby(keys):
        stop = start + len(list(group))
        if key != _ZERO:
            runs.append((start, stop, key))
        start = stop
    return tuple(runs)


class _CellGeometry:
    """A block in permuted axes (slow: the thinnest, middle, fast) and its
    place in the image, for the cells form.

    The working copy holds ``K`` (values minus the reference inside the
    image, 0 beyond it) and the image indicator as its last row, without the
    padding of :class:`.lagstats._Geometry`: an interior voxel's partners
    never wrap around a line, and the halo columns between the lines of a
    run pair only zeros unless the fast axis's halo holds image voxels
    (``gaps``: then their products are taken back, see :class:`_Run`).
    """

    def __init__(self, block_shape, radius, m, origin, image_shape):
        self.perm = tuple(int(a) for a in np.argsort(block_shape, kind="stable"))
        self.b = tuple(int(block_shape[a]) for a in self.perm)
        self.r = tuple(int(radius[a]) for a in self.perm)
        self.n = tuple(b - 2 * r for b, r in zip(self.b, self.r))
        self.o = tuple(int(origin[a]) for a in self.perm)
        self.size = tuple(int(image_shape[a]) for a in self.perm)
        self.m = m
        self.sx = self.b[2]
        self.sz = self.b[1] * self.sx
        ranges = [range(-2 * r, 2 * r + 1) for r in self.r]
        self.lags = [d for d in itertools.product(*ranges) if d >= (0, 0, 0)]
        self.gaps = self.r[2] > 0 and (self.o[2] > 0 or self.o[2] + self.n[2] < self.size[2])

    def segments(self, axis, e):
        return _segments(self.n[axis], self.r[axis], self.o[axis], self.size[axis], e)

    def shift(self, lag):
        return lag[0] * self.sz + lag[1] * self.sx + lag[2]

    def chunks(self, max_bytes):
        """Ranges of interior slow-axis planes worked on at once."""
        plane = self.sz * (self.m + 1) * 8
        step = max(1, int(max_bytes // plane) - 2 * self.r[0])
        return [(c, min(self.n[0], c + step)) for c in range(0, self.n[0], step)]

    def outside(self, axis, lo, hi):
        """The ranges of halo indices in ``[lo, hi)`` of ``axis`` that lie
        beyond the image (below it, above it)."""
        first = self.o[axis] - self.r[axis]  # image coordinate of halo index 0
        below = (lo, min(hi, max(lo, -first)))
        above = (max(lo, min(hi, self.size[axis] - first)), hi)
        return below, above

    def working_copy(self, block, ref, c0, c1):
        """The ``(m + 1, voxels)`` float64 copy of the halo planes that the
        interior planes ``[c0, c1)`` reach."""
        top = c1 + 2 * self.r[0]
        src = np.moveaxis(block.transpose(self.perm + (3,))[c0:top], 3, 0)
        flat = np.empty((self.m + 1, (top - c0) * self.sz))
        work = flat.reshape(self.m + 1, top - c0, self.b[1], self.b[2])
        _centred_into(src, ref, work[:self.m])
        work[self.m] = 1.0
        for axis, (lo, hi) in enumerate([(c0, top), (0, self.b[1]), (0, self.b[2])]):
            for a, b in self.outside(axis, lo, hi):
                if b > a:
                    index = [slice(None)] * 4
                    index[axis + 1] = slice(a - lo, b - lo)
                    work[tuple(index)] = 0.0
        return flat


def _cell_products(block, geo, ref, max_bytes, parts):
    """Add a block's cells (see the module docstring) into ``parts``."""
    add = _cell_adder(parts, geo.perm)
    for c0, c1 in geo.chunks(max_bytes):
        flat = geo.working_copy(block, ref, c0, c1)
        _cell_chunk(flat, c0, c1, geo, add)
        del flat


def _cell_chunk(flat, c0, c1, geo, add):
    """The cells of the interior planes ``[c0, c1)``: per lag, plane and run
    of lines of one key along the middle axis, one product (:class:`_Run`)."""
    for lag in geo.lags:
        segs = [geo.segments(k, lag[k]) for k in range(3)]
        if not all(segs):
            continue  # every product of the lag is zero here
        run = _Run(geo, lag, segs[2])
        for a0, e0, k0 in segs[0]:
            for i0 in range(max(a0, c0), min(e0, c1)):
                plane = (i0 - c0 + geo.r[0]) * geo.sz + geo.r[2]
                for a1, e1, k1 in segs[1]:
                    start = plane + (a1 + geo.r[1]) * geo.sx
                    run.products(flat, start, e1 - a1, (k0, k1), add)


class _Run:
    """One lag's products over runs of whole lines of a plane.

    A run is one contiguous stretch of the working copy, from the first
    interior voxel of its first line to the last of its last line: one
    matrix product of two shifted views (nothing gathered). The face layers
    of the fast axis in it are gathered, given their own cells and taken
    from the bulk, as are the halo columns between lines where they hold
    image voxels.
    """

    def __init__(self, geo, lag, fast):
        self.lag = lag
        self.zero = not any(lag)
        h = tuple(v // 2 for v in lag)
        self.left = geo.shift(h)                                        # z - h
        self.right = geo.shift(tuple(v - w for v, w in zip(lag, h)))   # z + lag - h
        self.sx, self.width = geo.sx, geo.n[2]
        self.live = [(np.arange(a, b), key) for a, b, key in fast if key is not None]
        self.core = any(key is None for _, _, key in fast)
        self.gaps = np.arange(geo.n[2], geo.sx) if geo.gaps else None

    def _gathered(self, flat, cols):
        left = np.take(flat, cols - self.left, axis=1)
        if self.zero:
            return left @ left.T
        return left @ np.take(flat, cols + self.right, axis=1).T

    def products(self, flat, start, lines, keys, add):
        """Add the cells of ``lines`` lines from the flat index ``start``
        (their first interior voxel), keyed ``keys + (fast key,)``."""
        stop = start + (lines - 1) * self.sx + self.width
        left = flat[:, start - self.left:stop - self.left]
        if self.zero:
            total = left @ left.T
        else:
            total = left @ flat[:, start + self.right:stop + self.right].T
        firsts = start + self.sx * np.arange(lines)[:, None]
        for cols, key in self.live:
            part = self._gathered(flat, (firsts + cols).ravel())
            add(self.lag, keys + (key,), part)
            total -= part
        if self.gaps is not None and lines > 1:
            total -= self._gathered(flat, (firsts[:-1] + self.gaps).ravel())
        if self.core:
            add(self.lag, keys + (None,), total)


def _unpermute(values, perm):
    out = [None] * 3
    for k, axis in enumerate(perm):
        out[axis] = values[k]
    return tuple(out)


def _cell_adder(parts, perm):
    """``add(lag, key, piece)``: accumulate a piece of a lag and cell given
    in a block's permuted axes under the image's axes. A lag that is
    lexicographically negative there is stored as its opposite, transposed:
    the same voxels own both (``floor(-lag / 2) = floor(lag / 2) - lag``),
    and their cells have the same keys."""
    canon = {}

    def add(lag, key, piece):
        if lag not in canon:
            lag_o = _unpermute(lag, perm)
            flip = lag_o < (0, 0, 0)
            canon[lag] = (tuple(-v for v in lag_o) if flip else lag_o, flip)
        lag_o, flip = canon[lag]
        _accumulate(parts, (lag_o, _unpermute(key, perm)), piece.T if flip else piece)
    return add


def _lag_windows(cells, lag, radius, shape, index):
    """``((p, q), piece)`` of every window of ``lag``: the sum of the cells
    whose voxels ``z`` it holds (``z - e`` in the image)."""
    h = tuple(v // 2 for v in lag)
    wins = [[d + hh for d in range(-r, r + 1) if abs(d + v) <= r]
            for r, v, hh in zip(radius, lag, h)]
    for e in itertools.product(*wins):
        piece = np.zeros_like(cells[0][1])
        for key, cell in cells:
            if all(g is None or 0 <= g - w < s for g, w, s in zip(key, e, shape)):
                piece += cell
        d = tuple(w - hh for w, hh in zip(e, h))
        yield (index[d], index[tuple(a + b for a, b in zip(d, lag))]), piece


def _centred_cells(parts, lane):
    """The offset-major cross products of the features about the lane's
    reference and their per-offset sums ``(m, P)``, from the cells (popped
    as they are used)."""
    m = lane.m
    offsets = patch_offsets(lane.radius)
    index = {tuple(int(v) for v in o): i for i, o in enumerate(offsets)}
    n_offsets = len(offsets)
    cross = np.zeros((n_offsets * m, n_offsets * m))
    edges = {}  # (p, q): the window's last column, row and corner
    by_lag = {}
    for key in parts:
        by_lag.setdefault(key[0], []).append(key)
    for lag, keys in sorted(by_lag.items()):
        cells = [(key[1], parts.pop(key)) for key in sorted(keys, key=repr)]
        for (p, q), piece in _lag_windows(cells, lag, lane.radius, lane.image_shape, index):
            cross[p * m:(p + 1) * m, q * m:(q + 1) * m] = piece[:m, :m]
            edges[p, q] = (piece[:m, m].copy(), piece[m, :m].copy(), float(piece[m, m]))
        del cells
    return cross, _padding_terms(cross, edges, lane)


def _padding_terms(cross, edges, lane):
    """Turn ``cross`` into the products of the features about the reference
    (``-a`` beyond the image) and return their per-offset sums ``(m, P)``.

    Offsets ``p, q`` with ``kb = sum K_p B_q``, ``bk = sum B_p K_q``, ``bb =
    sum B_p B_q`` (a window's last column, row and corner), the zero lag's
    sums ``s_p = sum K_p`` and counts ``c_p = sum B_p``, ``N`` voxels: the
    features ``K_p - a (1 - B_p)`` give ``C_pq = T_pq - (s_p - kb) a^T -
    a (s_q - bk)^T + (N - c_p - c_q + bb) a a^T`` and the sums
    ``s_p - a (N - c_p)``; in int64 for exact integers.
    """
    m, count, exact = lane.m, lane.count, lane.exact
    kind = np.int64 if exact else np.float64
    a = np.asarray(lane.ref).astype(kind)
    n_offsets = cross.shape[0] // m
    sums = _typed(np.stack([edges[p, p][0] for p in range(n_offsets)], axis=1), kind)
    inside = _typed(np.array([edges[p, p][2] for p in range(n_offsets)]), kind)
    for (p, q), (kb, bk, bb) in edges.items():
        rows, cols = slice(p * m, (p + 1) * m), slice(q * m, (q + 1) * m)
        block = cross[rows, cols]
        left = sums[:, p] - _typed(kb, kind)
        right = sums[:, q] - _typed(bk, kind)
        outside = count - inside[p] - inside[q] + _typed(bb, kind)
        whole = _typed(block, kind)
        # summed first: the zero lag's blocks stay exactly symmetric
        whole -= np.outer(left, a) + np.outer(a, right)
        whole += outside * np.outer(a, a)
        block[...] = whole
        if p != q:
            cross[cols, rows] = block.T
    return sums - np.outer(a, count - inside)


def _typed(x, kind):
    """``x`` as float64, or rounded to int64 (exact integers held in floats)."""
    if kind is np.int64:
        return np.rint(x).astype(np.int64)
    return np.array(x, dtype=np.float64)


def lane_pieces(radius, masked: bool = False) -> int:
    """The most pieces a lane holds: the cells of a lane touching every face
    of the image (185 at ``r = 1``, 63 of them the bulk), or with a mask every
    window of half the lags (378 at ``r = 1``). Each is ``(m + 1)^2`` float64.

    Parameters
    ----------
    radius : tuple of 3 ints
    masked : bool, optional
        The windows form (a mask).

    Returns
    -------
    int
    """
    radius = tuple(int(r) for r in radius)
    n_offsets = patch_size(radius)
    if masked:
        return (n_offsets * n_offsets + n_offsets) // 2
    total = 0
    for lag in itertools.product(*[range(-2 * r, 2 * r + 1) for r in radius]):
        if lag < (0, 0, 0):
            continue
        count = 1
        for r, e in zip(radius, lag):
            size = 4 * r + 2  # both faces, apart
            layers = _segments(size, r, 0, size, e)
            count *= 1 + sum(key is not None for _, _, key in layers)
        total += count
    return total
