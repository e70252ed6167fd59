"""Write the NIfTI-Zarr fixture stores of ``tests/test_foreign_stores.py``.

nifti-zarr 1.0.0rc9, the release current on PyPI, needs Python 3.12, and the
test suite runs on 3.11, so the stores it writes are made here once and
committed, beside the NIfTI files they were made from. (nifti-zarr rc8 and
ome-zarr install on 3.11: the test writes their stores itself.)

Run from the repository root with a Python 3.12 environment::

    PYENV_VERSION=3.12.1 python3.12 -m venv /tmp/nz312
    /tmp/nz312/bin/pip install 'nifti-zarr==1.0.0rc9' nibabel
    /tmp/nz312/bin/python tests/data/stores/make_stores.py

It replaces everything it writes in this folder:

* ``source.nii.gz`` (``.bval``, ``.bvec``): 6 x 5 x 4 voxels, 10 volumes,
  int16 with ``scl_slope``/``scl_inter`` and an oblique affine (sform and
  qform both set), little-endian; ``source_be.nii.gz`` holds the same
  values big-endian;
* ``rc9_ome06.nii.zarr``: nifti-zarr's defaults (OME-Zarr 0.6 metadata,
  RFC-5 coordinate systems; one chunk per volume);
* ``rc9_ome05.nii.zarr``: OME-Zarr 0.5 metadata, spatial chunks of 4, so two
  pyramid levels;
* ``rc9_ome06_sharded_be.nii.zarr``: from ``source_be.nii.gz`` (nifti-zarr
  keeps the big-endian bytes), chunks of 2 voxels and one volume in shards
  of 4 voxels and all volumes, its ``compressor='zlib'`` (which nifti-zarr
  writes as zstd).

The values are a fixed function of the voxel and volume (no random
generator), so rerunning the script gives the same data.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import niizarr
import numpy as np

HERE = Path(__file__).resolve().parent
SHAPE = (6, 5, 4, 10)
BVALS = np.array([0, 0, 1000, 1000, 1000, 1000, 2000, 2000, 2000, 2000], float)
AFFINE = np.array([[-1.9, 0.2, 0.0, 10.0],
                   [0.1, 2.0, 0.3, -20.0],
                   [0.0, -0.2, 2.5, 5.0],
                   [0.0, 0.0, 0.0, 1.0]])
SLOPE, INTER = 0.5, 10.0


def raw_values() -> np.ndarray:
    """int16 values shaped like a DWI: a smooth 'anatomy' that each volume
    attenuates by its b-value, plus a fixed pseudo-noise pattern."""
    x, y, z, v = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    anatomy = 800 + 60 * x - 40 * y + 25 * z * z
    attenuation = np.exp(-BVALS[v] / 1000.0 * (0.5 + 0.1 * ((x + 2 * y + 3 * z) % 5)))
    noise = ((x * 7919 + y * 104729 + z * 1299709 + v * 15485863) % 97) - 48
    return np.rint(anatomy * attenuation + noise).astype(np.int16)


def bvecs() -> np.ndarray:
    """Unit directions (3, 10); zero for the b = 0 volumes."""
    angle = np.arange(SHAPE[3]) * 0.7
    vec = np.stack([np.cos(angle), np.sin(angle), np.full(SHAPE[3], 0.5)])
    vec /= np.linalg.norm(vec, axis=0)
    vec[:, BVALS == 0] = 0.0
    return vec


def source_image(endian: str) -> nib.Nifti1Image:
    """The source NIfTI in the given byte order ('<' or '>')."""
    header = nib.Nifti1Header(endianness=endian)
    img = nib.Nifti1Image(raw_values(), AFFINE, header)
    img.header.set_data_dtype(np.dtype(endian + "i2"))
    img.set_sform(AFFINE, code=1)
    img.set_qform(AFFINE, code=1)
    img.header.set_slope_inter(SLOPE, INTER)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_sources() -> None:
    for name, endian in (("source", "<"), ("source_be", ">")):
        nib.save(source_image(endian), str(HERE / f"{name}.nii.gz"))
    np.savetxt(HERE / "source.bval", BVALS[None], fmt="%d")
    np.savetxt(HERE / "source.bvec", bvecs(), fmt="%.6f")


def write_store(name: str, source: str, **options) -> None:
    out = HERE / name
    shutil.rmtree(out, ignore_errors=True)
    with warnings.catch_warnings():
        # writing OME 0.5 is announced as deprecated: it is what we test
        warnings.simplefilter("ignore", FutureWarning)
        niizarr.nii2zarr(nib.load(str(HERE / source)), str(out), **options)


def main() -> None:
    assert niizarr.__version__.startswith("1.0.0rc9"), niizarr.__version__
    write_sources()
    write_store("rc9_ome06.nii.zarr", "source.nii.gz")
    write_store("rc9_ome05.nii.zarr", "source.nii.gz", ome_version="0.5", chunk=4)
    write_store("rc9_ome06_sharded_be.nii.zarr", "source_be.nii.gz", chunk=2, shard=4,
                shard_time=0, compressor="zlib")


if __name__ == "__main__":
    main()
