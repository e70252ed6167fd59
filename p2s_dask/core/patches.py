"""Patch geometry and patch-feature extraction for one block of voxels.

A block is a 4D array ``(bx + 2 r0, by + 2 r1, bz + 2 r2, m)``: the ``m`` volumes
of one group over a spatial box plus a halo of ``r`` voxels on each side. The
halo holds the neighbouring voxels of the image, or zeros beyond the image border
(the zero padding Patch2Self uses). The *interior* is the box without the halo.

Feature ``u * P + p`` of an interior voxel ``x`` is volume ``u`` at ``x + d_p``,
where ``d_p`` is the ``p``-th patch offset in C order (``P`` offsets in all), so
the ``P`` features of one volume are contiguous and the centre feature of volume
``u`` is ``u * P + P // 2``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator

import numpy as np


def normalize_radius(patch_radius) -> tuple[int, int, int]:
    """Return ``patch_radius`` as three non-negative ints.

    Parameters
    ----------
    patch_radius : int or sequence of 1 or 3 ints
        Radius of the patch along x, y and z, in voxels.

    Returns
    -------
    tuple of int
        ``(r0, r1, r2)``.

    Raises
    ------
    ValueError
        If a radius is negative, not an integer, or the length is not 1 or 3.
    """
    values = np.atleast_1d(np.asarray(patch_radius, dtype=object)).ravel()
    if values.size == 1:
        values = np.repeat(values, 3)
    if values.size != 3:
        raise ValueError(
            "patch_radius must be a scalar or a 3-element array (one int or three "
            f"ints); got {patch_radius!r}"
        )
    out = []
    for v in values:
        is_int = isinstance(v, numbers.Integral) and not isinstance(v, bool)
        if isinstance(v, numbers.Real) and not is_int and float(v).is_integer():
            is_int = True
        if not is_int or int(v) < 0:
            raise ValueError(
                "patch_radius must be a scalar or a 3-element array of non-negative "
                f"integers; got {patch_radius!r}"
            )
        out.append(int(v))
    return tuple(out)


def patch_size(radius: tuple[int, int, int]) -> int:
    """Number of voxels in a patch of the given radius."""
    return int(np.prod([2 * r + 1 for r in radius]))


def patch_offsets(radius: tuple[int, int, int]) -> np.ndarray:
    """Patch offsets ``(P, 3)`` in C order, from ``-r`` to ``+r`` per axis."""
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij")
    return np.stack([g.ravel() for g in grids], axis=1)


def interior_shape(block_shape, radius) -> tuple[int, int, int]:
    """Spatial shape of a block once its halo is removed."""
    return tuple(int(block_shape[i]) - 2 * radius[i] for i in range(3))


def shifted_views(block: np.ndarray, radius, box=None) -> list[np.ndarray]:
    """Views of ``block`` at each patch offset, aligned with the interior.

    Parameters
    ----------
    block : ndarray, shape (bx + 2 r0, by + 2 r1, bz + 2 r2, m)
    radius : tuple of int
    box : tuple of three (start, stop) pairs, optional
        Restrict to this sub-box of the interior.

    Returns
    -------
    list of ndarray
        One view ``(nx, ny, nz, m)`` per patch offset, in C order.
    """
    if box is None:
        box = tuple((0, n) for n in interior_shape(block.shape, radius))
    (x0, x1), (y0, y1), (z0, z1) = box
    views = []
    for dx, dy, dz in patch_offsets(radius):
        sx = radius[0] + dx
        sy = radius[1] + dy
        sz = radius[2] + dz
        views.append(block[sx + x0:sx + x1, sy + y0:sy + y1, sz + z0:sz + z1])
    return views


def features(block: np.ndarray, radius, box=None) -> np.ndarray:
    """Feature matrix of the interior voxels of a block, in float64.

    Returns
    -------
    ndarray, shape (n_voxels, m * P)
        Rows in C order over the (sub-box of the) interior; column ``u * P + p``.
    """
    views = shifted_views(block, radius, box)
    m = block.shape[-1]
    nvox = int(np.prod(views[0].shape[:3]))
    out = np.empty((nvox, m, len(views)), dtype=np.float64)
    for p, view in enumerate(views):
        out[:, :, p] = view.reshape(nvox, m)
    return out.reshape(nvox, m * len(views))


def sub_boxes(shape, n_features: int,
              max_bytes: int = 32 * 2**20, order: str = "C") -> Iterator[tuple]:
    """Split a box of ``shape`` into sub-boxes whose features fit.

    In C order, sub-boxes are whole x-slabs when one x-slice fits in
    ``max_bytes``, else runs of y-rows, else runs of z; they tile the box in
    C order, so their rows concatenate to the C-ordered rows of the whole
    box. In 'F' order the same with the axes reversed (z-slabs first): a
    volume-major block's sub-box is then copied in long contiguous runs
    (x-slabs two voxels thick were copied two values at a time: measured
    1.4x the products' GEMM time).
    """
    if order == "F":
        for box in _c_boxes(tuple(shape)[::-1], n_features, max_bytes):
            yield box[::-1]
        return
    yield from _c_boxes(shape, n_features, max_bytes)


def _c_boxes(shape, n_features, max_bytes):
    """:func:`sub_boxes` in C order."""
    nx, ny, nz = (int(s) for s in shape)
    per_voxel = max(1, n_features * 8)
    budget = max(1, int(max_bytes // per_voxel))
    if ny * nz <= budget:
        step = max(1, budget // max(1, ny * nz))
        for x0 in range(0, nx, step):
            yield ((x0, min(nx, x0 + step)), (0, ny), (0, nz))
    elif nz <= budget:
        step = max(1, budget // nz)
        for x0 in range(nx):
            for y0 in range(0, ny, step):
                yield ((x0, x0 + 1), (y0, min(ny, y0 + step)), (0, nz))
    else:
        for x0 in range(nx):
            for y0 in range(ny):
                for z0 in range(0, nz, budget):
                    yield ((x0, x0 + 1), (y0, y0 + 1), (z0, min(nz, z0 + budget)))
