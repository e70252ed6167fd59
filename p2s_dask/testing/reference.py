"""The exactness reference for ``p2s_dask.patch2self``: Patch2Self done plainly.

:func:`reference_patch2self` computes what DIPY's main branch computes with
``version=1``, without any of the tricks that make p2s_dask fast: the patch
features come from DIPY 1.12.1's own ``_extract_3d_patches`` on the
zero-padded group data, and every volume gets its own scikit-learn
regression on the features of the other volumes of its group, fitted and
predicted in float64.

Two deliberate differences from the released DIPY 1.12.1:

* predictions use the *uncentred* features. DIPY 1.12.1 passes
  ``copy_X=False`` to scikit-learn, which centres the feature matrix in
  place during ``fit``, so its ``predict`` runs on centred features and each
  volume comes out off by a constant;
* ``shift_intensity`` adds, per volume, ``min(original) - min(denoised)``;
  DIPY 1.12.1 adds ``min(denoised) - min(denoised)``, i.e. nothing.

This is slow and memory hungry (the full feature matrix of a group is held
in memory), so keep it to small arrays. It needs DIPY and scikit-learn,
imported only when called.
"""

from __future__ import annotations

import numpy as np

__all__ = ["reference_patch2self"]

# The regularisation DIPY uses for 'ols' (a Ridge with a negligible penalty,
# which keeps the solve defined when features are collinear).
OLS_ALPHA = 1e-10
# Lasso is iterative: run it far beyond DIPY's max_iter=50 so the reference is
# the converged optimum rather than an arbitrary early stop.
LASSO_MAX_ITER = 100_000
LASSO_TOL = 1e-10


def _imports():
    try:
        from dipy.denoise.patch2self import _extract_3d_patches
        from sklearn.linear_model import Lasso, Ridge
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "p2s_dask.testing.reference needs DIPY and scikit-learn (test "
            "dependencies of p2s_dask): `pip install dipy scikit-learn`.") from exc
    return _extract_3d_patches, Ridge, Lasso


def _radius3(patch_radius):
    r = np.asarray(patch_radius, dtype=int).ravel()
    if r.size == 1:
        r = np.repeat(r, 3)
    if r.size != 3 or (r < 0).any():
        raise ValueError(f"patch_radius must be one or three non-negative ints, "
                         f"got {patch_radius!r}")
    return tuple(int(v) for v in r)


def _estimator(model, alpha, Ridge, Lasso):
    name = str(model).lower()
    if name == "ols":
        return Ridge(alpha=OLS_ALPHA, copy_X=True)
    if name == "ridge":
        return Ridge(alpha=alpha, copy_X=True)
    if name == "lasso":
        return Lasso(alpha=alpha, max_iter=LASSO_MAX_ITER, tol=LASSO_TOL, copy_X=True)
    raise ValueError(f"model must be 'ols', 'ridge' or 'lasso', got {model!r}")


def _denoise_group(group, radius, model, alpha, fit_rows, extract, Ridge, Lasso):
    """Leave-one-volume-out regressions within one group; float64 out."""
    nx, ny, nz, nv = group.shape
    pad = [(r, r) for r in radius] + [(0, 0)]
    # Voxels beyond the border count as zero, exactly as DIPY pads.
    feats = extract(np.pad(group, pad, mode="constant"), radius)  # (nv, P, nvox)
    npatch = feats.shape[1]
    centre = npatch // 2
    out = np.empty(group.shape, dtype=np.float64)
    for v in range(nv):
        # DIPY's layout: the other volumes' patch features stacked volume by
        # volume form the regressors; the target is v's own centre voxel.
        others = np.delete(feats, v, axis=0).reshape((nv - 1) * npatch, -1).T
        target = feats[v, centre]
        est = _estimator(model, alpha, Ridge, Lasso)
        if fit_rows is None:
            est.fit(others, target)
        else:
            est.fit(others[fit_rows], target[fit_rows])
        out[..., v] = est.predict(others).reshape(nx, ny, nz)
    return out


def reference_patch2self(data, bvals, *, patch_radius=0, model="ols", alpha=1.0,
                         b0_threshold=50, b0_denoising=True, shift_intensity=True,
                         clip_negative_vals=False, mask=None):
    """Patch2Self (version 1) as DIPY's main branch computes it, in float64.

    Parameters
    ----------
    data : array-like, shape (x, y, z, n)
        Noisy data; converted to float64.
    bvals : array-like, shape (n,)
    patch_radius : int or sequence of 3 int, optional
    model : {'ols', 'ridge', 'lasso'}, optional
        'ols' is a Ridge with ``alpha=1e-10`` (as in DIPY); 'ridge' a Ridge
        with ``alpha``; 'lasso' a scikit-learn Lasso with ``alpha`` run to
        convergence (``max_iter=100000``, ``tol=1e-10``).
    alpha : float, optional
        Penalty for 'ridge' and 'lasso', in scikit-learn's scaling.
    b0_threshold : float, optional
        Volumes with ``bval <= b0_threshold`` form the b0 group, the others
        the DWI group.
    b0_denoising : bool, optional
        If False the b0 volumes are passed through unchanged. A group of a
        single volume is always passed through.
    shift_intensity : bool, optional
        Add per volume ``min(original) - min(denoised)`` (over the whole
        volume).
    clip_negative_vals : bool, optional
        Clip at 0. If ``shift_intensity`` is True too, only clipping is done.
    mask : array-like of bool, shape (x, y, z), optional
        Fit the regressions on these voxels only; all voxels are predicted.

    Returns
    -------
    ndarray, float64, shape of ``data``
        Never cast to the input's dtype, so comparisons see the exact values.
    """
    extract, Ridge, Lasso = _imports()
    data = np.asarray(data, dtype=np.float64)
    if data.ndim != 4:
        raise ValueError(f"data must be 4D, got shape {data.shape}")
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    if bvals.shape != (data.shape[3],):
        raise ValueError(f"{bvals.size} bvals for {data.shape[3]} volumes")
    radius = _radius3(patch_radius)
    fit_rows = None
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != data.shape[:3]:
            raise ValueError(f"mask shape {mask.shape} != {data.shape[:3]}")
        # C order, the same voxel order as _extract_3d_patches' output
        fit_rows = mask.ravel()

    out = data.copy()   # pass-through volumes keep their input values
    is_b0 = bvals <= b0_threshold
    for idx, denoise in ((np.flatnonzero(is_b0), bool(b0_denoising)),
                         (np.flatnonzero(~is_b0), True)):
        if not denoise or len(idx) < 2:
            continue
        out[..., idx] = _denoise_group(data[..., idx], radius, model, alpha,
                                       fit_rows, extract, Ridge, Lasso)

    if clip_negative_vals:
        np.maximum(out, 0.0, out=out)
    elif shift_intensity:
        n = data.shape[3]
        orig_min = data.reshape(-1, n).min(axis=0)
        den_min = out.reshape(-1, n).min(axis=0)
        out += orig_min - den_min
    return out
