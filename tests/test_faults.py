"""The safety rules, each with a real fault: what the user is left with.

Runs are killed with real signals at each stage (the run is paused there by
``P2S_DASK_PAUSE_BEFORE``, or slowed per output chunk by
``P2S_DASK_CHUNK_DELAY``), disks really fill (a size-limited tmpfs), inputs
really change between a crash and the rerun. Every rerun is compared with a
clean run of the same command on a fresh OUT.
"""

import gzip
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from p2s_dask.fronts.cli import main

from faults import require_mount, small_disk

BVALS = np.array([0, 0, 0] + [1000] * 9 + [2000] * 8, float)


def write_dwi(path, seed=0, shape=(24, 22, 10), dtype=np.int16, nan=False):
    """A small DWI with its .bval/.bvec; scaled int16 by default."""
    rng = np.random.default_rng(seed)
    anat = 900 + 400 * rng.random(shape)
    raw = anat[..., None] * np.where(BVALS > 50, rng.uniform(.3, .7, BVALS.size), 1) \
        + rng.normal(0, 40, shape + (BVALS.size,))
    if dtype == np.int16:
        raw = np.clip(np.rint(raw / 3.5), -32768, 32767).astype(np.int16)
    else:
        raw = raw.astype(dtype)
    if nan:
        raw[3, 4, 5, 6] = np.nan
    img = nib.Nifti1Image(raw, np.diag([2.0, 2.0, 2.0, 1.0]))
    if dtype == np.int16:
        img.header.set_slope_inter(3.5, 2.0)
    nib.save(img, str(path))
    stem = str(path).removesuffix(".gz").removesuffix(".nii")
    np.savetxt(stem + ".bval", BVALS[None], fmt="%g")
    np.savetxt(stem + ".bvec", np.tile([[1.0], [0.0], [0.0]], (1, BVALS.size)), fmt="%g")
    return Path(path)


def cli(*args):
    return main([str(a) for a in args] + ["--quiet"])


def one_line_error(capsys, *args):
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2s-dask: error:") and "\n" not in err, err
    return err


def command(*args):
    return [sys.executable, "-m", "p2s_dask.fronts.cli", *map(str, args), "--quiet"]


def _ctrl_c_as_at_a_terminal():
    """In the child before exec: SIGINT back to its default. A pytest started
    in the background (``cmd &``, ``nohup``) ignores SIGINT, and so would every
    run it starts (an ignored signal is inherited), which no Ctrl-C reaches."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn(*args, **env):
    return subprocess.Popen(command(*args), env=dict(os.environ, **env),
                            preexec_fn=_ctrl_c_as_at_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.02)
    raise AssertionError("timed out")


def kill_at(stage, out, *args, sig=signal.SIGKILL, **env):
    """Start ``denoise ... OUT ARGS`` paused before ``stage``; kill it there."""
    work = Path(str(out) + ".p2s-work")
    proc = spawn("denoise", *args, P2S_DASK_PAUSE_BEFORE=stage, **env)
    wait_for(lambda: (work / f"paused-{stage}").exists(), proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc


def kill_mid_prediction(out, *args, **env):
    work = Path(str(out) + ".p2s-work")
    proc = spawn("denoise", *args, P2S_DASK_CHUNK_DELAY="0.1", **env)
    wait_for(lambda: len(list((work / "done").glob("*"))) >= 2
             if (work / "done").exists() else False, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def voxels(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


def snapshot(path):
    path = Path(path)
    if path.is_dir():
        return {p.relative_to(path).as_posix(): p.read_bytes()
                for p in sorted(path.rglob("*")) if p.is_file()}
    if path.name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())  # the gzip header holds a time
    return path.read_bytes()


def leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name.endswith((".p2s-work", ".p2s-lock", ".partial")))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    gz = write_dwi(folder / "dwi.nii.gz")
    nii = write_dwi(folder / "plain.nii")
    store = folder / "dwi.zarr"
    assert cli("convert", gz, store) == 0
    return {"gz": gz, "nii": nii, "zarr": store, "folder": folder}


# -- IN and OUT -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["gz", "nii", "zarr"])
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_in_equals_out_is_refused(data, capsys, kind, overwrite):
    inp = data[kind]
    before = snapshot(inp)
    err = one_line_error(capsys, "denoise", inp, inp, *overwrite)
    assert "input" in err
    assert snapshot(inp) == before
    assert leftovers(data["folder"]) == []


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_in_equals_out_through_links(data, tmp_path, capsys, overwrite):
    inp = data["gz"]
    before = snapshot(inp)
    soft = tmp_path / "soft.nii.gz"
    soft.symlink_to(inp)
    hard = tmp_path / "hard.nii.gz"
    os.link(inp, hard)
    for out in (soft, hard):
        assert "input" in one_line_error(capsys, "denoise", inp, out, *overwrite)
    assert "input" in one_line_error(capsys, "denoise", soft, inp, *overwrite)
    assert snapshot(inp) == before and soft.is_symlink()


def test_out_inside_the_input_store_is_refused(data, capsys):
    before = snapshot(data["zarr"])
    for out in (data["zarr"] / "den.nii", data["zarr"] / "sub" / "den.zarr"):
        err = one_line_error(capsys, "denoise", data["zarr"], out, "--overwrite")
        assert "inside" in err
    assert snapshot(data["zarr"]) == before


def test_out_may_not_replace_the_mask_or_gradients(data, tmp_path, capsys):
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((24, 22, 10), np.uint8), np.eye(4)), str(mask))
    before = mask.read_bytes()
    err = one_line_error(capsys, "denoise", data["gz"], mask, "--mask", mask, "--overwrite")
    assert "never writes over what it reads" in err and mask.read_bytes() == before


# -- resuming only what matches ----------------------------------------------

def test_changed_input_after_a_crash(tmp_path, capsys):
    inp = write_dwi(tmp_path / "dwi.nii.gz", seed=1)
    out = tmp_path / "out.nii"
    kill_at("predict", out, inp, out)
    write_dwi(inp, seed=2)  # the user fixes or replaces the file
    assert cli("denoise", inp, out) == 0
    assert "starting over: the input changed" in capsys.readouterr().err
    clean = tmp_path / "clean.nii"
    assert cli("denoise", inp, clean) == 0
    assert out.read_bytes()[352:] == clean.read_bytes()[352:]


def test_changed_content_with_the_same_size_and_time(tmp_path, capsys):
    inp = write_dwi(tmp_path / "dwi.nii", seed=1)
    out = tmp_path / "out.nii"
    kill_at("minima", out, inp, out)
    stat = inp.stat()
    img = nib.load(str(inp))
    raw = np.asanyarray(img.dataobj).copy()
    raw[..., 5] = raw[..., 6]  # a whole volume replaced, same bytes count
    nib.save(nib.Nifti1Image(raw, img.affine, img.header), str(inp))
    os.utime(inp, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert inp.stat().st_size == stat.st_size
    assert cli("denoise", inp, out) == 0
    assert "the input changed" in capsys.readouterr().err
    clean = tmp_path / "clean.nii"
    assert cli("denoise", inp, clean) == 0
    assert out.read_bytes() == clean.read_bytes()


def test_changed_mask_after_a_crash(data, tmp_path, capsys):
    mask = tmp_path / "mask.nii.gz"  # on the data's grid (write_dwi's affine)
    m = np.zeros((24, 22, 10), np.uint8)
    m[4:20, 4:18, 2:8] = 1
    nib.save(nib.Nifti1Image(m, np.diag([2.0, 2.0, 2.0, 1.0])), str(mask))
    out = tmp_path / "out.nii"
    kill_at("minima", out, data["gz"], out, "--mask", mask)
    m[:, :, 5] = 0
    nib.save(nib.Nifti1Image(m, np.diag([2.0, 2.0, 2.0, 1.0])), str(mask))
    assert cli("denoise", data["gz"], out, "--mask", mask) == 0
    assert "the mask changed" in capsys.readouterr().err
    clean = tmp_path / "clean.nii"
    assert cli("denoise", data["gz"], clean, "--mask", mask) == 0
    np.testing.assert_array_equal(voxels(out), voxels(clean))


@pytest.mark.parametrize("first,second", [
    (["--memory-limit", "20MiB"], ["--memory-limit", "64MiB"]),
    (["--memory-limit", "40MiB", "--threads", "2"], ["--memory-limit", "40MiB", "--threads", "1"]),
])
def test_rerun_with_another_budget_or_thread_count(tmp_path, capsys, first, second):
    inp = write_dwi(tmp_path / "big.nii.gz", shape=(48, 44, 20), dtype=np.float32)
    out = tmp_path / "out.nii"
    kill_mid_prediction(out, inp, out, *first)
    assert cli("denoise", inp, out, *second) == 0
    assert "the chunk grid changed" in capsys.readouterr().err
    clean = tmp_path / "clean.nii"
    assert cli("denoise", inp, clean, *second) == 0
    assert out.read_bytes() == clean.read_bytes()


def test_nan_input_fixed_and_rerun(tmp_path, capsys):
    inp = write_dwi(tmp_path / "dwi.nii.gz", dtype=np.float32, nan=True)
    out = tmp_path / "out.nii"
    err = one_line_error(capsys, "denoise", inp, out)
    assert "NaN" in err and "(3, 4, 5, 6)" in err
    assert leftovers(tmp_path) == [] and not out.exists()
    write_dwi(inp, dtype=np.float32)
    assert cli("denoise", inp, out) == 0
    clean = tmp_path / "clean.nii"
    assert cli("denoise", inp, clean) == 0
    assert out.read_bytes() == clean.read_bytes()


# -- kills -------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ref")
    refs = {}
    for suffix in (".nii", ".zarr", ".nii.gz"):
        # its own stem: a .nii and a .nii.gz would share sidecars
        refs[suffix] = folder / f"ref{suffix.replace('.', '_')}{suffix}"
        assert cli("denoise", data["gz"], refs[suffix]) == 0
    return refs


@pytest.mark.parametrize("suffix", [".nii", ".zarr", ".nii.gz"])
@pytest.mark.parametrize("stage", ["input", "statistics", "minima", "predict", "output"])
def test_sigkill_at_each_stage_then_rerun(data, reference, tmp_path, suffix, stage):
    out = tmp_path / f"out{suffix}"
    kill_at(stage, out, data["gz"], out)
    assert not out.exists()  # nothing that looks complete
    res = subprocess.run(command("denoise", data["gz"], out), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert snapshot(out) == snapshot(reference[suffix])
    assert leftovers(tmp_path) == []


def test_kill_mid_prediction_resumes_finished_chunks(data, reference, tmp_path):
    out = tmp_path / "out.nii"
    kill_mid_prediction(out, data["gz"], out, "--chunks", "6,6,5")
    res = subprocess.run(command("denoise", data["gz"], out, "--chunks", "6,6,5"),
                         capture_output=True, text=True)
    assert res.returncode == 0 and "output chunks" in res.stdout, res.stderr
    clean = tmp_path / "clean.nii"
    assert cli("denoise", data["gz"], clean, "--chunks", "6,6,5") == 0
    assert out.read_bytes() == clean.read_bytes()


def test_damaged_staged_input_is_redone(data, reference, tmp_path, capsys):
    # a kill during the conversion leaves a store without its metadata; a
    # budget under twice the image makes the run stage its .nii.gz input
    inp = write_dwi(tmp_path / "big.nii.gz", shape=(48, 44, 10))  # 845 kB of int16
    chunks = ("--chunks", "48,44,2")
    out = tmp_path / "out.nii"
    kill_at("statistics", out, inp, out, "--memory-limit", "1MiB", *chunks)
    staged = Path(str(out) + ".p2s-work") / "input.zarr"
    (staged / "zarr.json").write_text("{")
    assert cli("denoise", inp, out, "--memory-limit", "1MiB", *chunks) == 0
    # the same as a run that holds the input in memory, bit for bit
    clean = tmp_path / "clean.nii"
    assert cli("denoise", inp, clean, *chunks) == 0
    assert out.read_bytes() == clean.read_bytes()


def test_ctrl_c_is_one_line_and_resumes(data, reference, tmp_path):
    out = tmp_path / "out.zarr"
    proc = kill_at("predict", out, data["gz"], out, sig=signal.SIGINT)
    err = proc.stderr.read().strip()
    assert proc.returncode == 130 and "interrupted" in err and "\n" not in err, err
    assert not out.exists()
    assert cli("denoise", data["gz"], out) == 0
    assert snapshot(out) == snapshot(reference[".zarr"])


def test_two_runs_on_one_output(data, reference, tmp_path, capsys):
    out = tmp_path / "out.nii"
    work = Path(str(out) + ".p2s-work")
    first = spawn("denoise", data["gz"], out, P2S_DASK_PAUSE_BEFORE="predict")
    wait_for(lambda: (work / "paused-predict").exists(), first)
    assert "another p2s-dask run" in one_line_error(capsys, "denoise", data["gz"], out,
                                                     "--overwrite")
    assert (work / "run.json").exists()  # the first run's work is untouched
    first.kill()
    first.wait()
    assert cli("denoise", data["gz"], out) == 0
    assert out.read_bytes() == reference[".nii"].read_bytes()


def test_work_store_holds_no_pickle(data, tmp_path):
    out = tmp_path / "out.nii.gz"
    kill_at("output", out, data["gz"], out)
    work = Path(str(out) + ".p2s-work")
    files = [p for p in work.rglob("*") if p.is_file()]
    assert any(p.name == "statistics.npz" for p in files)
    for path in files:
        with pytest.raises(Exception):
            pickle.loads(path.read_bytes())
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                assert all(npz[k].dtype != object for k in npz.files)


# -- bad input leaves nothing, and never costs the old OUT ---------------------

def test_overwrite_with_bad_input_keeps_the_old_output(data, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    assert cli("denoise", data["gz"], out) == 0
    before = out.read_bytes()
    short = tmp_path / "short.bval"
    np.savetxt(short, BVALS[:-1][None], fmt="%g")
    one_line_error(capsys, "denoise", data["gz"], out, "--overwrite", "--bvals", short)
    nan = write_dwi(tmp_path / "nan.nii.gz", dtype=np.float32, nan=True)
    one_line_error(capsys, "denoise", nan, out, "--overwrite")
    assert out.read_bytes() == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fault", ["nan", "truncated", "corrupt", "empty_mask"])
def test_refused_input_leaves_nothing(data, tmp_path, capsys, fault):
    inp = write_dwi(tmp_path / "dwi.nii.gz", dtype=np.float32, nan=fault == "nan")
    extra = []
    if fault == "truncated":
        inp.write_bytes(inp.read_bytes()[:-3000])
    elif fault == "corrupt":
        raw = bytearray(inp.read_bytes())
        raw[len(raw) // 2:len(raw) // 2 + 64] = b"\x00" * 64
        inp.write_bytes(bytes(raw))
    elif fault == "empty_mask":
        mask = tmp_path / "mask.nii.gz"
        # on the data's grid: refused for being empty, not for its affine
        nib.save(nib.Nifti1Image(np.zeros((24, 22, 10), np.uint8),
                                 np.diag([2.0, 2.0, 2.0, 1.0])), str(mask))
        extra = ["--mask", mask]
    out = tmp_path / "out.nii"
    one_line_error(capsys, "denoise", inp, out, *extra)
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("args,flag", [
    (["--workers", "0"], "--workers"), (["--workers", "-1"], "--workers"),
    (["--threads", "0"], "--threads"), (["--b0-threshold", "nan"], "--b0-threshold"),
    (["--patch-radius", "a"], "--patch-radius"), (["--patch-radius", "-1"], "--patch-radius"),
])
def test_bad_options_name_the_flag(data, tmp_path, capsys, args, flag):
    err = one_line_error(capsys, "denoise", data["gz"], tmp_path / "o.nii", *args)
    assert flag in err and "invalid _radius" not in err and "=" not in err
    assert leftovers(tmp_path) == []


def test_negative_bvals_are_refused(data, tmp_path, capsys):
    bad = tmp_path / "neg.bval"
    np.savetxt(bad, np.where(np.arange(BVALS.size) == 4, -5, BVALS)[None], fmt="%g")
    err = one_line_error(capsys, "denoise", data["gz"], tmp_path / "o.nii", "--bvals", bad)
    assert ">= 0" in err and "index 4" in err


def test_existing_output_names_the_flag(data, tmp_path, capsys):
    out = tmp_path / "o.nii"
    out.write_bytes(b"x")
    err = one_line_error(capsys, "denoise", data["gz"], out)
    assert "--overwrite" in err and "overwrite=True" not in err
    err = one_line_error(capsys, "convert", data["gz"], data["zarr"])
    assert "--overwrite" in err and "overwrite=True" not in err


# -- the scheduler -------------------------------------------------------------

def test_malformed_scheduler_address_in_the_environment(data, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp//nowhere")
    import dask
    dask.config.refresh()
    try:
        err = one_line_error(capsys, "denoise", data["gz"], tmp_path / "o.nii")
    finally:
        monkeypatch.delenv("DASK_SCHEDULER_ADDRESS")
        dask.config.refresh()
    assert "DASK_SCHEDULER_ADDRESS" in err
    assert leftovers(tmp_path) == []


def test_unreachable_scheduler_leaves_nothing(data, tmp_path, capsys):
    err = one_line_error(capsys, "denoise", data["gz"], tmp_path / "o.nii",
                         "--scheduler", "tcp://127.0.0.1:9")
    assert "cannot reach" in err
    assert leftovers(tmp_path) == []


# -- full disks ------------------------------------------------------------------

def _remount(path, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@pytest.mark.parametrize("where,suffix", [
    ("scratch", ".nii"), ("output", ".nii"), ("output", ".zarr"), ("output", ".nii.gz")])
def test_full_disk_then_rerun(tmp_path, capsys, where, suffix):
    require_mount()
    inp = write_dwi(tmp_path / "dwi.nii.gz", shape=(40, 40, 16), dtype=np.float32)
    disk = tmp_path / "disk"
    disk.mkdir()
    with small_disk(disk, 256 * 1024):
        if where == "scratch":
            # a budget under twice the input (2 MB): staged, not held in memory
            out, extra = tmp_path / f"out{suffix}", ["--tmp-dir", disk, "--memory-limit",
                                                     "3MiB"]
        else:
            out, extra = disk / f"out{suffix}", ["--tmp-dir", tmp_path / "work"]
        (tmp_path / "work").mkdir(exist_ok=True)
        err = one_line_error(capsys, "denoise", inp, out, *extra)
        assert "space" in err.lower(), err
        assert not out.exists()
        _remount(disk, "64m")
        assert cli("denoise", inp, out, *extra) == 0
        clean = tmp_path / f"clean{suffix}"
        assert cli("denoise", inp, clean) == 0
        if suffix == ".zarr":
            from p2s_dask.io import open_dwi
            np.testing.assert_array_equal(open_dwi(str(out))[0].compute(),
                                          open_dwi(str(clean))[0].compute())
        else:
            np.testing.assert_array_equal(voxels(out), voxels(clean))


def test_scratch_files_stay_under_tmp_dir(tmp_path, monkeypatch):
    """The conversion's scratch file (as large as the data) goes under
    --tmp-dir: with $TMPDIR on a full disk the run still succeeds."""
    require_mount()
    inp = write_dwi(tmp_path / "dwi.nii.gz", shape=(40, 40, 16), dtype=np.float32)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    with small_disk(tiny, 64 * 1024):
        res = subprocess.run(
            command("denoise", inp, tmp_path / "o.nii", "--memory-limit", "4MiB",
                    "--tmp-dir", tmp_path / "work"),
            env=dict(os.environ, TMPDIR=str(tiny)), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert list(tiny.iterdir()) == []


# -- object stores ---------------------------------------------------------------

@pytest.fixture(scope="module")
def s3(data):
    pytest.importorskip("s3fs")
    from faults import MotoS3
    with MotoS3(bucket="p2s-faults") as server:
        fs = server.filesystem()
        for ext in (".nii.gz", ".bval", ".bvec"):
            fs.put(str(data["gz"]).replace(".nii.gz", ext), f"p2s-faults/in/dwi{ext}")
        yield server


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_in_equals_out_on_the_object_store(s3, capsys, overwrite):
    import json
    fs = s3.filesystem()
    before = fs.cat_file("p2s-faults/in/dwi.nii.gz")
    so = ["--storage-options", json.dumps(s3.options())]
    for out in ("s3://p2s-faults/in/dwi.nii.gz", "s3://p2s-faults//in/./dwi.nii.gz"):
        err = one_line_error(capsys, "denoise", "s3://p2s-faults/in/dwi.nii.gz", out,
                             *so, *overwrite)
        assert "input" in err
    fs.invalidate_cache()
    assert fs.cat_file("p2s-faults/in/dwi.nii.gz") == before
    assert sorted(fs.ls("p2s-faults/in")) == sorted(
        f"p2s-faults/in/dwi{e}" for e in (".bval", ".bvec", ".nii.gz"))


def test_object_store_lost_mid_run(data, s3, tmp_path):
    import json

    from p2s_dask.run.pipeline import work_url
    out = "s3://p2s-faults/out/den.zarr"
    work = Path(work_url(out, str(tmp_path)))
    so = json.dumps(s3.options(config_kwargs={"retries": {"max_attempts": 1},
                                              "connect_timeout": 2, "read_timeout": 2}))
    proc = spawn("denoise", "s3://p2s-faults/in/dwi.nii.gz", out, "--tmp-dir", tmp_path,
                 "--storage-options", so, "--chunks", "6,6,5", P2S_DASK_CHUNK_DELAY="0.2")
    wait_for(lambda: len(list((work / "done").glob("*"))) >= 2
             if (work / "done").exists() else False, proc)
    s3.stop()
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        s3.start()
    err = err.strip()
    assert proc.returncode == 2, err
    assert err.startswith("p2s-dask: error:") and "\n" not in err, err
    fs = s3.filesystem()
    # nothing that looks complete: the store is not marked complete
    from p2s_dask.io.zarr_store import store_state
    assert store_state(out, s3.options()) != "complete"
    assert (work / "run.json").exists()  # kept for the same command to resume
    del fs


def test_unknown_storage_option_is_one_line(tmp_path, capsys):
    import json
    so = json.dumps({"retries": 1, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})
    err = one_line_error(capsys, "denoise", "s3://bucket/dwi.nii.gz", tmp_path / "o.nii",
                         "--storage-options", so)
    assert "storage option" in err and "retries" in err
    assert leftovers(tmp_path) == []
