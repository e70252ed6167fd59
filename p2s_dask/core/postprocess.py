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
    """Cast floats to ``dtype``: rounding and range clipping for integers."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.rint(values), info.min, info.max)
    elif dtype == np.bool_:
        values = values >= 0.5
    return values.astype(dtype, copy=False)
