"""A killed ``convert`` is redone by the same command: its unfinished store
is ours, never the user's data, and needs no --overwrite."""

import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np

from p2s_dask.fronts.cli import main
from p2s_dask.io import open_dwi
from p2s_dask.io.zarr_store import PENDING_KEY, is_unfinished, store_state


def test_killed_convert_is_redone(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (64, 64, 40, 40)).astype(np.float32)
    src = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(src))
    np.savetxt(tmp_path / "dwi.bval", np.r_[[0] * 4, [1000] * 36][None], fmt="%g")
    dst = tmp_path / "dwi.zarr"
    cmd = [sys.executable, "-m", "p2s_dask.fronts.cli", "convert", str(src), str(dst),
           "--memory-limit", "4MiB", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not (dst / PENDING_KEY).exists() and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert is_unfinished(str(dst))  # killed mid-way
    assert store_state(str(dst)) != "complete"
    assert main(["convert", str(src), str(dst), "--memory-limit", "4MiB", "--quiet"]) == 0
    assert "unfinished conversion (killed?) is redone" in capsys.readouterr().err
    arr, meta = open_dwi(str(dst))
    np.testing.assert_array_equal(np.asarray(arr), data)
    # a complete store is the user's: never replaced without --overwrite
    assert main(["convert", str(src), str(dst), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
