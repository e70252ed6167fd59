"""``patch2self``: a drop-in for ``dipy.denoise.patch2self.patch2self``."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings

import dask.array as da
import numpy as np

from .graph import engine
from .run import inmemory
from .core.patches import patch_size
from .errors import InputError
from .fronts.logs import attached
from .config.groups import make_groups
from .config.options import is_auto
from .config.validate import (auto_settings, check_bvals, check_data_dtype, check_finite,
                              check_fit_size, check_options, check_precision, check_shape,
                              check_tmp_dir)

logger = logging.getLogger("p2s_dask")

# DIPY 1.12.1's keyword-only options, in its order: its decorator
# (``warning_for_keywords``) still takes them positionally after data and
# bvals, with a UserWarning; so does this.
DIPY_POSITIONAL = ("patch_radius", "model", "b0_threshold", "out_dtype", "alpha",
                   "verbose", "b0_denoising", "clip_negative_vals", "shift_intensity",
                   "tmp_dir", "version")
# a warning raised in a helper of _denoise names the user's line: helper,
# _denoise, patch2self, the positional wrapper, the user
_USER_FRAME = 5


def _dipy_positional(func):
    """Accept DIPY's options positionally, warning as DIPY does.

    The warning is a ``UserWarning`` that starts like DIPY's ("Pass
    ['patch_radius'] as keyword args."), so a filter or ``pytest.warns``
    written for DIPY matches it. Unlike DIPY, more positional arguments than
    DIPY has options, or an option given both ways, raise ``TypeError``
    (DIPY drops the extra ones, and lets the positional value win).
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        extra = args[2:]
        if not extra:
            return func(*args, **kwargs)
        if len(extra) > len(DIPY_POSITIONAL):
            raise TypeError(f"patch2self() takes at most {2 + len(DIPY_POSITIONAL)} "
                            f"positional arguments; got {len(args)}")
        names = list(DIPY_POSITIONAL[:len(extra)])
        twice = [n for n in names if n in kwargs]
        if twice:
            raise TypeError(f"patch2self() got multiple values for argument {twice[0]!r}")
        warnings.warn(f"Pass {names} as keyword args. Passing DIPY's options "
                      "positionally is deprecated there and will be an error from DIPY "
                      "2.0.0.", UserWarning, stacklevel=2)
        return func(*args[:2], **dict(zip(names, extra)), **kwargs)
    return wrapper


@_dipy_positional
def patch2self(data, bvals, *, patch_radius=(0, 0, 0), model="ols", b0_threshold=50,
               out_dtype=None, alpha=1.0, verbose=False, b0_denoising=True,
               clip_negative_vals=False, shift_intensity=True, tmp_dir=None,
               version=3, gram=True, mask=None, groups=None, chunks=None,
               precision=None, max_patch_radius=1):
    """Patch2Self denoising of a 4D diffusion MRI array, exact and chunked.

    Same arguments and defaults as DIPY's ``patch2self``. Each volume is
    predicted by a linear regression on the patches of the other volumes of
    its group (b0 and diffusion-weighted volumes separately), solved exactly
    from one pass of sufficient statistics.

    Parameters
    ----------
    data : ndarray or dask.array.Array, shape (x, y, z, n)
        The noisy data. NumPy in gives NumPy out; a dask array in gives a lazy
        dask array out (nothing is computed until you compute it).
    bvals : array-like, shape (n,)
    patch_radius : int, sequence of 3 ints or 'auto', optional
        Patch radius in voxels; voxels beyond the image border count as 0.
        'auto' (with ``version=1``) lets the data choose, from 0 up to
        ``max_patch_radius``, by exact 5-fold cross-validation over whole
        z-slabs of blocks from one pass of statistics at the largest radius
        (logged with ``verbose=True``; see the README's "Choosing the radius
        and the penalty"). Needs a NumPy ``data`` and model 'ols' or 'ridge'.
    model : {'ols', 'ridge', 'lasso'} or scikit-learn estimator, optional
        A name, or a scikit-learn ``LinearRegression``, ``Ridge``, ``Lasso``
        or ``ElasticNet``, fitted with its own parameters (``alpha``,
        ``fit_intercept``; ``max_iter`` and ``tol`` of the coordinate
        descent). 'lasso' is the converged lasso; DIPY stops its lasso after
        50 iterations, which ``model=Lasso(alpha=alpha, max_iter=50)``
        reproduces.
    b0_threshold : float, optional
        Volumes with ``bval <= b0_threshold`` are the b0 group.
    out_dtype : dtype, optional
        Output dtype; default the input's. Integer outputs are rounded and
        clipped to the type's range (DIPY truncates and may wrap).
    alpha : float or 'auto', optional
        Penalty of a named 'ridge' (on the centred sum of squares, as
        scikit-learn's ``Ridge``) and 'lasso' (scikit-learn's ``Lasso``
        scaling); an estimator's own ``alpha`` is used instead. 'auto' (model
        'ridge' only) chooses it by cross-validation, as ``patch_radius``,
        from a grid relative to the data's variance
        (:func:`~p2s_dask.core.crossval.penalty_grid`); one alpha for all
        groups.
    verbose : bool, optional
        Log the progress and the time taken (logger ``p2s_dask``, INFO) for
        this call; nothing is printed.
    b0_denoising : bool, optional
        If False, b0 volumes are passed through unchanged.
    clip_negative_vals : bool, optional
        Clip negative denoised values to 0.
    shift_intensity : bool, optional
        Add to each volume the constant that makes its minimum equal to the
        original volume's minimum. With ``clip_negative_vals`` too, a warning
        is given and only clipping is done (as in DIPY).
    tmp_dir : str, optional
        Checked as DIPY checks it (refused with version 1, must exist with
        version 3); nothing is written to disk here.
    version : {1, 3}, optional
        DIPY's version 1 is the exact regression with any patch radius;
        version 3 fits on a random sketch of 30% of the voxels with
        ``patch_radius=0``. Both give the exact solution here: version 3 is
        accepted and solved exactly (it still requires ``patch_radius=0``).
    gram : bool, optional
        DIPY's choice between a shared Gram matrix and per-volume fits;
        accepted for compatibility, the result does not depend on it.
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
    max_patch_radius : int or sequence of 3 ints, optional
        The largest radius ``patch_radius='auto'`` scores (default 1).

    Returns
    -------
    ndarray or dask.array.Array
        The denoised data, shape of ``data``.
    """
    with _verbose_log(verbose):
        return _denoise(
            data, bvals, patch_radius=patch_radius, model=model,
            b0_threshold=b0_threshold, out_dtype=out_dtype, alpha=alpha,
            b0_denoising=b0_denoising, clip_negative_vals=clip_negative_vals,
            shift_intensity=shift_intensity, tmp_dir=tmp_dir, version=version,
            mask=mask, groups=groups, chunks=chunks, precision=precision,
            max_patch_radius=max_patch_radius)


def _denoise(data, bvals, *, patch_radius, model, b0_threshold, out_dtype, alpha,
             b0_denoising, clip_negative_vals, shift_intensity, tmp_dir, version,
             mask, groups, chunks, precision, max_patch_radius):
    """Validate (one line per problem, before any work), then run."""
    shape = tuple(data.shape)
    check_shape(shape)
    check_data_dtype(data.dtype)
    radius, model, out_dtype = check_options(
        patch_radius=patch_radius, model=model, alpha=alpha, version=version,
        out_dtype=out_dtype, max_patch_radius=max_patch_radius)
    auto = auto_settings(patch_radius, model, alpha, max_patch_radius)
    if auto is not None and isinstance(data, da.Array):
        raise InputError(f"{auto.chosen} 'auto' needs NumPy data: the choice needs the "
                         "statistics, which a dask array's lazy result would defer; "
                         "compute it first, or use the command line")
    check_tmp_dir(tmp_dir, version)
    bvals = check_bvals(bvals, shape[3], stacklevel=_USER_FRAME)
    group_list = make_groups(bvals, shape[3], b0_threshold=b0_threshold,
                             b0_denoising=b0_denoising, groups=groups)
    shift, clip = _postprocess(shift_intensity, clip_negative_vals)
    out_dtype = np.dtype(data.dtype) if out_dtype is None else out_dtype
    calc_dtype = check_precision(precision, data.dtype, out_dtype)
    n_fit = _fitting_voxels(mask, shape)
    # 'auto': what the smallest candidate risks (the choice avoids the rest)
    check_fit_size(group_list, n_fit, patch_size(radius if auto is None else auto.radii[0]),
                   model, 1.0 if is_auto(alpha) else alpha, stacklevel=_USER_FRAME)
    spec = engine.DenoiseSpec(group_list, radius, model=model, alpha=alpha, mask=mask,
                              shift_intensity=shift, clip_negative_vals=clip,
                              calc_dtype=calc_dtype, auto=auto)
    _log_plan(shape, group_list, radius, model, n_fit)
    if isinstance(data, da.Array):
        arr = engine.as_chunked(data, chunks, radius)
        return engine.denoise(arr, spec, out_dtype=out_dtype)
    data = np.asarray(data)
    check_finite(data)
    out = np.empty(shape, dtype=out_dtype)
    start = time.perf_counter()
    # tasks return their values and this process writes them into `out`: a
    # task may run in a worker process, which cannot reach `out`
    inmemory.denoise_into(data, out, spec, chunks=chunks, check_finite=False)
    logger.info("Patch2Self denoised %s in %.2f s", shape, time.perf_counter() - start)
    return out


def _postprocess(shift_intensity, clip_negative_vals):
    """``(shift, clip)``: both asked for warns as DIPY does and only clips.

    The message starts like DIPY's, so the filter in DIPY's own tests
    ("Both `clip_negative_vals` and `shift_intensity` .*") applies to it.
    """
    if shift_intensity and clip_negative_vals:
        warnings.warn("Both `clip_negative_vals` and `shift_intensity` are True: "
                      "clipping negative values and not shifting intensities",
                      UserWarning, stacklevel=_USER_FRAME)
        return False, True
    return bool(shift_intensity), bool(clip_negative_vals)


def _fitting_voxels(mask, shape) -> int:
    """How many voxels the regressions are fitted on."""
    if mask is None:
        return int(np.prod(shape[:3]))
    if tuple(np.shape(mask)) != shape[:3]:
        raise InputError(f"mask has shape {tuple(np.shape(mask))} but the data's "
                         f"spatial shape is {shape[:3]}")
    return int(np.count_nonzero(np.asarray(mask)))


def _log_plan(shape, group_list, radius, model, n_fit) -> None:
    """What is about to be done, one line per group (INFO)."""
    p = patch_size(radius)
    for g in group_list:
        if g.denoise:
            logger.info("Patch2Self: %s group, %d volumes of %s, %d regressors each, "
                        "model %s, fitted on %d voxels", g.name, len(g.indices),
                        shape[:3], (len(g.indices) - 1) * p,
                        getattr(model, "label", model), n_fit)


@contextlib.contextmanager
def _verbose_log(verbose):
    """``verbose=True`` shows this call's INFO records of the ``p2s_dask`` log.

    DIPY logs its progress when verbose; so does this, through ``logging``
    only. An application's own configuration is left alone: the level is
    lowered to INFO only where none was set, and a stderr handler is added
    only where no handler would receive the records.
    """
    if not verbose:
        yield
        return
    # INFO only where no level was set; a handler only where none would
    # receive the records
    level = logging.INFO if logger.level == logging.NOTSET \
        and logger.getEffectiveLevel() > logging.INFO else None
    handler = None
    if not logger.hasHandlers():
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    with attached(handler, level):
        yield
