"""Per-volume post-processing and the cast to the output dtype."""

from __future__ import annotations

import warnings

import numpy as np


def resolve_postprocess(shift_intensity: bool, clip_negative_vals: bool):
    """Return the effective ``(shift, clip)`` pair, warning on a conflict.

    Both requested: the values are clipped and not shifted (as in DIPY).
    """
    if shift_intensity and clip_negative_vals:
        warnings.warn(
            "shift_intensity and clip_negative_vals are both True: clipping "
            "negative values and not shifting intensities.",
            UserWarning, stacklevel=3,
        )
        return False, True
    return bool(shift_intensity), bool(clip_negative_vals)


def intensity_shift(original_min: np.ndarray, denoised_min: np.ndarray) -> np.ndarray:
    """Per-volume constant that makes each denoised minimum the original one."""
    return np.asarray(original_min, np.float64) - np.asarray(denoised_min, np.float64)


def finalize(values: np.ndarray, shift: np.ndarray | None, clip: bool,
             dtype) -> np.ndarray:
    """Add the per-volume shift, clip negatives and cast to ``dtype``.

    Parameters
    ----------
    values : ndarray (..., n) float
    shift : ndarray (n,) or None
    clip : bool
        Clip at zero.
    dtype : numpy dtype
        Integer types are rounded to nearest and clipped to the type's range
        (never truncated or wrapped).
    """
    values = np.asarray(values, dtype=np.float64)
    if shift is not None:
        values = values + shift
    if clip:
        values = np.maximum(values, 0.0, out=values if shift is not None else None)
    return cast(values, dtype)


def cast(values: np.ndarray, dtype) -> np.ndarray:
    """Cast floats to ``dtype``: rounding and range clipping for integers
    (never truncated or wrapped; see :func:`cast_into`)."""
    dtype = np.dtype(dtype)
    if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
        return values.astype(dtype, copy=False)
    target = np.empty(values.shape, dtype)
    cast_into(np.array(values, dtype=np.result_type(values.dtype, np.float16)), target)
    return target


def cast_into(values: np.ndarray, target: np.ndarray) -> None:
    """Write float ``values`` into ``target`` by :func:`cast`'s rules
    (``values`` may be modified).

    For integers the rounding is done in place and the range clipping
    writes the converted values straight into ``target``: one pass instead
    of a clip and then a (slow, checked) float-to-integer assignment.
    """
    dtype = target.dtype
    if np.issubdtype(dtype, np.integer):
        lo, hi = _int_bounds(values.dtype, dtype)
        np.rint(values, out=values)
        np.clip(values, lo, hi, out=target, casting="unsafe")
    elif dtype == np.bool_:
        np.greater_equal(values, 0.5, out=target)
    else:
        target[...] = values


def _int_bounds(float_dtype, int_dtype):
    """The range of ``int_dtype`` as floats that convert back exactly (the
    top of int32 is not a float32, nor the top of int64 a float64)."""
    info = np.iinfo(int_dtype)
    ftype = np.dtype(float_dtype) if np.issubdtype(float_dtype, np.floating) \
        else np.dtype(np.float64)
    hi = np.asarray(info.max, dtype=ftype)
    if int(hi) > info.max:
        hi = np.nextafter(hi, ftype.type(0))
    return ftype.type(info.min), ftype.type(hi)


def fit_slope(lowest: float, highest: float, dtype) -> float:
    """``scl_slope`` that fits values in ``[lowest, highest]`` into integer
    ``dtype`` (intercept 0, as nibabel writes scaled data where it can).

    One quantum of the output is the slope: values are stored as
    ``rint(value / slope)``. The slope is a float32 (NIfTI-1 headers store
    it so), rounded up so that the largest value still fits.
    """
    info = np.iinfo(dtype)
    top = max(abs(float(highest)), abs(float(lowest)) if info.min < 0 else 0.0)
    if info.min == 0 and float(lowest) < 0:
        # an unsigned type cannot hold negatives with intercept 0; they clip
        top = max(float(highest), 0.0)
    if not top > 0 or not np.isfinite(top):
        return 1.0
    slope = np.float32(top / info.max)
    if float(slope) < top / info.max:
        slope = np.nextafter(slope, np.float32(np.inf))
    return float(slope)


def outside_range(lowest, highest, dtype, scale=1.0) -> bool:
    """Whether values in ``[lowest, highest]`` times ``scale`` round outside
    integer ``dtype`` (then the cast clips some)."""
    info = np.iinfo(dtype)
    lo = np.min(np.asarray(lowest, np.float64)) * scale
    hi = np.max(np.asarray(highest, np.float64)) * scale
    return bool(lo < info.min - 0.5 or hi > info.max + 0.5)
