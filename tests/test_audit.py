"""Every path a run writes, renames or removes is in the manifest it checked.

Each run goes in a process of its own under a Python audit hook
(tests/audit_run.py): ``open`` for writing, ``os.rename``/``replace``,
``os.remove``, ``os.rmdir``, ``os.mkdir``, ``shutil.rmtree`` ... are recorded
as they happen, and so is each manifest the run handed to the checker. The
test then asserts, with its own statement of what a target covers, that
every recorded path is a planned target, lies inside one (a store, a folder,
the work store, --tmp-dir) or is one of its partial names.
"""

import json
import os
import posixpath
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_bids import dataset  # noqa: F401  (fixture)
from test_faults import write_dwi

HERE = Path(__file__).parent
ASIDE = (".partial", ".replaced")


def audited(events, *argv, env=None, wait=True):
    cmd = [sys.executable, "-B", str(HERE / "audit_run.py"), str(events),
           *map(str, argv), "--quiet"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, **(env or {})), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if wait:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return proc


def _records(events):
    lines = [json.loads(line) for line in Path(events).read_text().splitlines()]
    manifests = [r["manifest"] for r in lines if "manifest" in r]
    written = [r for r in lines if "path" in r]
    return manifests, written


def _covered(path, write) -> bool:
    path = os.path.realpath(path)
    target = write["path"].rstrip("/")
    if path == target or path.startswith(target + "/"):
        return True
    parent, name = posixpath.split(target)
    while path.startswith(parent + "/"):  # the path, or a folder above it, is a partial name
        kparent, kname = posixpath.split(path)
        if kparent == parent and kname.endswith(ASIDE) and (
                kname.startswith(name + ".") or kname.startswith("." + name + ".")):
            return True
        path = kparent
    return False


def assert_all_planned(events, root):
    manifests, written = _records(events)
    assert manifests, "the run checked no manifest"
    writes = [w for m in manifests for w in m["writes"]]
    roots = [r for m in manifests for r in m["scratch_roots"]]
    stray = sorted({e["path"] for e in written if e["path"] != os.devnull
                    and not any(_covered(e["path"], w) for w in writes)
                    and not any(e["path"] == r or e["path"].startswith(r + "/") for r in roots)})
    assert not stray, stray
    # the test saw the run's writes (it would pass vacuously otherwise)
    assert any(e["path"].startswith(str(root)) for e in written)
    return written


def test_single_runs_with_report_log_and_sidecars(tmp_path):
    write_dwi(tmp_path / "dwi.nii.gz", shape=(10, 9, 8))
    events = tmp_path / "events.jsonl"
    audited(events, "denoise", tmp_path / "dwi.nii.gz", tmp_path / "o.nii.gz",
            "--report-json", tmp_path / "r.json", "--log-file", tmp_path / "run.log",
            "--report", tmp_path / "r.html")
    written = assert_all_planned(events, tmp_path)
    names = {Path(e["path"]).name for e in written}
    assert {"o.nii.gz", "o.json", "o.bval", "r.json", "run.log", "r.html",
            "o_noise.nii.gz"} <= names
    # .nii in place to .nii, and to a Zarr store, and that store denoised back
    write_dwi(tmp_path / "raw.nii", shape=(10, 9, 8), seed=3)
    for src, dst in (("raw.nii", "p.nii"), ("raw.nii", "q.zarr"), ("q.zarr", "z.nii.gz")):
        events = tmp_path / f"events-{dst}.jsonl"
        extra = ["--bvals", tmp_path / "raw.bval"] if src.endswith("zarr") else []
        # a Zarr output's report too: its noise map is a NIfTI beside it
        extra += ["--report", tmp_path / f"{dst}.html"] if dst.endswith("zarr") else []
        audited(events, "denoise", tmp_path / src, tmp_path / dst, *extra)
        assert_all_planned(events, tmp_path)


def test_radius_1_run_keeps_its_predictions_in_the_work_store(tmp_path):
    """With a patch the minima pass writes each block's prediction into the
    work store (the plan's scratch): every file planned, the work store gone
    at the end."""
    write_dwi(tmp_path / "raw.nii", shape=(10, 9, 8), seed=3)
    events = tmp_path / "events.jsonl"
    audited(events, "denoise", tmp_path / "raw.nii", tmp_path / "r1.nii", "--patch-radius", "1",
            "--ver", "1", "--chunks", "10,9,4", "--report", tmp_path / "r1.html")
    written = assert_all_planned(events, tmp_path)
    assert any(Path(e["path"]).suffix == ".npy" for e in written)
    assert not (tmp_path / "r1.nii.p2s-work").exists()


def test_overwrite_tmp_dir_and_convert(tmp_path):
    write_dwi(tmp_path / "dwi.nii.gz", shape=(10, 9, 8))
    scratch = tmp_path / "scratch"
    for i, out in enumerate(("o.nii.gz", "o.zarr")):
        for again in (False, True):  # the second replaces the first's output
            events = tmp_path / f"events-{i}-{again}.jsonl"
            audited(events, "denoise", tmp_path / "dwi.nii.gz", tmp_path / out,
                    "--tmp-dir", scratch, *(["--overwrite"] if again else []))
            assert_all_planned(events, tmp_path)
    for src, dst in (("dwi.nii.gz", "c.zarr"), ("c.zarr", "c.nii.gz")):
        events = tmp_path / f"events-convert-{dst}.jsonl"
        audited(events, "convert", tmp_path / src, tmp_path / dst)
        assert_all_planned(events, tmp_path)


def test_batch_and_bids(dataset, tmp_path):  # noqa: F811
    events = tmp_path / "events-batch.jsonl"
    audited(events, "denoise", *sorted(dataset.glob("sub-02/dwi/*_dwi.nii.gz")),
            "--out-dir", tmp_path / "many")
    assert_all_planned(events, tmp_path)
    events = tmp_path / "events-bids.jsonl"
    audited(events, "bids", dataset, tmp_path / "deriv", "participant")
    written = assert_all_planned(events, tmp_path)
    assert any(e["path"].endswith("dataset_description.json") for e in written)
    # the QC report: each subject's page, its runs' figures and noise maps
    names = {Path(e["path"]).name for e in written}
    assert {"sub-01.html", "sub-02.html"} <= names
    assert any(n.endswith("_desc-p2smosaic_dwi.png") for n in names)
    assert any(n.endswith("_desc-p2snoise_dwimap.nii.gz") for n in names)


def test_killed_run_and_its_resume(tmp_path):
    write_dwi(tmp_path / "dwi.nii.gz", shape=(10, 9, 8))
    out = tmp_path / "o.nii.gz"
    events = tmp_path / "events-killed.jsonl"
    report = ["--report", tmp_path / "r.html"]  # its summaries go in the work store too
    proc = audited(events, "denoise", tmp_path / "dwi.nii.gz", out, *report, wait=False,
                   env={"P2S_DASK_PAUSE_BEFORE": "predict"})
    paused = Path(str(out) + ".p2s-work") / "paused-predict"
    deadline = time.time() + 120
    while not paused.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert paused.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_all_planned(events, tmp_path)
    events = tmp_path / "events-resumed.jsonl"
    audited(events, "denoise", tmp_path / "dwi.nii.gz", out, *report)
    assert_all_planned(events, tmp_path)
    assert out.exists() and not paused.parent.exists()


@pytest.mark.parametrize("flag", ["--report-json", "--log-file"])
def test_refused_runs_write_nothing(tmp_path, flag):
    """A refused run is audited too: not one path written."""
    write_dwi(tmp_path / "dwi.nii.gz", shape=(10, 9, 8))
    events = tmp_path / "events.jsonl"
    proc = audited(events, "denoise", tmp_path / "dwi.nii.gz", tmp_path / "o.nii.gz",
                   flag, tmp_path / "dwi.bval", wait=False)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "never writes over" in err
    manifests, written = _records(events)
    assert manifests and not written
