"""Shared fixtures: a small scaled-int16 DWI with its FSL gradient files."""

import os

import nibabel as nib
import numpy as np
import pytest

# below the least workable budget (64 MiB, p2s_dask.config.budget) a run
# overruns its budget, so users cannot ask for one; the suite's small images
# still need such budgets to take the out-of-core paths of real data
os.environ.setdefault("P2S_DASK_MIN_MEMORY_LIMIT", "1MiB")

SMALL_SHAPE = (24, 22, 10, 20)
SMALL_BVALS = np.array([0, 0, 0] + [1000] * 9 + [2000] * 8, float)


def write_small_dwi(folder, name="dwi.nii.gz"):
    """Write a 24x22x10x20 int16 NIfTI with scl_slope/inter and its .bval/.bvec.

    Parameters
    ----------
    folder : pathlib.Path
    name : str
        ``.nii`` or ``.nii.gz`` file name; the gradient files share its stem.

    Returns
    -------
    pathlib.Path
        The NIfTI's path.
    """
    rng = np.random.default_rng(7)
    shape, bvals = SMALL_SHAPE[:3], SMALL_BVALS
    anat = 900 + 400 * rng.random(shape)
    # b0s bright, each DW volume attenuated by its own factor, Gaussian noise:
    # enough structure for the regressions to be well posed
    signal = anat[..., None] * np.where(bvals > 50, rng.uniform(.3, .7, bvals.size), 1)
    raw = signal + rng.normal(0, 40, shape + (bvals.size,))
    raw = np.clip(np.rint(raw / 3.5), -32768, 32767).astype(np.int16)
    img = nib.Nifti1Image(raw, np.diag([2.0, 2.0, 2.0, 1.0]))
    # a scaled input exercises the float path (values = raw * slope + inter)
    img.header.set_slope_inter(3.5, 2.0)
    path = folder / name
    nib.save(img, str(path))
    stem = str(path).removesuffix(".gz").removesuffix(".nii")
    np.savetxt(stem + ".bval", bvals[None], fmt="%g")
    np.savetxt(stem + ".bvec", np.tile([[1.0], [0.0], [0.0]], (1, bvals.size)), fmt="%g")
    return path


@pytest.fixture(scope="session")
def small_dwi(tmp_path_factory):
    """Path of a small scaled-int16 DWI NIfTI with .bval/.bvec siblings."""
    return write_small_dwi(tmp_path_factory.mktemp("small_dwi"))


@pytest.fixture()
def moto():
    """A moto S3 server on 127.0.0.1 (stopped after the test) and a bucket
    of this test's own (moto keeps its buckets across servers of one
    process): ``(fs, storage_options, bucket)``."""
    import uuid

    import moto.server
    import s3fs

    server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
    fs = s3fs.S3FileSystem(**options)
    bucket = f"p2s-test-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    try:
        yield fs, options, bucket
    finally:
        server.stop()
