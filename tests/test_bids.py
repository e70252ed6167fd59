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
from p2s_dask.planning.paths import QC_FIGURES
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


def expected_tree(out, report=True):
    files = {"dataset_description.json"}
    for sub, ses, run in RUNS:
        folder = "/".join([f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + ["dwi"])
        for ext in (".nii.gz", ".bval", ".bvec", ".json"):
            files.add(f"{folder}/{_stem(sub, ses, run)}_desc-p2s_dwi{ext}")
        if report:  # the QC report, in NiPreps' layout, and the noise map
            stem = _stem(sub, ses, run)
            files |= {f"sub-{sub}.html", f"{folder}/{stem}_desc-p2snoise_dwimap.nii.gz",
                      f"sub-{sub}/figures/{stem}_desc-p2sreport_dwi.html"}
            files |= {f"sub-{sub}/figures/{stem}_desc-p2s{f}_dwi.png" for f in QC_FIGURES}
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
    pages = {"sub-01.html", "sub-02.html"}  # NiPreps' names of the subjects' pages
    for rel in tree(out) - {"dataset_description.json"} - pages:
        name = parse_name(Path(rel).name)
        assert name is not None and name.get("desc").startswith("p2s"), rel
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
    assert {p for p in tree(out) if p.endswith("_dwi.nii.gz")} == {
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


# -- gradients by the inheritance principle, Sources, warnings, failures -----

def _run_path(root, sub, ses, run, ext=".nii.gz"):
    folder = "/".join([f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + ["dwi"])
    return Path(root) / folder / f"{_stem(sub, ses, run)}_dwi{ext}"


def _out_path(out, sub, ses, run, ext=".nii.gz"):
    src = _run_path(out, sub, ses, run, ext)
    return src.with_name(src.name.replace("_dwi", "_desc-p2s_dwi"))


def _move_gradients(dataset, run, stems):
    """Move ``run``'s own .bval/.bvec to ``stems`` (paths inside the dataset,
    without extension; None: delete it); return the b-values it had."""
    values = np.loadtxt(_run_path(dataset, *run, ".bval"))
    for ext, stem in zip((".bval", ".bvec"), stems):
        own = _run_path(dataset, *run, ext)
        if stem is None:
            own.unlink()
        else:
            own.rename(dataset / (stem + ext))
    return values


def _bids_cli(src, out, *extra):
    return main(["bids", str(src), str(out), "participant", "--quiet", *map(str, extra)])


def _resolve(uri, description):
    """The file a BIDS URI names, through the derivative's DatasetLinks."""
    scheme, name, rel = uri.split(":", 2)
    assert scheme == "bids" and not rel.startswith("/")
    link = description["DatasetLinks"][name]
    return Path(link.removeprefix("file://")) / rel


def _data(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def test_gradients_are_inherited_the_nearest_winning(dataset, tmp_path, capsys):
    ses_a, ses_b, run_1 = ("01", "a", None), ("01", "b", None), ("02", None, "1")
    # sub-01/ses-a has none of its own: the dataset's dwi.bval/.bvec apply
    top = _move_gradients(dataset, ses_a, ("dwi", "dwi"))
    # sub-02's runs: an entity-matched .bval and a plain .bvec at the subject
    # level (nearer than the top's), with other b-values
    _move_gradients(dataset, run_1, ("sub-02/sub-02_acq-multiband_dwi", "sub-02/sub-02_dwi"))
    _move_gradients(dataset, ("02", None, "2"), (None, None))
    sub02 = np.where(top == 2000, 2500, top)
    np.savetxt(dataset / "sub-02/sub-02_acq-multiband_dwi.bval", sub02[None], fmt="%g")
    out = tmp_path / "d"
    assert _bids_cli(dataset, out, "--dry-run") == 0
    reads = [line.split() for line in capsys.readouterr().out.splitlines()
             if line.startswith("  --bvals file")]
    assert [str(dataset / "dwi.bval"), f"[{_run_path(dataset, *ses_a)}]"] in \
        [r[2:] for r in reads], reads
    assert _bids_cli(dataset, out) == 0
    assert "4 denoised, 0 skipped, 0 failed" in capsys.readouterr().out
    # each run's output carries the table that applied to it: the nearest
    for run, want in ((ses_a, top), (ses_b, top), (run_1, sub02), (("02", None, "2"), sub02)):
        assert np.loadtxt(_out_path(out, *run, ".bval")).tolist() == want.tolist(), run
    # and is the single run given that table with --bvals
    for run, stem in ((ses_a, dataset / "dwi"),
                      (run_1, dataset / "sub-02/sub-02_acq-multiband_dwi")):
        single = tmp_path / f"single-{run[0]}.nii.gz"
        bvec = dataset / ("dwi.bvec" if run == ses_a else "sub-02/sub-02_dwi.bvec")
        assert main(["denoise", str(_run_path(dataset, *run)), str(single), "--bvals",
                     f"{stem}.bval", "--bvecs", str(bvec), "--quiet"]) == 0
        np.testing.assert_array_equal(_data(single), _data(_out_path(out, *run)))
        # a single run names its input by its path
        assert json.loads(single.with_name(single.name.replace(".nii.gz", ".json"))
                          .read_text())["Sources"] == [str(_run_path(dataset, *run))]
    # Sources: BIDS URIs of the dataset's files, linked to the dataset
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"] == {"raw": dataset.resolve().as_uri()}
    for run, grads in ((ses_a, ["dwi.bval", "dwi.bvec"]),
                       (ses_b, [f"sub-01/ses-b/dwi/{_stem(*ses_b)}_dwi.bval",
                                f"sub-01/ses-b/dwi/{_stem(*ses_b)}_dwi.bvec"]),
                       (run_1, ["sub-02/sub-02_acq-multiband_dwi.bval",
                                "sub-02/sub-02_dwi.bvec"])):
        side = json.loads(_out_path(out, *run, ".json").read_text())
        image = _run_path(dataset, *run).relative_to(dataset).as_posix()
        assert side["Sources"] == [f"bids:raw:{p}" for p in [image] + grads]
        assert all(_resolve(uri, desc).is_file() for uri in side["Sources"])
    # a description of an earlier release (no DatasetLinks) gets them; the
    # runs are done
    del desc["DatasetLinks"]
    (out / "dataset_description.json").write_text(json.dumps(desc))
    assert _bids_cli(dataset, out) == 0
    assert "0 denoised, 4 skipped, 0 failed" in capsys.readouterr().out
    assert "raw" in json.loads((out / "dataset_description.json").read_text())["DatasetLinks"]
    # the same dataset moved: its runs are done, the link follows it (one line)
    moved = dataset.rename(tmp_path / "moved")
    assert _bids_cli(moved, out) == 0
    captured = capsys.readouterr()
    assert "0 denoised, 4 skipped, 0 failed" in captured.out
    assert captured.err.count("\n") == 1 and "now links" in captured.err
    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetLinks"] == {"raw": moved.resolve().as_uri()}


def test_runs_the_dataset_gives_no_gradients(dataset, tmp_path, capsys):
    ses_a = ("01", "a", None)
    values = _move_gradients(dataset, ses_a, (None, None))
    out = tmp_path / "d"
    assert _bids_cli(dataset, out) == 2
    lines = capsys.readouterr().out.splitlines()
    assert "3 denoised, 0 skipped, 1 failed" in lines[-1]
    failed = [line for line in lines if "] failed" in line]
    assert len(failed) == 1 and str(_out_path(out, *ses_a)) in failed[0]
    assert "no .bval" in failed[0] and "inherited" in failed[0] and "--bvals" in failed[0]
    # --bvals/--bvecs fill in for it alone: the runs with their own keep
    # theirs (other b-values here would have redone them)
    other = np.where(values == 2000, 2500, values)
    np.savetxt(tmp_path / "other.bval", other[None], fmt="%g")
    np.savetxt(tmp_path / "other.bvec", np.tile([[0.0], [1.0], [0.0]], (1, other.size)))
    flags = ["--bvals", tmp_path / "other.bval", "--bvecs", tmp_path / "other.bvec"]
    assert _bids_cli(dataset, out, *flags) == 0
    assert "1 denoised, 3 skipped, 0 failed" in capsys.readouterr().out
    assert np.loadtxt(_out_path(out, *ses_a, ".bval")).tolist() == other.tolist()
    # two files that apply at one level: that run fails, naming both
    np.savetxt(dataset / "dwi.bval", values[None], fmt="%g")
    np.savetxt(dataset / "acq-multiband_dwi.bval", values[None], fmt="%g")
    assert _bids_cli(dataset, out, *flags) == 2
    lines = capsys.readouterr().out.splitlines()
    assert "0 denoised, 3 skipped, 1 failed" in lines[-1]
    failed = next(line for line in lines if "] failed" in line)
    assert "acq-multiband_dwi.bval and dwi.bval" in failed and "one level" in failed


def test_misnamed_dwi_images_are_one_warning_each(dataset, capsys, tmp_path):
    misnamed = ["sub-01/ses-a/dwi/sub-01_ses-a_dwi_old.nii.gz", "sub-02/dwi/dwi.nii",
                "sub-02/dwi/sub-01_acq-multiband_dwi.nii.gz",  # another subject's name
                "sub-02/dwi/sub-02_run-1_acq-multiband_dwi.nii.gz"]  # entities out of order
    quiet = ["sub-02/dwi/sub-02_acq-dwi_sbref.nii.gz",  # a BIDS file of another suffix
             "sub-02/dwi/sub-02_dwi_notes.txt"]  # not an image
    for rel in misnamed + quiet:
        (dataset / rel).write_bytes(b"not an image")
    assert _bids_cli(dataset, tmp_path / "d", "--dry-run") == 0
    captured = capsys.readouterr()
    warnings_ = captured.err.splitlines()
    assert len(warnings_) == len(misnamed), warnings_
    for line, rel in zip(warnings_, sorted(misnamed)):
        assert line.startswith("p2s-dask: warning: ") and rel in line and "skipped" in line
    assert sum(line.startswith("run: ") for line in captured.out.splitlines()) == 4


def test_failed_runs_leave_no_folders(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative OUTPUT_DIR, too
    for run in RUNS:
        _move_gradients(dataset, run, (None, None))
    # every run fails before it starts: nothing is written, not even OUTPUT_DIR
    assert _bids_cli(dataset, "d") == 2
    assert "0 denoised, 0 skipped, 4 failed" in capsys.readouterr().out
    assert not (tmp_path / "d").exists()
    # sub-02's runs get their tables back; sub-01/ses-a still fails before
    # its run, sub-01/ses-b during it (a NaN): sub-01 is not left behind
    for run in RUNS[2:]:
        write_dwi(_run_path(dataset, *run), seed=RUNS.index(run))
    write_dwi(_run_path(dataset, "01", "b", None), dtype=np.float32, nan=True)
    assert _bids_cli(dataset, "d") == 2
    lines = capsys.readouterr().out.splitlines()
    assert "2 denoised, 0 skipped, 2 failed" in lines[-1]
    assert any("NaN" in line or "finite" in line for line in lines if "ses-b" in line), lines
    assert sorted(p.relative_to(tmp_path / "d").as_posix()
                  for p in (tmp_path / "d").rglob("*") if p.is_dir()) == [
        "sub-02", "sub-02/dwi", "sub-02/figures"]  # the QC report's figures


def test_a_mask_on_another_grid_is_refused(tmp_path, capsys):
    inp = write_dwi(tmp_path / "dwi.nii.gz", shape=(10, 9, 8))
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = tmp_path / "mask.nii.gz"
    for change, refused in ((("shift", 0.5), True), (("zoom", 2.01), True),
                            (("shift", 2e-4), False)):
        moved = affine.copy()
        if change[0] == "shift":
            moved[0, 3] = change[1]
        else:
            moved[1, 1] = change[1]
        nib.save(nib.Nifti1Image(np.ones((10, 9, 8), np.uint8), moved), str(mask))
        out = tmp_path / f"o-{change[0]}-{change[1]}.nii.gz"
        code = main(["denoise", str(inp), str(out), "--mask", str(mask), "--quiet"])
        err = capsys.readouterr().err.strip()
        if refused:
            assert code == 2 and not out.exists()
            assert err.startswith(f"p2s-dask: error: --mask {mask} is not on the data's grid")
            assert "\n" not in err
        else:
            assert code == 0 and out.exists(), err
