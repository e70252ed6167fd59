"""Blocks seen as ``(voxels, volumes)`` matrices without copying.

A block is a 4D array ``(bx, by, bz, m)``. Read from a NIfTI file or one of
our NIfTI-Zarr stores it is Fortran-ordered (each volume is one contiguous
plane, as on disk); from other arrays it may be C-ordered (the volumes of a
voxel adjacent). Either
way its ``(voxels, m)`` matrix is a plain reshape, and BLAS takes both
orientations, so the core never pays for a transpose.
"""

from __future__ import annotations

import numpy as np


def voxel_rows(block: np.ndarray):
    """The ``(voxels, m)`` view of a 4D block, and its voxel order.

    The block is C- or Fortran-contiguous, or each of its volumes is one
    Fortran-contiguous run (volumes possibly spaced apart).

    Returns
    -------
    rows : ndarray (voxels, m) or None
        A view (never a copy); None for any other layout.
    order : {'C', 'F'} or None
        Order of the voxels along the rows ('F': x fastest).
    """
    m = block.shape[-1]
    if block.flags.c_contiguous:
        return block.reshape(-1, m), "C"
    columns = volume_columns(block)
    if columns is not None:
        return columns, "F"
    return None, None


def volume_columns(block: np.ndarray):
    """The ``(voxels, m)`` view of a 4D block whose volumes are each one
    Fortran-ordered run (adjacent, or spaced apart: e.g. so that each lines
    up with its place in a file for direct writes); None otherwise."""
    m = block.shape[-1]
    if block.flags.f_contiguous:
        return block.reshape(-1, m, order="F")
    if block.ndim != 4 or m == 0 or not block[..., 0].flags.f_contiguous:
        return None
    n = block[..., 0].size
    if block.strides[3] < n * block.itemsize:
        return None  # overlapping or reversed volumes
    return np.lib.stride_tricks.as_strided(block, (n, m), (block.itemsize, block.strides[3]),
                                           writeable=block.flags.writeable)


def rows_order(block: np.ndarray) -> str:
    """'F' for a volume-major (Fortran) block, else 'C'."""
    return "F" if block.flags.f_contiguous and not block.flags.c_contiguous else "C"


def select_rows(rows: np.ndarray, order: str, keep: np.ndarray) -> np.ndarray:
    """Rows where the 3D boolean ``keep`` is true, keeping ``rows``' layout."""
    flat = np.asarray(keep, bool).reshape(-1, order=order)
    if order == "F":
        # gather along the contiguous voxel axis of each volume
        return rows.T[:, flat].T
    return rows[flat]


def piece_rows(n_cols: int, itemsize: int, max_bytes: int, min_rows: int = 256) -> int:
    """Rows per piece so that a piece holds about ``max_bytes``."""
    return max(min_rows, int(max_bytes // max(1, n_cols * itemsize)))
