"""``patch2self``: a drop-in for ``dipy.denoise.patch2self.patch2self``."""

from __future__ import annotations

import contextlib
import logging
import time

import dask.array as da
import numpy as np

from . import engine, inmemory
from .core.postprocess import resolve_postprocess
from .errors import InputError
from .groups import make_groups
from .threads import single_threaded_blas
from .validate import (check_bvals, check_finite, check_options, check_precision,
                       check_shape)

logger = logging.getLogger("p2s_dask")


def patch2self(data, bvals, *, patch_radius=(0, 0, 0), model="ols", b0_threshold=50,
               out_dtype=None, alpha=1.0, verbose=False, b0_denoising=True,
               clip_negative_vals=False, shift_intensity=True, tmp_dir=None,
               version=3, mask=None, groups=None, chunks=None, precision=None):
    """Patch2Self denoising of a 4D diffusion MRI array, exact and chunked.

    Same arguments and defaults as DIPY 1.12.1's ``patch2self``. Each volume is
    predicted by a linear regression on the patches of the other volumes of
    its group (b0 and diffusion-weighted volumes separately), solved exactly
    from one pass of sufficient statistics.

    Parameters
    ----------
    data : ndarray or dask.array.Array, shape (x, y, z, n)
        The noisy data. NumPy in gives NumPy out; a dask array in gives a lazy
        dask array out (nothing is computed until you compute it).
    bvals : array-like, shape (n,)
    patch_radius : int or sequence of 3 ints, optional
        Patch radius in voxels; voxels beyond the image border count as 0.
    model : {'ols', 'ridge', 'lasso'}, optional
    b0_threshold : float, optional
        Volumes with ``bval <= b0_threshold`` are the b0 group.
    out_dtype : dtype, optional
        Output dtype; default the input's. Integer outputs are rounded and
        clipped to the type's range (DIPY truncates and may wrap).
    alpha : float, optional
        Penalty for 'ridge' (on the centred sum of squares, as scikit-learn's
        ``Ridge``) and 'lasso' (scikit-learn's ``Lasso`` scaling).
    verbose : bool, optional
        Show a progress bar and the time taken.
    b0_denoising : bool, optional
        If False, b0 volumes are passed through unchanged.
    clip_negative_vals : bool, optional
        Clip negative denoised values to 0.
    shift_intensity : bool, optional
        Add to each volume the constant that makes its minimum equal to the
        original volume's minimum. With ``clip_negative_vals`` too, a warning
        is given and only clipping is done (as in DIPY).
    tmp_dir : str, optional
        Accepted for compatibility; nothing is written to disk here.
    version : {1, 3}, optional
        DIPY's version 1 is the exact regression with any patch radius;
        version 3 fits on a random sketch of 30% of the voxels with
        ``patch_radius=0``. Both give the exact solution here: version 3 is
        accepted and solved exactly (it still requires ``patch_radius=0``).
    mask : array-like of bool, shape (x, y, z), optional
        Fit the regressions on these voxels only; all voxels are predicted.
    groups : array-like of int, shape (n,), optional
        Explicit groups (one label per volume; negative labels pass volumes
        through) instead of the b0 / DWI split, e.g. one group per shell or
        batches of a long acquisition.
    chunks : tuple of int, optional
        Spatial chunk shape ``(cx, cy, cz)``; the result does not depend on it.
    precision : {'auto', 'float32', 'float64'}, optional
        Arithmetic of the prediction (the statistics and the fit are always
        float64). 'auto' (default) is float32, as in DIPY, when the data and
        the output both fit float32 exactly (e.g. int16 or float32 data
        written as int16 or float32), else float64. float32 is about twice
        as fast; its results differ from float64 by float32 rounding.

    Returns
    -------
    ndarray or dask.array.Array
        The denoised data, shape of ``data``.
    """
    shape = tuple(data.shape)
    check_shape(shape)
    radius, model, out_dtype = check_options(
        patch_radius=patch_radius, model=model, alpha=alpha, version=version,
        out_dtype=out_dtype)
    bvals = check_bvals(bvals, shape[3])
    group_list = make_groups(bvals, shape[3], b0_threshold=b0_threshold,
                             b0_denoising=b0_denoising, groups=groups)
    shift, clip = resolve_postprocess(shift_intensity, clip_negative_vals)
    if out_dtype is None:
        out_dtype = np.dtype(data.dtype)
    calc_dtype = check_precision(precision, data.dtype, out_dtype)
    if mask is not None:
        if tuple(mask.shape) != shape[:3]:
            raise InputError(
                f"mask has shape {tuple(mask.shape)} but the data's spatial shape "
                f"is {shape[:3]}")
    lazy = isinstance(data, da.Array)
    options = dict(model=model, alpha=alpha, mask=mask, shift_intensity=shift,
                   clip_negative_vals=clip, calc_dtype=calc_dtype)
    if lazy:
        arr = engine.as_chunked(data, chunks, radius)
        return engine.denoise(arr, group_list, radius, out_dtype=out_dtype, **options)

    data = np.asarray(data)
    check_finite(data)
    out = np.empty(shape, dtype=out_dtype)
    start = time.perf_counter()
    # tasks return their values and this process writes them into `out`: a
    # task may run in a worker process, which cannot reach `out`
    with _progress(verbose), single_threaded_blas():
        inmemory.denoise_into(data, out, group_list, radius, chunks=chunks,
                            check_finite=False, **options)
    if verbose:
        elapsed = time.perf_counter() - start
        logger.info("Patch2Self denoised %s in %.2f s", shape, elapsed)
        print(f"p2s_dask: denoised {shape} in {elapsed:.2f} s")
    return out


def _progress(verbose):
    if not verbose:
        return contextlib.nullcontext()
    from dask.diagnostics import ProgressBar
    return ProgressBar()
