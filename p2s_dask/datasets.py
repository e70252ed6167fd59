"""The example data shipped with the package.

``autodmri_sense3_mb3``: a real in-vivo acquisition (Philips, SENSE 3,
multiband 3), 128 x 128 x 18 x 45, int16 on disk with ``scl_slope``; 5 b0 and
10 volumes each at b = 500, 1000, 2000, 3000. MIT licence, Copyright (c) 2019
Samuel St-Jean (see ``data/autodmri_sense3_mb3/LICENSE`` and ``SOURCE.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

EXAMPLE = "autodmri_sense3_mb3"


@dataclass(frozen=True)
class ExamplePaths:
    dwi: Path
    bval: Path
    bvec: Path


def example_paths(name: str = EXAMPLE) -> ExamplePaths:
    """Paths of the bundled NIfTI and its FSL bval/bvec files."""
    root = Path(str(files("p2s_dask") / "data" / name))
    return ExamplePaths(root / "dwi.nii.gz", root / "dwi.bval", root / "dwi.bvec")


def load_example(name: str = EXAMPLE):
    """Load the bundled example.

    Returns
    -------
    data : ndarray (x, y, z, n) float64
        Scaled values (``scl_slope`` applied), as ``nibabel``'s ``get_fdata``.
    bvals : ndarray (n,)
    bvecs : ndarray (n, 3)
    affine : ndarray (4, 4)
    """
    import nibabel as nib

    paths = example_paths(name)
    img = nib.load(paths.dwi)
    bvals = np.loadtxt(paths.bval).ravel()
    bvecs = np.loadtxt(paths.bvec)
    bvecs = bvecs.T if bvecs.shape[0] == 3 else bvecs
    return img.get_fdata(), bvals, bvecs, img.affine
