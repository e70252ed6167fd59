"""A .nii.gz that fits the budget is read into memory and written from memory.

The run then costs the .nii run plus the gunzip and the gzip: no store in the
work store. Its blocks are the .nii run's (volume-major copies), so its
output has the .nii run's bits; a budget too small for it stages the input
and the output through Zarr stores as before, with the same bits again.
"""

from __future__ import annotations

import json
import os

import nibabel as nib
import numpy as np
import pytest

from p2s_dask.fronts.cli import main

BVALS = np.array([0, 0] + [1000] * 10 + [2000] * 10, float)


def write(path, dtype):
    rng = np.random.default_rng(7)
    shape = (30, 26, 12)
    anat = 900 + 400 * rng.random(shape)
    data = anat[..., None] * np.where(BVALS > 50, rng.uniform(.3, .7, BVALS.size), 1) \
        + rng.normal(0, 40, shape + (BVALS.size,))
    img = nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    if dtype == "scaled-int16":
        img = nib.Nifti1Image(np.rint(data / 3.5).astype(np.int16), img.affine)
        img.header.set_slope_inter(3.5, 0.0)
    nib.save(img, str(path))
    stem = str(path).removesuffix(".gz").removesuffix(".nii")
    np.savetxt(stem + ".bval", BVALS[None], fmt="%g")
    return path


def run(inp, out, *args):
    report = f"{out}.report.json"
    assert main(["denoise", str(inp), str(out), "--quiet", "--report-json", report,
                 *map(str, args)]) == 0
    return json.loads(open(report).read())["plan"]


def image(path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj.get_unscaled()), img.header  # the stored numbers


@pytest.mark.parametrize("dtype", ["float32", "scaled-int16"])
@pytest.mark.parametrize("radius", [0, 1])
def test_gz_in_memory_gives_the_bits_of_the_nii_run(tmp_path, dtype, radius):
    nii = write(tmp_path / "a.nii", dtype)
    gz = write(tmp_path / "b.nii.gz", dtype)
    chunks = ("--chunks", "30,26,4", "--patch-radius", radius, "--ver", 1)
    plain = run(nii, tmp_path / "plain.nii", *chunks)
    held = run(gz, tmp_path / "held.nii.gz", *chunks)
    assert (plain["input"], plain["output"]) == ("in-place", "nifti-direct")
    assert (held["input"], held["output"]) == ("memory", "nifti-memory")
    a, ha = image(tmp_path / "plain.nii")
    b, hb = image(tmp_path / "held.nii.gz")
    assert a.dtype == b.dtype and a.dtype == (np.int16 if dtype != "float32" else np.float32)
    np.testing.assert_array_equal(a, b)
    assert ha.get_slope_inter() == hb.get_slope_inter()
    np.testing.assert_array_equal(ha.get_best_affine(), hb.get_best_affine())
    # sidecars beside it, nothing else left behind
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("held")) == [
        "held.bval", "held.json", "held.nii.gz", "held.nii.gz.report.json"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".partial", ".p2s-work"))]


def test_gz_beyond_the_budget_is_staged_with_the_same_bits(tmp_path):
    gz = write(tmp_path / "b.nii.gz", "float32")  # 749 kB of float32 values
    chunks = ("--chunks", "30,26,2")
    held = run(gz, tmp_path / "held.nii.gz", *chunks)
    # half of 1.2 MiB holds neither the input nor the output
    staged = run(gz, tmp_path / "staged.nii.gz", "--memory-limit", "1.2MiB", *chunks)
    assert (staged["input"], staged["output"]) == ("stage", "nifti-via-zarr")
    assert held["input"] == "memory"
    np.testing.assert_array_equal(image(tmp_path / "held.nii.gz")[0],
                                  image(tmp_path / "staged.nii.gz")[0])


def test_truncated_gz_in_memory_is_one_line_and_writes_nothing(tmp_path, capsys):
    gz = write(tmp_path / "b.nii.gz", "float32")
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gz.read_bytes()[:-5000])
    (tmp_path / "cut.bval").write_text((tmp_path / "b.bval").read_text())
    out = tmp_path / "out.nii.gz"
    assert main(["denoise", str(cut), str(out), "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "truncated" in err and "\n" not in err, err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("out")]
