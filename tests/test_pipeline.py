"""The p2s-dask command: same numbers as the API, safety, resume, errors."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from p2s_dask import patch2self
from p2s_dask.fronts.cli import main
from p2s_dask.datasets import example_paths


def write_dwi(path, data, bvals, slope=None, inter=None, dtype=None):
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    if dtype is not None:
        img.set_data_dtype(dtype)
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    nib.save(img, str(path))
    base = str(path).replace(".nii.gz", "").replace(".nii", "")
    np.savetxt(base + ".bval", np.asarray(bvals)[None], fmt="%g")
    np.savetxt(base + ".bvec", np.tile([[1.0], [0.0], [0.0]], (1, len(bvals))), fmt="%g")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(2)
    shape = (24, 22, 10)
    bvals = np.array([0, 0, 0] + [1000] * 9 + [2000] * 8, float)
    anat = 900 + 400 * rng.random(shape)
    raw = anat[..., None] * np.where(bvals > 50, rng.uniform(.3, .7, 20), 1) \
        + rng.normal(0, 40, shape + (20,))
    raw = np.clip(np.rint(raw / 3.5), -32768, 32767).astype(np.int16)
    path = write_dwi(tmp_path_factory.mktemp("ds") / "dwi.nii.gz", raw, bvals,
                     slope=3.5, inter=2.0)
    return path, bvals


def cli(*args):
    return main([str(a) for a in args] + ["--quiet"])


def test_cli_real_data_equals_api(tmp_path):
    paths = example_paths()
    out = tmp_path / "den.nii"
    assert cli("denoise", paths.dwi, out, "--out-dtype", "float64") == 0
    img = nib.load(paths.dwi)
    api = patch2self(img.get_fdata(), np.loadtxt(paths.bval), out_dtype=np.float64)
    got = nib.load(out)
    assert got.get_data_dtype() == np.float64
    ours = np.asanyarray(got.dataobj)
    assert np.abs(ours - api).max() <= 1e-9 * np.abs(api).max()
    np.testing.assert_array_equal(got.affine, img.affine)
    assert not list(tmp_path.glob("*.p2s-work"))  # the work store is gone


@pytest.mark.parametrize("radius", [0, 1])
def test_zarr_paths_equal_api(dataset, tmp_path, radius):
    path, bvals = dataset
    store = tmp_path / "in.zarr"
    assert cli("convert", path, store) == 0
    out = tmp_path / "out.zarr"
    assert cli("denoise", store, out, "--patch-radius", radius, "--ver", 1,
               "--chunks", "7,9,4", "--out-dtype", "float64") == 0
    from p2s_dask.io import open_dwi
    values, meta = open_dwi(out)
    api = patch2self(nib.load(path).get_fdata(), bvals, patch_radius=radius, version=1,
                     out_dtype=np.float64)
    assert np.abs(values.compute() - api).max() <= 1e-9 * np.abs(api).max()
    np.testing.assert_array_equal(meta.bvals, bvals)


@pytest.mark.parametrize("suffix", [".nii.gz", ".zarr"])
def test_scaled_int16_comes_back_as_int16_with_a_slope(dataset, tmp_path, suffix):
    """Scaled int16 input: int16 output with a fitted scl_slope (as nibabel
    writes it), within one quantum of the float result."""
    path, bvals = dataset
    out = tmp_path / f"den{suffix}"
    assert cli("denoise", path, out) == 0
    api = patch2self(nib.load(path).get_fdata(), bvals, out_dtype=np.float64)
    if suffix == ".zarr":
        from p2s_dask.io import open_dwi_array
        raw, meta = open_dwi_array(out)
        raw, slope, inter, dtype = raw[...], meta.slope, meta.inter, meta.raw_dtype
    else:
        img = nib.load(out)
        raw, dtype = np.asanyarray(img.dataobj.get_unscaled()), img.get_data_dtype()
        slope, inter = img.dataobj.slope, img.dataobj.inter
    assert dtype == np.int16 and slope != 1.0 and inter == 0.0
    # the slope uses the type's range: the largest value is near 32767
    assert 30000 < np.abs(raw).max() <= 32767
    values = raw * slope + inter
    assert np.abs(values - api).max() <= 0.5 * slope * (1 + 1e-6)


def test_float_output_on_request(dataset, tmp_path):
    path, bvals = dataset
    out = tmp_path / "den.nii.gz"
    assert cli("denoise", path, out, "--out-dtype", "float32") == 0
    img = nib.load(out)
    assert img.get_data_dtype() == np.float32
    api = patch2self(nib.load(path).get_fdata(), bvals, out_dtype=np.float32)
    np.testing.assert_allclose(np.asanyarray(img.dataobj), api, rtol=1e-5,
                               atol=1e-5 * np.abs(api).max())


def test_clipping_is_counted_and_said(dataset, tmp_path, capsys):
    """--out-dtype int8 of data in the thousands: every value clips, and the
    warning says how many (also when the run resumed part of them)."""
    path, bvals = dataset
    out = tmp_path / "den.nii"
    assert main([str(path), str(out)][:0] + ["denoise", str(path), str(out), "--out-dtype",
                                             "int8", "--quiet"]) == 0
    err = capsys.readouterr().err
    n = int(np.prod(nib.load(path).shape))
    api = patch2self(nib.load(path).get_fdata(), bvals, out_dtype=np.float64)
    expected = int(np.count_nonzero((api < -128.5) | (api > 127.5)))
    assert expected > 0.9 * n
    assert f"{expected} denoised values fell outside the range of int8" in err
    # no warning where nothing clips
    assert cli("denoise", path, tmp_path / "ok.nii", "--out-dtype", "int32") == 0
    assert "outside the range" not in capsys.readouterr().err


def test_refuses_to_overwrite(dataset, tmp_path, capsys):
    path, _ = dataset
    out = tmp_path / "den.nii.gz"
    out.write_bytes(b"precious")
    assert cli("denoise", path, out) == 2
    assert out.read_bytes() == b"precious"
    err = capsys.readouterr().err.strip()
    assert "exists" in err and "--overwrite" in err and "\n" not in err
    assert cli("denoise", path, out, "--overwrite") == 0
    assert nib.load(out).shape == nib.load(path).shape
    # a replaced store (a folder) is replaced whole, and the work store it
    # was moved into for deletion is gone too
    store = tmp_path / "den.zarr"
    assert cli("denoise", path, store) == 0
    (store / "stale").write_bytes(b"x")
    assert cli("denoise", path, store) == 2
    assert cli("denoise", path, store, "--overwrite") == 0
    assert not (store / "stale").exists() and (store / "zarr.json").exists()
    assert not list(tmp_path.glob("*.p2s-work"))


def one_line_error(capsys, *args):
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2s-dask: error:") and "\n" not in err
    return err


def test_clear_errors(dataset, tmp_path, capsys):
    path, bvals = dataset
    assert "not found" in one_line_error(capsys, "denoise", tmp_path / "nope.nii.gz",
                                         tmp_path / "o.nii.gz")
    err = one_line_error(capsys, "denoise", path, tmp_path / "out.tiff")
    assert "extension" in err or "tiff" in err
    bad = tmp_path / "short.bval"
    np.savetxt(bad, bvals[:-2][None], fmt="%g")
    assert "18 values but the data has 20" in one_line_error(
        capsys, "denoise", path, tmp_path / "o.nii.gz", "--bvals", bad)
    badvec = tmp_path / "short.bvec"
    np.savetxt(badvec, np.ones((3, 5)), fmt="%g")
    assert "bvecs" in one_line_error(capsys, "denoise", path, tmp_path / "o.nii.gz",
                                     "--bvecs", badvec)
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(Path(path).read_bytes()[:-5000])
    for ext in (".bval", ".bvec"):
        Path(str(truncated).replace(".nii.gz", ext)).write_bytes(
            Path(str(path).replace(".nii.gz", ext)).read_bytes())
    assert "truncated" in one_line_error(capsys, "denoise", truncated,
                                         tmp_path / "o2.nii.gz")
    assert not (tmp_path / "o2.nii.gz").exists()


def test_interrupted_run_resumes_to_identical_result(dataset, tmp_path):
    path, _ = dataset
    ref = tmp_path / "ref.nii"
    assert cli("denoise", path, ref, "--chunks", "4,4,5") == 0
    out = tmp_path / "out.nii"
    work = Path(str(out) + ".p2s-work")
    cmd = [sys.executable, "-m", "p2s_dask.fronts.cli", "denoise", str(path), str(out),
           "--chunks", "4,4,5", "--quiet"]
    env = dict(os.environ, P2S_DASK_CHUNK_DELAY="0.05")  # slows each output chunk
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = list((work / "done").glob("*")) if (work / "done").exists() else []
        if len(done) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list((work / "done").glob("*")))
    total = 6 * 6 * 2
    assert 3 <= n_done < total, "the kill must land during the prediction"
    assert not out.exists()  # nothing that looks complete
    res = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "output chunks" in res.stdout  # finished chunks were reused
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj),
                                  np.asanyarray(nib.load(ref).dataobj))
    assert not work.exists()


@pytest.mark.parametrize("radius", [0, 1])
def test_plain_nii_read_and_written_in_place(dataset, tmp_path, radius):
    path, bvals = dataset
    img = nib.load(path)
    plain = tmp_path / "dwi.nii"
    nib.save(img, str(plain))  # same scaled int16, uncompressed
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%g")
    out = tmp_path / "den.nii"
    assert cli("denoise", plain, out, "--patch-radius", radius, "--ver", 1,
               "--chunks", "5,22,3", "--out-dtype", "float64") == 0
    assert not list(tmp_path.glob("*.zarr"))
    # nibabel may choose a new scaling when it saves: read back what is on disk
    img = nib.load(plain)
    api = patch2self(img.get_fdata(), bvals, patch_radius=radius, version=1,
                     out_dtype=np.float64)
    got = nib.load(out)
    assert np.abs(np.asanyarray(got.dataobj) - api).max() <= 1e-9 * np.abs(api).max()
    np.testing.assert_array_equal(got.affine, img.affine)
    assert got.header.get_slope_inter() in ((1.0, 0.0), (None, None))


def test_mask_option_equals_api(dataset, tmp_path):
    path, bvals = dataset
    img = nib.load(path)
    mask = np.zeros(img.shape[:3], np.uint8)
    mask[4:20, 3:18, 2:8] = 1
    mask_path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, img.affine), str(mask_path))
    out = tmp_path / "den.nii"
    assert cli("denoise", path, out, "--mask", mask_path, "--out-dtype", "float64") == 0
    api = patch2self(img.get_fdata(), bvals, mask=mask > 0, out_dtype=np.float64)
    unmasked = patch2self(img.get_fdata(), bvals, out_dtype=np.float64)
    got = np.asanyarray(nib.load(out).dataobj)
    assert np.abs(got - api).max() <= 1e-9 * np.abs(api).max()
    assert np.abs(got - unmasked).max() > 1e-3  # the mask changed the fit


@pytest.mark.parametrize("chunks", [None, "24,7,2"])
def test_int16_nii_default_precision_equals_api(dataset, tmp_path, chunks):
    """int16 .nii in, int16 .nii out, all defaults (float32 arithmetic), read
    and written in place: the API's integers up to a rare half-integer tie;
    with --precision float64 exactly the API's."""
    path, bvals = dataset
    raw = np.asanyarray(nib.load(path).dataobj).astype(np.int16)  # unscaled ints
    plain = write_dwi(tmp_path / "dwi.nii", raw, bvals)
    extra = ["--chunks", chunks] if chunks else []
    out32, out64 = tmp_path / "d32.nii", tmp_path / "d64.nii"
    assert cli("denoise", plain, out32, *extra) == 0
    assert cli("denoise", plain, out64, "--precision", "float64", *extra) == 0
    got32 = np.asanyarray(nib.load(out32).dataobj)
    got64 = np.asanyarray(nib.load(out64).dataobj)
    assert got32.dtype == got64.dtype == np.int16
    np.testing.assert_array_equal(got64, patch2self(raw, bvals, precision="float64"))
    api = patch2self(raw, bvals)
    diff = np.abs(got32.astype(int) - api)
    assert diff.max() <= 1 and np.mean(diff > 0) < 1e-3
