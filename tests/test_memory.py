"""Memory stays within a budget that does not grow with the data.

Each case runs in a fresh subprocess whose whole process tree is sampled, so
nothing else in the test session counts.
"""

import subprocess
import sys
import textwrap

import nibabel as nib
import numpy as np

from p2s_dask.run.memory import PeakMemory

MiB = 2**20


def peak_tree_rss(cmd, env=None):
    """Run ``cmd``; return (exit code, peak RSS of its process tree, output)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    with PeakMemory(proc.pid, interval=0.01) as peak:
        out, _ = proc.communicate()
    return proc.returncode, peak.peak, out


def write_int16(path, shape, seed):
    rng = np.random.default_rng(seed)
    nvol = shape[3]
    bvals = np.array([0] * 4 + [1000] * (nvol - 4))
    anat = 800 + 200 * rng.random(shape[:3])
    vol = np.empty(shape, np.int16)
    for v in range(nvol):
        att = 1.0 if bvals[v] == 0 else rng.uniform(0.3, 0.7)
        vol[..., v] = np.rint(anat * att + rng.normal(0, 30, shape[:3]))
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    np.savetxt(str(path).replace(".nii.gz", ".bval"), bvals[None], fmt="%d")
    return vol.nbytes


def test_cli_memory_does_not_grow_with_data(tmp_path):
    """Data 4x and 64x larger than a small one, with a 64 MiB budget: the peak
    of the whole run grows by less than the budget."""
    budget = 64 * MiB
    peaks = {}
    for name, shape in [("small", (24, 24, 12, 60)), ("large", (96, 96, 48, 60))]:
        src = tmp_path / f"{name}.nii.gz"
        nbytes = write_int16(src, shape, seed=1)
        cmd = [sys.executable, "-m", "p2s_dask.fronts.cli", "denoise", str(src),
               str(tmp_path / f"{name}_out.nii.gz"), "--memory-limit", str(budget),
               "--quiet"]
        rc, peak, out = peak_tree_rss(cmd)
        assert rc == 0, out
        peaks[name] = (peak, nbytes)
    large_bytes = peaks["large"][1]
    assert large_bytes * 4 > budget  # float64 values several times the budget
    growth = peaks["large"][0] - peaks["small"][0]
    assert growth < budget, f"peak grew by {growth / MiB:.0f} MiB"


def test_api_adds_about_one_output(tmp_path):
    """NumPy in, NumPy out: beyond the input, the call holds the output plus a
    few blocks, never copies of the data (DIPY holds several)."""
    script = textwrap.dedent("""
        import numpy as np, psutil, threading, time
        from p2s_dask import patch2self
        shape = (96, 96, 60, 64)
        rng = np.random.default_rng(0)
        data = np.empty(shape, np.float32)
        for z in range(shape[2]):
            data[:, :, z] = 500 + 100 * rng.random(shape[:2] + (shape[3],), dtype=np.float32)
        bvals = np.array([0] * 4 + [1000] * 60)
        proc = psutil.Process()
        base = proc.memory_info().rss
        peak = [base]
        stop = threading.Event()
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                stop.wait(0.005)
        th = threading.Thread(target=sample); th.start()
        out = patch2self(data, bvals, version=1)
        stop.set(); th.join()
        print((peak[0] - base) / data.nbytes)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    extra = float(res.stdout.strip().splitlines()[-1])
    # the output (1.0 x the input for float32) plus blocks and bookkeeping
    assert extra < 1.5, f"extra memory was {extra:.2f} x the input"
