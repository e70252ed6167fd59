"""Ctrl-C of ``p2s-dask denoise --workers 2``: one line, exit code 130.

A Ctrl-C at a terminal sends SIGINT to the whole foreground process group:
the CLI and the worker processes of its LocalCluster. The run must stop with
the CLI's one line and no traceback (the workers used to print their own
KeyboardInterrupt and their lost heartbeats), and leave no process behind.
The runs are slowed by ``P2S_DASK_CHUNK_DELAY`` so the signal lands while the
workers are predicting.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("distributed")

LINE = "p2s-dask: interrupted; rerun the same command to resume"
# seconds each output chunk waits: 10 chunks on 2 workers last 2.5 s
DELAY = "0.5"


def _ctrl_c_as_at_a_terminal():
    """In the child: SIGINT at its default, whatever this pytest inherited
    (one started in the background ignores it, and so would the run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(dwi, out):
    """A ``denoise --workers 2`` in a process group (session) of its own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("P2S_DASK_SCHEDULER", "DASK_SCHEDULER_ADDRESS")}
    env["P2S_DASK_CHUNK_DELAY"] = DELAY
    # one chunk per z-plane: 10 prediction tasks
    cmd = [sys.executable, "-m", "p2s_dask.fronts.cli", "denoise", str(dwi), str(out),
           "--workers", "2", "--chunks", "24,22,1", "--quiet"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=_ctrl_c_as_at_a_terminal)


def _wait_until_predicting(proc, folder, timeout=180):
    """Until a first output chunk is marked done in the work store."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.parent.name == "done" for p in Path(folder).rglob("*")):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no output chunk was written in time")


def _group_members(pgid):
    """Live (not zombie) processes of a process group, from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # the fields after the command name (which may hold spaces)
        fields = text.rsplit(")", 1)[1].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            alive.append(int(stat.parent.name))
    return alive


def _interrupt(proc, whole_group):
    if whole_group:
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    else:
        proc.send_signal(signal.SIGINT)  # `kill -INT` of the CLI alone
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run did not stop within 120 s of SIGINT") from None
    return err


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("whole_group", [True, False], ids=["ctrl-c", "cli-only"])
def test_sigint_mid_run_is_one_line(small_dwi, tmp_path, whole_group):
    out = tmp_path / "out.zarr"
    proc = _start(small_dwi, out)
    _wait_until_predicting(proc, tmp_path)
    err = _interrupt(proc, whole_group)
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == LINE, err
    # --quiet: the one line is all there is
    assert err.strip() == LINE, err
    assert proc.returncode == 130
    # the LocalCluster's workers are stopped with the run, none is left
    deadline = time.monotonic() + 30
    while _group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _group_members(proc.pid) == []
    assert not out.exists()
