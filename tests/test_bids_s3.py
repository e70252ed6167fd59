"""A BIDS dataset in a bucket: listed through fsspec, derivatives in the
bucket (inside the dataset's prefix), gradients inherited, reruns skipped."""

import json
from pathlib import Path

import numpy as np

from p2s_dask.fronts.cli import main

from test_bids import (RUNS, _data, _move_gradients, _out_path, _run_path, _stem,  # noqa: F401
                       dataset, expected_tree)



def _upload(fs, root, bucket):
    """The local dataset ``root`` to ``s3://bucket/ds``; returns that URL and
    its derivative's, inside it."""
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/ds/{path.relative_to(root).as_posix()}")
    return f"s3://{bucket}/ds", f"s3://{bucket}/ds/derivatives/p2s"


def _bids(src, out, options, *extra):
    return main(["bids", src, out, "participant", "--quiet", "--storage-options",
                 json.dumps(options), *map(str, extra)])


def _keys(fs, prefix):
    fs.invalidate_cache()
    return {k.removeprefix(f"{prefix}/") for k in fs.find(prefix)}


def _json(fs, key):
    return json.loads(fs.cat_file(key).decode())


def test_a_dataset_in_a_bucket(dataset, tmp_path, moto, capsys, monkeypatch):  # noqa: F811
    fs, options, bucket = moto
    ses_a = ("01", "a", None)
    _move_gradients(dataset, ses_a, ("dwi", "dwi"))  # the dataset's, inherited
    (dataset / "sub-02/dwi/sub-02_dwi_old.nii.gz").write_bytes(b"misnamed")
    src, out = _upload(fs, dataset, bucket)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert _bids(src, out, options) == 0
    captured = capsys.readouterr()
    assert "4 denoised, 0 skipped, 0 failed" in captured.out.splitlines()[-1]
    warned = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warned) == 1 and "sub-02/dwi/sub-02_dwi_old.nii.gz" in warned[0]
    assert list(cwd.iterdir()) == []  # nothing local, no 's3:' folder
    prefix = f"{bucket}/ds/derivatives/p2s"
    assert _keys(fs, prefix) == expected_tree(None)
    # each derivative is the single run of the same file given its table
    single = tmp_path / "single.nii.gz"
    assert main(["denoise", str(_run_path(dataset, *ses_a)), str(single), "--bvals",
                 str(dataset / "dwi.bval"), "--bvecs", str(dataset / "dwi.bvec"),
                 "--quiet"]) == 0
    got = tmp_path / "got.nii.gz"
    fs.get_file(f"{prefix}/{_out_path('', *ses_a).as_posix()}", str(got))
    np.testing.assert_array_equal(_data(single), _data(got))
    # Sources as BIDS URIs of the bucket's dataset, resolved by DatasetLinks
    desc = _json(fs, f"{prefix}/dataset_description.json")
    assert desc["DatasetLinks"] == {"raw": src}
    side = _json(fs, f"{prefix}/{_out_path('', *ses_a, '.json').as_posix()}")
    image = f"sub-01/ses-a/dwi/{_stem(*ses_a)}_dwi.nii.gz"
    assert side["Sources"] == [f"bids:raw:{image}", "bids:raw:dwi.bval", "bids:raw:dwi.bvec"]
    for uri in side["Sources"]:
        assert fs.exists(desc["DatasetLinks"]["raw"] + "/" + uri.split(":", 2)[2])
    # reruns read the bucket's fingerprints: nothing to do
    assert _bids(src, out, options) == 0
    assert "0 denoised, 4 skipped, 0 failed" in capsys.readouterr().out.splitlines()[-1]
    assert _bids(src, out, options, "--participant-label", "02") == 0
    assert "0 denoised, 2 skipped, 0 failed" in capsys.readouterr().out.splitlines()[-1]


def test_bucket_failures_write_nothing(dataset, moto, capsys):  # noqa: F811
    fs, options, bucket = moto
    for run in RUNS:
        _move_gradients(dataset, run, (None, None))
    src, out = _upload(fs, dataset, bucket)
    # no run has gradients: each fails in one line, the bucket gets nothing
    assert _bids(src, out, options) == 2
    lines = capsys.readouterr().out.splitlines()
    assert "0 denoised, 0 skipped, 4 failed" in lines[-1]
    assert sum("no .bval" in line and "--bvals" in line for line in lines) == 4
    assert _keys(fs, f"{bucket}/ds/derivatives") == set()
    # a prefix that is not a dataset: one line
    assert _bids(f"{src}/sub-01", out, options) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2s-dask: error: ") and "no dataset_description.json" in err
    assert "\n" not in err
