"""FSL gradient tables: ``.bval`` and ``.bvec`` text files, through fsspec."""

from __future__ import annotations

import io
import os

import numpy as np

from ..errors import InputError
from .urls import exists, fs_and_path, strip_suffix, user_errors

__all__ = ["fsl_siblings", "read_bvals", "read_bvecs", "read_text"]

# gradient tables are a few kB; anything much larger is the wrong file
_MAX_TEXT_BYTES = 16 << 20


def read_text(url, storage_options=None) -> str:
    """The contents of a small text file at a local path or fsspec URL.

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional

    Returns
    -------
    str
    """
    fs, path = fs_and_path(url, storage_options)
    with user_errors(url, "reading"):
        with fs.open(path, "rb") as f:
            data = f.read(_MAX_TEXT_BYTES + 1)
    if len(data) > _MAX_TEXT_BYTES:
        raise InputError(f"{os.fspath(url)}: too large for a gradient table")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{os.fspath(url)}: not a text file") from None


def _numbers(url, storage_options) -> np.ndarray:
    text = read_text(url, storage_options)
    rows = [line.replace(",", " ").split() for line in text.splitlines()]
    rows = [r for r in rows if r and not r[0].startswith("#")]
    if not rows:
        raise InputError(f"{os.fspath(url)}: the file is empty")
    if len({len(r) for r in rows}) != 1:
        raise InputError(f"{os.fspath(url)}: rows have different numbers of values")
    try:
        table = np.loadtxt(io.StringIO("\n".join(" ".join(r) for r in rows)),
                           dtype=np.float64, ndmin=2)
    except ValueError:
        raise InputError(f"{os.fspath(url)}: contains something that is not a number") from None
    if not np.all(np.isfinite(table)):
        raise InputError(f"{os.fspath(url)}: contains NaN or Inf")
    return table


def read_bvals(url, storage_options=None) -> np.ndarray:
    """b-values from an FSL ``.bval`` file: one row of n numbers (or one column).

    Parameters
    ----------
    url : str or os.PathLike
    storage_options : dict, optional

    Returns
    -------
    ndarray of float64, shape (n,)
    """
    table = _numbers(url, storage_options)
    if min(table.shape) != 1:
        raise InputError(
            f"{os.fspath(url)}: a bval file must be one row (or one column) of "
            f"numbers; found {table.shape[0]} rows of {table.shape[1]}"
        )
    return table.ravel()


def read_bvecs(url, storage_options=None) -> np.ndarray:
    """Gradient directions from an FSL ``.bvec`` file.

    Parameters
    ----------
    url : str or os.PathLike
        FSL layout is 3 rows of n numbers; n rows of 3 numbers are accepted too
        (and transposed). A 3 x 3 table is read as FSL layout.
    storage_options : dict, optional

    Returns
    -------
    ndarray of float64, shape (3, n)
    """
    table = _numbers(url, storage_options)
    if table.shape[0] == 3:
        return table
    if table.shape[1] == 3:
        return np.ascontiguousarray(table.T)
    raise InputError(
        f"{os.fspath(url)}: a bvec file must be 3 rows of n numbers (or n rows of 3); "
        f"found {table.shape[0]} rows of {table.shape[1]}"
    )


def fsl_siblings(nifti_url, storage_options=None):
    """The ``.bval``/``.bvec`` files next to a NIfTI, where they exist.

    ``dwi.nii.gz`` gives ``dwi.bval`` and ``dwi.bvec``; ``dwi.bvals`` and
    ``dwi.bvecs`` are tried next.

    Parameters
    ----------
    nifti_url : str or os.PathLike
    storage_options : dict, optional

    Returns
    -------
    bval_url, bvec_url : str or None
        None where no such file exists.
    """
    stem = strip_suffix(nifti_url)
    found = []
    for suffixes in ((".bval", ".bvals"), (".bvec", ".bvecs")):
        found.append(next((stem + s for s in suffixes
                           if exists(stem + s, storage_options)), None))
    return tuple(found)
