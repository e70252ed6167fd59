"""Checks of the user's arguments, run before any work starts."""

from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.crossval import DEFAULT_FOLDS, candidate_radii
from ..core.patches import normalize_radius, patch_size
from ..core.solve import MODELS, as_solver, interpolates
from ..errors import InputError
from .estimators import accepted, is_estimator, solver_from_estimator
from .options import is_auto, spell, spell_value


def check_shape(shape) -> None:
    """The data must be 4D: three spatial axes and volumes."""
    if len(shape) != 4:
        raise InputError(
            f"data must be 4D (x, y, z, volumes); got {len(shape)}D with shape "
            f"{tuple(shape)}"
        )
    if min(shape) < 1:
        raise InputError(f"data has an empty axis: shape {tuple(shape)}")


def check_bvals(bvals, n_volumes: int, *, stacklevel: int = 3) -> np.ndarray:
    """bvals must be finite numbers, one per volume.

    Fewer than 10 volumes warns as DIPY does (``UserWarning``, with the words
    "less than 10 3D volumes" that DIPY's tests match); ``stacklevel`` points
    the warning at the user's call.
    """
    arr = np.asarray(bvals, dtype=np.float64).ravel()
    if arr.size != n_volumes:
        raise InputError(
            f"{spell('bvals')} has {arr.size} values but the data has {n_volumes} volumes"
        )
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{spell('bvals')} contains NaN or Inf")
    if np.any(arr < 0):
        first = int(np.flatnonzero(arr < 0)[0])
        raise InputError(f"{spell('bvals')} must be >= 0; value {arr[first]:g} at index {first}")
    if n_volumes < 10:
        warnings.warn(
            f"The input data has less than 10 3D volumes ({n_volumes}): with fewer "
            "than 10, Patch2Self may not denoise well", UserWarning, stacklevel=stacklevel,
        )
    return arr


def check_options(*, patch_radius, model, alpha, version, out_dtype, max_patch_radius=1):
    """Validate the scalar options; return ``(radius, model, out_dtype)``.

    ``model`` comes back as a lower-case name, or as a
    :class:`~p2s_dask.core.solve.Solver` for a scikit-learn estimator. With
    ``patch_radius='auto'`` the radius is ``max_patch_radius``'s: that of
    the statistics, from which every smaller radius is scored (see
    :func:`auto_settings`).
    """
    largest = normalize_radius_or_raise(max_patch_radius, "max_patch_radius")
    radius = largest if is_auto(patch_radius) else normalize_radius_or_raise(patch_radius)
    model = check_model(model)
    if not is_auto(alpha) and (not isinstance(alpha, numbers.Real) or not np.isfinite(alpha)
                               or alpha < 0):
        raise InputError(f"{spell('alpha')} must be a finite number >= 0 or 'auto'; "
                         f"got {alpha!r}")
    if version not in (1, 3):
        raise InputError(f"{spell('version')} must be 1 or 3; got {version!r}")
    _check_auto(patch_radius, model, alpha, version)
    if version == 3 and any(radius):
        raise InputError(
            f"{spell_value('version', 3)} works with {spell_value('patch_radius', 0)} only "
            f"(as in DIPY); use {spell_value('version', 1)} for larger patches"
        )
    return radius, model, check_out_dtype(out_dtype)


def _check_auto(patch_radius, model, alpha, version) -> None:
    """What 'auto' needs, each in one line naming the option: a radius left
    to the data needs version 1 (as any radius above 0) and a model the
    cross-validation scores ('ols' or 'ridge'); a penalty left to it, ridge."""
    if is_auto(alpha) and model != "ridge":
        raise InputError(f"{spell_value('alpha', 'auto')} chooses the penalty of "
                         f"{spell_value('model', 'ridge')} only; got "
                         f"{spell_value('model', getattr(model, 'label', model))}")
    if not is_auto(patch_radius):
        return
    if version != 1:
        raise InputError(f"{spell_value('patch_radius', 'auto')} needs "
                         f"{spell_value('version', 1)}, as any radius above 0 does "
                         f"({spell_value('version', 3)} works with "
                         f"{spell_value('patch_radius', 0)} only, as in DIPY)")
    if model not in ("ols", "ridge"):
        raise InputError(f"{spell_value('patch_radius', 'auto')} scores "
                         f"{spell_value('model', 'ols')} and {spell_value('model', 'ridge')} "
                         f"only; got {spell_value('model', getattr(model, 'label', model))}")


@dataclass(frozen=True)
class AutoSettings:
    """What a run leaves to the data (``patch_radius`` or ``alpha`` 'auto').

    Attributes
    ----------
    radius : tuple of 3 int
        The statistics' radius ``R``, the largest scored.
    radii : tuple of tuples
        The radii scored: ``R`` alone, or every radius up to it
        (:func:`~p2s_dask.core.crossval.candidate_radii`).
    model : {'ols', 'ridge'}
    alpha : float or None
        Ridge's penalty; None: chosen from a grid (``alpha='auto'``).
    radius_auto : bool
        The radius is left to the data (else only the penalty is).
    n_folds : int
        Spatial folds of whole blocks.
    """

    radius: tuple
    radii: tuple
    model: str
    alpha: float | None
    radius_auto: bool = True
    n_folds: int = DEFAULT_FOLDS

    @property
    def penalty_grid(self) -> bool:
        """Whether a grid of ridge penalties is scored (``alpha='auto'``)."""
        return self.model == "ridge" and self.alpha is None

    @property
    def chosen(self) -> str:
        """What is left to the data, in words: 'patch radius', 'alpha' or both."""
        words = ["patch radius"] * self.radius_auto + ["alpha"] * (self.alpha is None)
        return " and ".join(words)


def auto_settings(patch_radius, model, alpha, max_patch_radius=1):
    """The :class:`AutoSettings` of valid options (after
    :func:`check_options`), or None when nothing is left to the data."""
    if not (is_auto(patch_radius) or is_auto(alpha)):
        return None
    model = check_model(model)
    if is_auto(patch_radius):
        radius = normalize_radius_or_raise(max_patch_radius, "max_patch_radius")
        radii = tuple(candidate_radii(radius))
    else:
        radius = normalize_radius_or_raise(patch_radius)
        radii = (radius,)
    return AutoSettings(radius, radii, model, None if is_auto(alpha) else float(alpha),
                        radius_auto=is_auto(patch_radius))


# what the NIfTI and NIfTI-Zarr writers store (io.meta.DwiMeta.for_values:
# NIfTI's integer and real float codes; nibabel has none for float16, and
# longdouble, complex and bool are not voxel values of ours)
STORED_DTYPES = tuple(np.dtype(t) for t in (
    "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float32", "float64"))


def check_out_dtype(out_dtype, *, stored: bool = False):
    """The output dtype, or None for the input's.

    Parameters
    ----------
    out_dtype : dtype-like or None
    stored : bool
        The output is a file: only :data:`STORED_DTYPES`. An array returned
        by the API may be of any integer or real float type (as DIPY's).

    Returns
    -------
    numpy.dtype or None
        In native byte order when ``stored`` (the writers choose the file's).
    """
    if out_dtype is None:
        return None
    try:
        dtype = np.dtype(out_dtype)
    except (TypeError, ValueError):
        raise InputError(f"{spell('out_dtype')} {out_dtype!r} is not a NumPy dtype") from None
    if dtype.kind not in "iuf":
        raise InputError(f"{spell_value('out_dtype', str(dtype))}: the denoised values are "
                         "real numbers; use an integer or float type")
    if not stored:
        return dtype
    dtype = dtype.newbyteorder("=")  # the writers store either byte order
    if dtype not in STORED_DTYPES:
        names = ", ".join(str(t) for t in STORED_DTYPES)
        raise InputError(f"{spell_value('out_dtype', str(dtype))} cannot be written to NIfTI "
                         f"or Zarr; use one of {names}")
    return dtype


def check_data_dtype(dtype) -> None:
    """The data must hold real numbers: integers or floats (not bool, not
    complex), as the file readers require (same message)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "iuf":
        raise InputError(f"data type {dtype} is not supported: use an integer or real "
                         "float type")


def check_model(model):
    """A model name (any case) or a supported scikit-learn estimator."""
    if isinstance(model, str):
        name = model.lower()
        if name not in MODELS:
            # a command line takes names only: estimators are the API's
            names = "'ols', 'ridge' or 'lasso'"
            use = names if spell("model").startswith("-") else accepted()
            raise InputError(f"unknown {spell('model')} {model!r}: use {use}")
        return name
    if is_estimator(model):
        return solver_from_estimator(model)
    raise InputError(f"{spell('model')} must be {accepted()}; got {model!r}")


def check_tmp_dir(tmp_dir, version) -> None:
    """``tmp_dir`` as DIPY checks it (nothing is written there by the API).

    DIPY refuses a ``tmp_dir`` with version 1 and one that does not exist
    with version 3, both with ``ValueError``; so does this (``InputError``).
    """
    if tmp_dir is None:
        return
    if version == 1:
        raise InputError(f"{spell('tmp_dir')} is not supported for Patch2Self version 1 "
                         f"(as in DIPY): leave it None or use {spell_value('version', 3)}")
    if not Path(tmp_dir).exists():
        raise InputError(f"{spell('tmp_dir')}: the temporary directory {str(tmp_dir)!r} "
                         "does not exist")


def check_fit_size(groups, n_fit: int, patch_size: int, model, alpha=1.0, *,
                   stacklevel: int = 3) -> None:
    """Warn when least squares has as many regressors as fitting voxels.

    With ``N`` fitting voxels the centred features span at most ``N - 1``
    dimensions; a volume regressed on ``(m - 1) P >= N - 1`` of them is fitted
    exactly, noise included, so the denoised volume equals the input on the
    fitting voxels. DIPY is silent here; it is worth one warning.
    """
    if not interpolates(model, alpha):
        return
    # centring takes one dimension; without an intercept all N are free
    free = n_fit - 1 if as_solver(model, alpha).fit_intercept else n_fit
    for g in groups:
        regressors = (len(g.indices) - 1) * patch_size
        if g.denoise and free <= regressors:
            warnings.warn(
                f"the {g.name} group is fitted on {n_fit} voxels with {regressors} "
                "regressors per volume: least squares interpolates the noise and the "
                f"denoised {g.name} volumes equal the input on those voxels; fit on "
                f"more voxels, a smaller {spell('patch_radius')} or "
                f"{spell_value('model', 'ridge')}", UserWarning, stacklevel=stacklevel)


def fitting_voxels(mask, shape) -> int:
    """How many voxels the regressions are fitted on: the mask's, or all."""
    if mask is None:
        return int(np.prod(shape[:3]))
    return int(np.count_nonzero(mask))


def check_fit_voxels(groups, mask, shape, radius, model, alpha=1.0, *,
                     stacklevel: int = 3) -> None:
    """:func:`check_fit_size` for a run that knows its mask and radius (the
    file pipeline, once the mask is read): the same warning as the API's."""
    check_fit_size(groups, fitting_voxels(mask, shape), patch_size(radius), model, alpha,
                   stacklevel=stacklevel + 1)


PRECISIONS = ("auto", "float32", "float64")


def check_precision(precision, data_dtype, out_dtype) -> np.dtype:
    """The arithmetic of the prediction passes.

    ``'auto'`` (or None) follows DIPY, which computes in float32 unless the
    data is float64, and is stricter: float64 whenever the data's values or
    the requested output do not fit float32 exactly (float64, 32- and 64-bit
    integers, scaled NIfTI values). The statistics and the fit are float64
    in every case.
    """
    name = "auto" if precision is None else str(np.dtype(precision)) \
        if not isinstance(precision, str) else precision.lower()
    if name not in PRECISIONS:
        raise InputError(f"{spell('precision')} must be one of {', '.join(PRECISIONS)}; "
                         f"got {precision!r}")
    if name != "auto":
        return np.dtype(name)
    exact32 = [np.dtype(t) for t in (np.bool_, np.int8, np.uint8, np.int16, np.uint16,
                                     np.float16, np.float32)]
    wide = [np.dtype(d) for d in (data_dtype, out_dtype) if d is not None]
    if all(d in exact32 for d in wide):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def normalize_radius_or_raise(patch_radius, name="patch_radius"):
    """Three non-negative ints, or one line naming option ``name`` as the
    front spells it."""
    try:
        return normalize_radius(patch_radius)
    except (ValueError, TypeError) as exc:
        raise InputError(str(exc).replace("patch_radius", spell(name))) from None


def describe_nonfinite(count: int, first) -> str:
    """One-line message for NaN/Inf in the data."""
    where = ", ".join(str(int(i)) for i in first)
    return (f"data contains {count} NaN or Inf value(s); the first is at index "
            f"({where}) (x, y, z, volume)")


def check_finite(data: np.ndarray) -> None:
    """Raise if an in-memory array holds NaN or Inf (count and first index)."""
    if not np.issubdtype(data.dtype, np.floating) and not np.issubdtype(
            data.dtype, np.complexfloating):
        return
    # A float64 sum is one fast pass; only a non-finite total needs the count.
    if np.isfinite(np.add.reduce(data, axis=None, dtype=np.float64)):
        return
    bad = ~np.isfinite(data)
    count = int(np.count_nonzero(bad))
    if count:
        first = np.unravel_index(int(np.argmax(bad)), data.shape)
        raise InputError(describe_nonfinite(count, first))
