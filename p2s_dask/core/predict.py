"""Prediction of one group's denoised volumes on one block."""

from __future__ import annotations

import numpy as np

from .patches import interior_shape, shifted_views, sub_boxes
from .solve import LinearModel


def predict_block(block: np.ndarray, radius, model: LinearModel, out=None,
                  transform=None, max_bytes: int = 4 * 2**20) -> np.ndarray:
    """Denoised volumes on the interior of a block.

    Parameters
    ----------
    block : ndarray, shape (bx + 2 r0, by + 2 r1, bz + 2 r2, m)
        The volumes with a halo of ``radius`` (zeros beyond the image border).
    radius : tuple of int
    model : LinearModel
        Acting on the ``m`` volumes of the block.
    out : ndarray, shape (bx, by, bz, n_out), optional
        Where to write; any dtype (float64 if not given).
    transform : callable, optional
        Applied to each float64 ``(voxels, n_out)`` piece before it is written
        (post-processing, casting, bookkeeping) and returning the values to write.
    max_bytes : int
        The block is walked in sub-boxes of about this many bytes of float64,
        which keeps temporaries in cache and out of fresh memory pages.

    Returns
    -------
    ndarray, shape (bx, by, bz, n_out)
    """
    m = block.shape[-1]
    shape = interior_shape(block.shape, radius)
    n_out = model.n_volumes
    if out is None:
        out = np.empty(shape + (n_out,), dtype=np.float64)
    # Rows of W for patch offset p are {u * P + p}: one (m x n_out) slice per
    # offset, so the prediction is a sum of GEMMs over offsets and the
    # (voxels, m * P) feature matrix is never formed.
    w = model.weights.reshape(m, model.patch_size, n_out)
    w = [np.ascontiguousarray(w[:, p, :]) for p in range(model.patch_size)]
    for box in sub_boxes(shape, max(m, n_out), max_bytes):
        views = shifted_views(block, radius, box)
        nvox = int(np.prod(views[0].shape[:3]))
        acc = np.empty((nvox, n_out))
        tmp = None
        for p, view in enumerate(views):
            x = np.asarray(view, dtype=np.float64).reshape(nvox, m)
            if p == 0:
                np.matmul(x, w[p], out=acc)
            else:
                tmp = np.matmul(x, w[p], out=tmp)
                acc += tmp
        acc += model.intercept
        if transform is not None:
            acc = transform(acc)
        (x0, x1), (y0, y1), (z0, z1) = box
        out[x0:x1, y0:y1, z0:z1] = acc.reshape(x1 - x0, y1 - y0, z1 - z0, n_out)
    return out


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
