"""The BIDS App: a small dataset made here, its derivative tree, reruns."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from p2s_dask.fronts.bids import ENTITIES, parse_name
from p2s_dask.fronts.cli import main

from test_faults import write_dwi

RUNS = [  # (subject, session, run) of each DWI file
    ("01", "a", None), ("01", "b", None), ("02", None, "1"), ("02", None, "2")]


def _stem(sub, ses, run):
    parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + ["acq-multiband"] \
        + ([f"run-{run}"] if run else [])
    return "_".join(parts)


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "test", "BIDSVersion": "1.9.0"}))
    for i, (sub, ses, run) in enumerate(RUNS):
        folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses else "") / "dwi"
        folder.mkdir(parents=True, exist_ok=True)
        path = write_dwi(folder / f"{_stem(sub, ses, run)}_dwi.nii.gz", seed=i)
        (folder / f"{_stem(sub, ses, run)}_dwi.json").write_text(json.dumps(
            {"EchoTime": 0.08 + i / 1000, "RepetitionTime": 3.2}))
        assert path.exists()
        # an anatomical file and a stray non-BIDS file are not DWI runs
        (folder.parent / "anat").mkdir(exist_ok=True)
    (root / "sub-01" / "README.txt").write_text("not data")
    return root


def expected_tree(out):
    files = {"dataset_description.json"}
    for sub, ses, run in RUNS:
        folder = "/".join([f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + ["dwi"])
        for ext in (".nii.gz", ".bval", ".bvec", ".json"):
            files.add(f"{folder}/{_stem(sub, ses, run)}_desc-p2s_dwi{ext}")
    return files


def tree(out):
    return {p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file()}


def test_bids_app_writes_the_derivative_tree(dataset, tmp_path, capsys):
    out = tmp_path / "derivatives" / "p2s"
    assert main(["bids", str(dataset), str(out), "participant", "--quiet"]) == 0
    assert tree(out) == expected_tree(out)
    lines = capsys.readouterr().out.splitlines()
    assert sum("denoised" in line and line.startswith("p2s-dask: [") for line in lines) == 4
    assert "4 denoised, 0 skipped, 0 failed" in lines[-1]
    # the names follow the BIDS rules: known entities, specification order
    for rel in tree(out) - {"dataset_description.json"}:
        name = parse_name(Path(rel).name)
        assert name is not None and name.get("desc") == "p2s", rel
        keys = [k for k, _ in name.entities]
        assert keys == sorted(keys, key=ENTITIES.index)
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["BIDSVersion"]
    assert desc["GeneratedBy"][0]["Name"] == "p2s-dask"
    side = json.loads((out / "sub-02/dwi/sub-02_acq-multiband_run-2_desc-p2s_dwi.json")
                      .read_text())
    assert side["EchoTime"] == 0.083 and side["Sources"][0].endswith(
        "sub-02_acq-multiband_run-2_dwi.nii.gz")
    # each derivative is the single run's output
    single = tmp_path / "single.nii.gz"
    src = dataset / "sub-01/ses-b/dwi/sub-01_ses-b_acq-multiband_dwi.nii.gz"
    assert main(["denoise", str(src), str(single), "--quiet"]) == 0
    np.testing.assert_array_equal(
        np.asanyarray(nib.load(str(single)).dataobj),
        np.asanyarray(nib.load(str(out / "sub-01/ses-b/dwi/"
                                   "sub-01_ses-b_acq-multiband_desc-p2s_dwi.nii.gz")).dataobj))
    # a rerun does nothing
    before = {p: (out / p).stat().st_mtime_ns for p in tree(out)}
    assert main(["bids", str(dataset), str(out), "participant", "--quiet"]) == 0
    assert "0 denoised, 4 skipped, 0 failed" in capsys.readouterr().out
    assert {p: (out / p).stat().st_mtime_ns for p in tree(out)} == before


def test_participant_and_session_labels(dataset, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["bids", str(dataset), str(out), "participant", "--participant-label",
                 "01", "--session-label", "b", "--quiet"]) == 0
    assert {p for p in tree(out) if p.endswith(".nii.gz")} == {
        "sub-01/ses-b/dwi/sub-01_ses-b_acq-multiband_desc-p2s_dwi.nii.gz"}
    capsys.readouterr()
    assert main(["bids", str(dataset), str(out), "participant", "--participant_label",
                 "sub-07", "--quiet"]) == 2
    assert "07" in capsys.readouterr().err


def test_killed_bids_run_resumes(dataset, tmp_path):
    out = tmp_path / "d"
    cmd = [sys.executable, "-m", "p2s_dask.fronts.cli", "bids", str(dataset), str(out),
           "participant", "--quiet"]
    env = dict(os.environ, P2S_DASK_PAUSE_BEFORE="predict")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    # the second run pauses: the first is complete by then
    second = out / "sub-01/ses-b/dwi/sub-01_ses-b_acq-multiband_desc-p2s_dwi.nii.gz"
    work = Path(str(second) + ".p2s-work")
    first_work = Path(str(second).replace("ses-b", "ses-a") + ".p2s-work")
    import time
    deadline = time.time() + 120
    while not (first_work / "paused-predict").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run(cmd[:-1] + ["--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "4 denoised" in res.stdout
    assert tree(out) == expected_tree(out)
    assert not work.exists()


def test_denoise_many_inputs_with_out_dir(dataset, tmp_path, capsys):
    out = tmp_path / "many"
    pattern = str(dataset / "sub-02" / "dwi" / "*_dwi.nii.gz")
    assert main(["denoise", pattern, "--out-dir", str(out), "--quiet"]) == 0
    assert {p.name for p in out.glob("*.nii.gz")} == {
        "sub-02_acq-multiband_run-1_dwi.nii.gz", "sub-02_acq-multiband_run-2_dwi.nii.gz"}
    assert "2 denoised" in capsys.readouterr().out
