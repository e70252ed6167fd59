"""Sidecars: a NIfTI output gets .bval/.bvec/.json beside it; convert keeps
the gradients both ways; nothing of the input's is replaced."""

import json

import numpy as np

from p2s_dask.fronts.cli import main

from test_faults import BVALS, write_dwi


def cli(*args):
    return main([str(a) for a in args] + ["--quiet"])


def test_output_sidecars(tmp_path):
    inp = write_dwi(tmp_path / "sub-01_dwi.nii.gz")
    bvecs = np.random.default_rng(0).normal(size=(3, BVALS.size))
    bvecs /= np.linalg.norm(bvecs, axis=0)
    np.savetxt(tmp_path / "sub-01_dwi.bvec", bvecs)
    (tmp_path / "sub-01_dwi.json").write_text(json.dumps(
        {"EchoTime": 0.089, "PhaseEncodingDirection": "j-"}))
    out = tmp_path / "out" / "sub-01_desc-p2s_dwi.nii.gz"
    out.parent.mkdir()
    assert cli("denoise", inp, out, "--patch-radius", "0") == 0
    stem = str(out).removesuffix(".nii.gz")
    np.testing.assert_array_equal(np.loadtxt(stem + ".bval"), BVALS)
    np.testing.assert_allclose(np.loadtxt(stem + ".bvec"), bvecs, atol=1e-7)
    side = json.loads(open(stem + ".json").read())
    assert side["EchoTime"] == 0.089 and side["PhaseEncodingDirection"] == "j-"
    assert side["Sources"] == [str(inp)]
    assert side["P2SDask"]["Options"]["model"] == "ols"
    assert side["P2SDask"]["Options"]["out_dtype"] == "int16"  # scaled int16 in


def test_convert_keeps_gradients_both_ways(tmp_path):
    inp = write_dwi(tmp_path / "dwi.nii.gz")
    store, back = tmp_path / "dwi.zarr", tmp_path / "back" / "dwi.nii"
    back.parent.mkdir()
    assert cli("convert", inp, store) == 0
    assert cli("convert", store, back) == 0
    np.testing.assert_array_equal(np.loadtxt(back.parent / "dwi.bval"), BVALS)
    np.testing.assert_array_equal(np.loadtxt(back.parent / "dwi.bvec"),
                                  np.loadtxt(tmp_path / "dwi.bvec"))
    # a Zarr output of denoise keeps them too
    den = tmp_path / "den.zarr"
    assert cli("denoise", store, den) == 0
    from p2s_dask.io import open_dwi_array
    _, meta = open_dwi_array(str(den))
    np.testing.assert_array_equal(meta.bvals, BVALS)


def test_sidecars_never_replace_the_inputs(tmp_path, capsys):
    inp = write_dwi(tmp_path / "dwi.nii.gz")
    bval = (tmp_path / "dwi.bval").read_bytes()
    # same stem, other extension: OUT's .bval is the input's
    assert cli("denoise", inp, tmp_path / "dwi.nii", "--overwrite") == 2
    assert "dwi.bval" in capsys.readouterr().err
    assert (tmp_path / "dwi.bval").read_bytes() == bval
    # a sidecar of the user's at OUT's stem: only with --overwrite
    out = tmp_path / "o.nii"
    (tmp_path / "o.json").write_text("{}")
    assert cli("denoise", inp, out) == 2
    assert "o.json" in capsys.readouterr().err and not out.exists()
    assert cli("denoise", inp, out, "--overwrite") == 0
    assert "Sources" in json.loads((tmp_path / "o.json").read_text())
