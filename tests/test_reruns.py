"""Batch and BIDS reruns decided by fingerprint, never by name; every failure
one line; one run's failure never stops the others."""

import fcntl
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from p2s_dask.fronts.cli import main

from test_bids import _stem, dataset, expected_tree  # noqa: F401  (fixture)
from test_faults import write_dwi


def _bids(src, out, *extra):
    return main(["bids", str(src), str(out), "participant", "--quiet", *map(str, extra)])


def _lines(capsys):
    return capsys.readouterr().out.splitlines()


def _derivative(out, sub="01", ses="a"):
    return Path(out) / f"sub-{sub}/ses-{ses}/dwi/{_stem(sub, ses, None)}_desc-p2s_dwi.nii.gz"


def _source(root, sub="01", ses="a"):
    return Path(root) / f"sub-{sub}/ses-{ses}/dwi/{_stem(sub, ses, None)}_dwi.nii.gz"


def _data(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_changed_input_or_bval_is_redone_the_rest_skipped(dataset, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "d"
    assert _bids(dataset, out) == 0
    capsys.readouterr()
    # a subject's image replaced under the same name
    write_dwi(_source(dataset), seed=99)
    assert _bids(dataset, out) == 0
    lines = _lines(capsys)
    assert "1 denoised, 3 skipped, 0 failed" in lines[-1]
    assert any("redone: the input image changed" in line for line in lines), lines
    single = tmp_path / "single.nii.gz"
    assert main(["denoise", str(_source(dataset)), str(single), "--quiet"]) == 0
    np.testing.assert_array_equal(_data(single), _data(_derivative(out)))
    # another subject's .bval fixed
    bval = Path(str(_source(dataset, ses="b")).replace(".nii.gz", ".bval"))
    values = np.loadtxt(bval)
    values[values == 2000] = 2500
    np.savetxt(bval, values[None], fmt="%g")
    assert _bids(dataset, out) == 0
    lines = _lines(capsys)
    assert "1 denoised, 3 skipped, 0 failed" in lines[-1]
    assert any("redone: the b-values changed" in line for line in lines), lines
    assert (_derivative(out, ses="b").with_name(
        _derivative(out, ses="b").name.replace(".nii.gz", ".bval")).read_text().split()
        == [f"{v:g}" for v in values])


def test_the_same_dataset_by_another_path_is_done(dataset, tmp_path, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "d"
    assert _bids(dataset, out) == 0
    link = tmp_path / "link"
    link.symlink_to(dataset)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for name in (link, Path("bids"), Path("./link/")):
        assert _bids(name, "d") == 0
        assert "0 denoised, 4 skipped, 0 failed" in _lines(capsys)[-1]


def test_a_run_another_process_holds_is_skipped(dataset, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "d"
    held = _derivative(out)
    held.parent.mkdir(parents=True)
    fd = os.open(str(held) + ".p2s-lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert _bids(dataset, out) == 0
    finally:
        os.close(fd)
    lines = _lines(capsys)
    assert "3 denoised, 1 skipped, 0 failed" in lines[-1]
    assert any("skipped" in line and "another p2s-dask run is writing" in line
               for line in lines), lines


def test_one_runs_unexpected_failure_does_not_stop_the_batch(dataset, tmp_path, capsys,  # noqa: F811
                                                              monkeypatch):
    import p2s_dask.fronts.batch as batch
    real = batch.denoise_file

    def flaky(inp, out, **kwargs):
        if "ses-b" in str(inp):
            raise RuntimeError("worker lost")  # not an input error
        return real(inp, out, **kwargs)

    monkeypatch.setattr(batch, "denoise_file", flaky)
    assert _bids(dataset, tmp_path / "d") == 2
    lines = _lines(capsys)
    assert "3 denoised, 0 skipped, 1 failed" in lines[-1]
    assert any("failed" in line and "worker lost" in line for line in lines)
    # the failed run left no folder of its own behind
    assert not (tmp_path / "d/sub-01/ses-b").exists()


def test_output_dir_problems_are_one_line(dataset, tmp_path, capsys):  # noqa: F811
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = {afile: "is a file"}
    for name, content in (("list", "[1, 2]"), ("foreign", '{"Name": "fmriprep"}'),
                          ("broken", "{not json")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "dataset_description.json").write_text(content)
        cases[folder] = "belongs to another dataset"
    cases[dataset] = "belongs to another dataset"  # OUTPUT_DIR = BIDS_DIR
    for out, words in cases.items():
        before = sorted(p for p in Path(out).rglob("*")) if Path(out).is_dir() else None
        assert _bids(dataset, out) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
        if before is not None:
            assert sorted(Path(out).rglob("*")) == before


def test_huge_group_labels_are_one_line(tmp_path, capsys):
    write_dwi(tmp_path / "dwi.nii.gz", shape=(8, 7, 6))
    groups = tmp_path / "g.txt"
    groups.write_text(" ".join(["99999999999999999999999"] * 20))
    assert main(["denoise", str(tmp_path / "dwi.nii.gz"), str(tmp_path / "o.nii.gz"),
                 "--groups", str(groups), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2s-dask: error:") and "\n" not in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_bids_derivatives_go_to_the_bucket(dataset, tmp_path, moto, capsys,  # noqa: F811
                                           monkeypatch):
    fs, options, bucket = moto
    monkeypatch.chdir(tmp_path)
    url = f"s3://{bucket}/ds/derivatives/p2s"
    so = ["--storage-options", json.dumps(options)]
    assert _bids(dataset, url, *so) == 0
    assert "4 denoised" in _lines(capsys)[-1]
    assert not any(p.name.startswith("s3:") for p in tmp_path.iterdir())
    fs.invalidate_cache()
    keys = {k.removeprefix(f"{bucket}/ds/derivatives/p2s/")
            for k in fs.find(f"{bucket}/ds/derivatives/p2s")}
    assert keys == expected_tree(None)
    local = tmp_path / "local"
    assert _bids(dataset, local) == 0
    got = tmp_path / "got.nii.gz"
    fs.get(f"{bucket}/ds/derivatives/p2s/" + str(_derivative("").relative_to("")),
           str(got))
    np.testing.assert_array_equal(_data(got), _data(_derivative(local)))
    capsys.readouterr()
    assert _bids(dataset, url, *so) == 0
    assert "0 denoised, 4 skipped, 0 failed" in _lines(capsys)[-1]


def test_zarr_outputs_are_recognised_as_done(tmp_path, capsys):
    for name, seed in (("a", 1), ("b", 2)):
        write_dwi(tmp_path / f"{name}.nii.gz", shape=(8, 7, 6), seed=seed)
        assert main(["convert", str(tmp_path / f"{name}.nii.gz"),
                     str(tmp_path / f"{name}.zarr"), "--quiet"]) == 0
    argv = ["denoise", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), "--out-dir",
            str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 0
    assert "2 denoised, 0 skipped, 0 failed" in _lines(capsys)[-1]
    assert main(argv) == 0
    assert "0 denoised, 2 skipped, 0 failed" in _lines(capsys)[-1]
    assert main(argv + ["--model", "ridge"]) == 0  # another option: redone
    lines = _lines(capsys)
    assert "2 denoised, 0 skipped, 0 failed" in lines[-1]
    assert any("redone: the options changed" in line for line in lines), lines


def test_sidecar_fields_travel_through_a_store(tmp_path):
    write_dwi(tmp_path / "dwi.nii.gz", shape=(8, 7, 6))
    (tmp_path / "dwi.json").write_text(json.dumps({"EchoTime": 0.089,
                                                   "PhaseEncodingDirection": "j-"}))
    assert main(["convert", str(tmp_path / "dwi.nii.gz"), str(tmp_path / "s.zarr"),
                 "--quiet"]) == 0
    assert main(["convert", str(tmp_path / "s.zarr"), str(tmp_path / "back.nii.gz"),
                 "--quiet"]) == 0
    back = json.loads((tmp_path / "back.json").read_text())
    assert back == {"EchoTime": 0.089, "PhaseEncodingDirection": "j-"}
    assert main(["denoise", str(tmp_path / "s.zarr"), str(tmp_path / "o.nii.gz"),
                 "--quiet"]) == 0
    side = json.loads((tmp_path / "o.json").read_text())
    assert side["EchoTime"] == 0.089 and side["PhaseEncodingDirection"] == "j-"
    assert side["Sources"] == [str(tmp_path / "s.zarr")]
