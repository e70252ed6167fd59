"""Prediction of one group's denoised volumes on one block."""

from __future__ import annotations

import math

import numpy as np

from .layout import piece_rows, rows_order, voxel_rows
from .patches import interior_shape, shifted_views, sub_boxes
from .postprocess import cast_into
from .solve import LinearModel


def predict_block(block: np.ndarray, radius, model: LinearModel, out=None,
                  transform=None, max_bytes: int = 4 * 2**20,
                  dtype=np.float64) -> np.ndarray:
    """Denoised volumes on the interior of a block.

    Parameters
    ----------
    block : ndarray, shape (bx + 2 r0, by + 2 r1, bz + 2 r2, m)
        The volumes with a halo of ``radius`` (zeros beyond the image border).
    radius : tuple of int
    model : LinearModel
        Acting on the ``m`` volumes of the block.
    out : ndarray, shape (bx, by, bz, n_out), optional
        Where to write; any dtype (integers are rounded to nearest and
        clipped to their range, see :func:`.postprocess.cast_into`). By
        default a new array of ``dtype`` in the block's memory order.
    transform : callable, optional
        Applied to each ``(voxels, n_out)`` piece of ``dtype`` before it is
        written (post-processing, bookkeeping) and returning the values to
        write.
    max_bytes : int
        The block is walked in pieces of about this many bytes, which keeps
        temporaries in cache and out of fresh memory pages.
    dtype : numpy dtype
        Arithmetic of the matrix products: float64, or float32 (twice the
        speed, float32 rounding: what DIPY uses for non-float64 data).
        A per-volume constant (the intensity shift) goes into the model's
        intercept: :meth:`.solve.LinearModel.shifted`.

    Returns
    -------
    ndarray, shape (bx, by, bz, n_out)
    """
    shape = interior_shape(block.shape, radius)
    n_out = model.n_volumes
    dtype = np.dtype(dtype)
    # a model without intercept (its products only) adds nothing
    constant = np.zeros(0, dtype) if model.intercept is None else \
        np.asarray(model.intercept, np.float64).astype(dtype)
    if out is None:
        out = np.empty(shape + (n_out,), dtype=dtype, order=rows_order(block))
    if not any(radius):
        rows, order = voxel_rows(block)
        out_rows, out_order = voxel_rows(out)
        if rows is not None and out_order == order:
            for j, y in _row_products(rows, order, model, max_bytes, dtype):
                if constant.size:
                    y += constant
                values = transform(y) if transform is not None else y
                if out_rows is not None:
                    cast_into(values, out_rows[j:j + y.shape[0]])
            return out
    for box, acc, order in _patch_products(block, radius, model, shape, max_bytes, dtype):
        if constant.size:
            acc += constant
        if transform is not None:
            acc = transform(acc)
        if out is not None:
            (x0, x1), (y0, y1), (z0, z1) = box
            cast_into(acc.reshape(x1 - x0, y1 - y0, z1 - z0, n_out, order=order),
                      out[x0:x1, y0:y1, z0:z1])
    return out


def finish_products(products: np.ndarray, model: LinearModel, out=None, transform=None,
                    max_bytes: int = 4 * 2**20) -> np.ndarray:
    """What :func:`predict_block` gives, from the products it gave for the
    model's :meth:`~.solve.LinearModel.products_only` (e.g. kept on disk by
    an earlier pass), bit for bit.

    The intercept, the ``transform`` and the cast act value by value (IEEE
    additions and products are exact functions of their operands), so
    applying them to z-slabs of the kept products gives the same bits as
    applying them to the pieces the products were computed in.

    Parameters
    ----------
    products : ndarray (bx, by, bz, n_out)
        In the prediction's arithmetic (its dtype).
    model : LinearModel
        Only its intercept is used (shifted as for :func:`predict_block`).
    out, transform, max_bytes
        As :func:`predict_block`.

    Returns
    -------
    ndarray (bx, by, bz, n_out)
    """
    dtype = products.dtype
    constant = np.asarray(model.intercept, np.float64).astype(dtype)
    if out is None:
        out = np.empty(products.shape, dtype=dtype, order=rows_order(products))
    bx, by, bz, n_out = products.shape
    plane = max(1, bx * by * n_out * dtype.itemsize)
    step = max(1, int(max_bytes) // plane)
    for z0 in range(0, bz, step):
        piece = np.array(products[:, :, z0:z0 + step], dtype=dtype)
        piece += constant
        if transform is not None:
            piece = transform(piece)
        cast_into(piece, out[:, :, z0:z0 + step])
    return out


def prediction_minima(block: np.ndarray, radius, model: LinearModel,
                      max_bytes: int = 4 * 2**20, dtype=np.float64) -> np.ndarray:
    """Per-volume minimum ``(n_out,)`` over the block's interior of the
    values :func:`predict_block` would give (before any offset).

    Rounding is monotonic, so the minimum of ``fl(y + b)`` is
    ``fl(min(y) + b)``: the intercept is added once per volume, not once per
    voxel, and the result is the same bit for bit.
    """
    return prediction_range(block, radius, model, max_bytes, dtype, highest=False)[0]


def prediction_range(block: np.ndarray, radius, model: LinearModel,
                     max_bytes: int = 4 * 2**20, dtype=np.float64,
                     highest: bool = True) -> np.ndarray:
    """Per-volume ``(minimum, maximum)``, shape ``(2, n_out)``, as
    :func:`prediction_minima` (the maximum only when ``highest``; else inf)."""
    dtype = np.dtype(dtype)
    lowest = np.full(model.n_volumes, np.inf, dtype=dtype)
    top = np.full(model.n_volumes, -np.inf, dtype=dtype)
    rows, order = voxel_rows(block) if not any(radius) else (None, None)
    if rows is not None:
        pieces = _row_products(rows, order, model, max_bytes, dtype)
    else:
        shape = interior_shape(block.shape, radius)
        pieces = (piece[:2] for piece in
                  _patch_products(block, radius, model, shape, max_bytes, dtype))
    for _, y in pieces:
        np.minimum(lowest, y.min(axis=0), out=lowest)
        if highest:
            np.maximum(top, y.max(axis=0), out=top)
    return with_intercept(lowest, top, model)


def with_intercept(lowest, highest, model: LinearModel) -> np.ndarray:
    """``(2, n_out)`` float64: the per-volume extremes of a prediction's
    products (in its arithmetic) with the intercept added once per volume
    (rounding is monotonic: the same bits as the extremes of every value
    with its intercept)."""
    intercept = np.asarray(model.intercept, np.float64).astype(lowest.dtype)
    return np.stack([lowest + intercept, highest + intercept]).astype(np.float64)


def _patch_products(block, radius, model, shape, max_bytes, dtype):
    """Yield ``(box, values, order)``: the prediction without intercept,
    sub-box by sub-box, of ``(voxels, n_out)`` values in ``dtype`` whose
    voxels run in ``order`` over the sub-box ('F' for a volume-major block).
    """
    m = block.shape[-1]
    n_out = model.n_volumes
    order = rows_order(block)
    # Rows of W for patch offset p are {u * P + p}: one (m x n_out) slice per
    # offset, so the prediction is a sum of GEMMs over offsets and the
    # (voxels, m * P) feature matrix is never formed.
    w = model.weights.reshape(m, model.patch_size, n_out)
    # the groups' blocks of every offset's weights (the zeros between them
    # skipped: 14% of the products with 20 b0s and 280 DWIs)
    segments = block_segments((w != 0).any(axis=1))
    w = [np.ascontiguousarray(w[:, p, :] if order == "C" else w[:, p, :].T, dtype=dtype)
         for p in range(model.patch_size)]
    boxes = list(sub_boxes(shape, max(m, n_out), max_bytes, order))
    # buffers for the largest sub-box, reused: a run returns freed memory to
    # the system, so a fresh array per view (27 per sub-box) came as fresh
    # pages, faulted in and zeroed each time (measured: the copies then cost
    # half the GEMMs' time)
    most = max((math.prod(b - a for a, b in box) for box in boxes), default=0)
    xbuf = np.empty(most * m, dtype=dtype)
    accbuf, tmpbuf = np.empty(most * n_out, dtype=dtype), np.empty(most * n_out, dtype=dtype)
    for box in boxes:
        views = shifted_views(block, radius, box)
        nvox = int(np.prod(views[0].shape[:3]))
        # Each shifted view is copied in the block's own layout (a copy
        # across layouts is a transpose: measured 2.3x the whole prediction's
        # time for volume-major blocks); volume-major rows are multiplied as
        # W.T @ X.T so that every operand stays contiguous.
        size = (nvox, n_out) if order == "C" else (n_out, nvox)
        acc, tmp = accbuf[:nvox * n_out].reshape(size), tmpbuf[:nvox * n_out].reshape(size)
        x4 = xbuf[:nvox * m].reshape(views[0].shape, order=order)
        x = x4.reshape(nvox, m, order=order)
        for p, view in enumerate(views):
            np.copyto(x4, view)
            _segment_products(x, w[p], segments, order, acc if p == 0 else tmp)
            if p:
                acc += tmp
        yield box, (acc if order == "C" else acc.T), order


def _segment_products(x, w, segments, order, out):
    """``x @ w`` into ``out`` over the weights' blocks (:func:`block_segments`):
    C-ordered ``x (voxels, m)`` and ``w (m, n_out)``, or for volume-major
    rows ``w.T @ x.T`` with ``w`` given transposed and ``out`` ``(n_out,
    voxels)``."""
    for (a, b), (c0, c1) in segments:
        if order == "C":
            np.matmul(x[:, a:b], w[a:b, c0:c1], out=out[:, c0:c1])
        else:
            np.matmul(w[c0:c1, a:b], x.T[a:b], out=out[c0:c1])


def _row_products(rows, order, model, max_bytes, dtype):
    """Patch radius 0: yield ``(start, rows[start:start + k] @ W)`` (no
    intercept), piece by piece, in a reused buffer of the rows' layout.

    For volume-major ('F') rows the product is taken as ``W.T @ rows.T`` so
    that every operand and result keeps the block's own layout.
    """
    n_vox, m = rows.shape
    n_out = model.n_volumes
    weights = np.asarray(model.weights, dtype=dtype)
    if order != "C":  # the transposed weights, in their own contiguous layout
        weights = np.ascontiguousarray(weights.T)
    segments = block_segments(model.weights)
    step = piece_rows(max(m, n_out), dtype.itemsize, max_bytes)
    size = min(step, n_vox)
    xbuf = np.empty((size, m), dtype=dtype, order=order)
    ybuf = np.empty((size, n_out), dtype=dtype, order=order)
    for j in range(0, n_vox, step):
        piece = rows[j:j + step]
        k = piece.shape[0]
        x, y = xbuf[:k], ybuf[:k]
        np.copyto(x, piece, casting="unsafe")
        _segment_products(x, weights, segments, order, y if order == "C" else y.T)
        yield j, y


def block_segments(weights: np.ndarray, min_saving: float = 0.05):
    """Split ``x @ weights`` into products over contiguous blocks.

    Groups of consecutive volumes (b0s first, then DWIs) make the weights
    block-diagonal; their off-diagonal zeros are worth skipping. Returns a
    list of ``((a, b), (c0, c1))``: output columns ``c0:c1`` depend only on
    input rows ``a:b``. One segment covering everything when the saving
    would be small.
    """
    m, n_out = weights.shape
    whole = [((0, m), (0, n_out))]
    nonzero = weights != 0
    used = nonzero.any(axis=0)
    first = np.where(used, nonzero.argmax(axis=0), 0)
    last = np.where(used, m - 1 - nonzero[::-1].argmax(axis=0), -1)
    segments = []
    for c in range(n_out):
        hull = (int(first[c]), int(last[c]) + 1)
        if used[c] and n_out == m:
            # a volume's own (zero) weight sits inside its group's block
            hull = (min(hull[0], c), max(hull[1], c + 1))
        if segments and segments[-1][0] == hull:
            segments[-1] = (hull, (segments[-1][1][0], c + 1))
        else:
            segments.append((hull, (c, c + 1)))
    segments = [seg for seg in segments if seg[0][1] > seg[0][0]]
    work = sum((b - a) * (c1 - c0) for (a, b), (c0, c1) in segments)
    if not segments or work > (1 - min_saving) * m * n_out or len(segments) > 16:
        return whole
    # columns with no weights at all (none in practice) must still be zeroed
    covered = sum(c1 - c0 for _, (c0, c1) in segments)
    return segments if covered == n_out else whole


def combine(models, groups, n_volumes: int, patch_size: int) -> LinearModel:
    """One model over all ``n_volumes`` from per-group models.

    ``models[i]`` (or None for a group passed through) acts on the volumes
    ``groups[i]``; the result predicts every volume in one pass, with weight 1
    on its own centre feature for pass-through volumes (an exact copy, since the
    other terms are exact zeros).
    """
    f = n_volumes * patch_size
    weights = np.zeros((n_volumes, patch_size, n_volumes))
    intercept = np.zeros(n_volumes)
    for mdl, idx in zip(models, groups):
        idx = np.asarray(idx)
        if mdl is None:
            weights[idx, patch_size // 2, idx] = 1.0
            continue
        w = mdl.weights.reshape(len(idx), patch_size, len(idx))
        weights[np.ix_(idx, np.arange(patch_size), idx)] = w
        intercept[idx] = mdl.intercept
    return LinearModel(weights.reshape(f, n_volumes), intercept, patch_size)
