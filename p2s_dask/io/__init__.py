"""Input and output: NIfTI and Zarr DWI datasets, local or on object stores.

This layer moves voxels and headers; it knows nothing about denoising.
"""

from .budget import DEFAULT_MEMORY_LIMIT
from .fsl import fsl_siblings, read_bvals, read_bvecs
from .meta import DwiMeta
from .nifti_zarr import nifti_to_zarr, zarr_to_nifti
from .urls import fs_and_path, kind_of, user_errors
from .zarr_store import (
    create_dwi_store,
    discard,
    is_complete,
    mark_complete,
    open_dwi,
    open_dwi_array,
    store_state,
    verify_all_chunks,
    write_dwi,
    write_region,
)

__all__ = [
    "DEFAULT_MEMORY_LIMIT",
    "DwiMeta",
    "create_dwi_store",
    "discard",
    "fs_and_path",
    "fsl_siblings",
    "is_complete",
    "kind_of",
    "mark_complete",
    "nifti_to_zarr",
    "open_dwi",
    "open_dwi_array",
    "read_bvals",
    "read_bvecs",
    "store_state",
    "verify_all_chunks",
    "user_errors",
    "write_dwi",
    "write_region",
    "zarr_to_nifti",
]
