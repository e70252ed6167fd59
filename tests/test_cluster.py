"""The pipeline on a real Dask cluster: a scheduler and workers in their own
processes on 127.0.0.1, started and stopped here.

Checks that ``--scheduler`` (and ``$P2S_DASK_SCHEDULER``) gives the local
run's output bit for bit, that storage options reach the workers (S3 on a
local moto server), that workers which cannot see our local files are
refused, and that losing a worker in the middle of the prediction
still gives the same output: Dask reruns the lost tasks, and each of our
output-chunk tasks writes whole chunks, so running one twice is harmless.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from p2s_dask.fronts.cli import main
from p2s_dask.io import open_dwi

# every run of a comparison uses the same chunks: the statistics are summed
# chunk by chunk, so another chunking could change the last bit of a float32
CHUNKS = "8,11,5"
KILL_CHUNKS = "4,4,5"  # 6 x 6 x 2 = 72 output tasks: time to kill one worker
N_KILL_TASKS = 72
# seconds each output-chunk task sleeps on our workers (the pipeline's
# P2S_DASK_CHUNK_DELAY), so that a run lasts long enough to kill a worker in
CHUNK_DELAY = 0.05

# moto keeps buckets in this process's memory, shared by all its servers
BUCKET = "p2s-test-cluster"

# variables of ours and of the AWS SDK that must not leak into the cluster
_OWN_VARS = ("P2S_DASK_SCHEDULER", "P2S_DASK_CHUNK_DELAY")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in _OWN_VARS and not k.startswith("AWS_")}
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Cluster:
    """A ``dask scheduler`` and ``dask worker`` processes, each in its own
    process group so that stopping one stops its nanny's children too.

    Parameters
    ----------
    folder : pathlib.Path
        For the scheduler file, logs and the workers' scratch space.
    n_workers : int
    env : dict
        Environment of the workers (and the scheduler).
    """

    def __init__(self, folder, n_workers=2, env=None, worker_args=()):
        self.worker_args = list(worker_args)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.env = env or _clean_env()
        self.address = None
        self.scheduler = None
        self.workers = []
        self._start(n_workers)
        self.wait_for_workers(n_workers)

    def _spawn(self, args, log_name):
        log = open(self.folder / log_name, "wb")
        try:
            # the same interpreter as the tests: the workers import this p2s_dask
            return subprocess.Popen([sys.executable, "-m", *args], stdout=log,
                                    stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        finally:
            log.close()

    def _start(self, n_workers):
        scheduler_file = self.folder / "scheduler.json"
        self.scheduler = self._spawn(
            ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
             "--scheduler-file", str(scheduler_file),
             # a safety net: if these tests die without stopping it, it goes away
             "--idle-timeout", "600"], "scheduler.log")
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.address = json.loads(scheduler_file.read_text())["address"]
                break
            if time.monotonic() > deadline or self.scheduler.poll() is not None:
                self.stop()
                raise RuntimeError("the Dask scheduler did not start:\n" + self.logs())
            time.sleep(0.05)
        for _ in range(n_workers):
            self.add_worker()

    def add_worker(self):
        """Start one more single-threaded worker (not waiting for it)."""
        i = len(self.workers)
        self.workers.append(self._spawn(
            ["distributed.cli.dask_worker", self.address, "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{i}",
             "--local-directory", str(self.folder / f"w{i}"),
             # workers whose scheduler is gone exit instead of lingering
             "--death-timeout", "30", *self.worker_args], f"worker{i}.log"))

    def client(self):
        from distributed import Client
        return Client(self.address, timeout="30s")

    def wait_for_workers(self, n):
        with self.client() as client:
            client.wait_for_workers(n, timeout=90)

    def n_workers(self):
        with self.client() as client:
            return len(client.scheduler_info(n_workers=-1)["workers"])

    def task_prefixes(self):
        """Names of the task kinds the scheduler has run."""
        with self.client() as client:
            return client.run_on_scheduler(
                lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))

    def kill_worker(self, i):
        """SIGKILL worker ``i``: its nanny and the worker process, no goodbye."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.workers[i].pid, signal.SIGKILL)
        self.workers[i].wait()

    def logs(self):
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.folder.glob("*.log")))

    def stop(self):
        """Stop the workers, then the scheduler: SIGTERM, then SIGKILL."""
        procs = [*self.workers, self.scheduler]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
            # the group may hold children that outlive their parent
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler with two single-threaded, slowed-down workers, stopped
    afterwards."""
    c = Cluster(tmp_path_factory.mktemp("cluster"),
                env=_clean_env(P2S_DASK_CHUNK_DELAY=CHUNK_DELAY))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def local_result(small_dwi, tmp_path_factory):
    """The same denoising on the default local cluster."""
    out = tmp_path_factory.mktemp("local") / "den.nii.gz"
    assert main(["denoise", str(small_dwi), str(out), "--chunks", CHUNKS, "--quiet"]) == 0
    return np.asanyarray(nib.load(out).dataobj)


def test_scheduler_option_equals_local(cluster, small_dwi, local_result, tmp_path):
    out = tmp_path / "den.nii.gz"
    assert main(["denoise", str(small_dwi), str(out), "--chunks", CHUNKS,
                 "--scheduler", cluster.address, "--quiet"]) == 0, cluster.logs()
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), local_result)
    assert not list(tmp_path.glob("*.p2s-work"))
    # the chunks were predicted on the cluster, not in this process
    assert "write_chunk" in cluster.task_prefixes()


def test_scheduler_from_environment_zarr_radius1(cluster, small_dwi, tmp_path,
                                                 monkeypatch):
    # patch radius 1 in x and y: each chunk needs its neighbours' borders,
    # computed by other tasks, possibly on the other worker
    ref = tmp_path / "ref.zarr"
    args = ["--chunks", CHUNKS, "--patch-radius", "1,1,0", "--ver", "1", "--quiet"]
    assert main(["denoise", str(small_dwi), str(ref), *args]) == 0
    monkeypatch.setenv("P2S_DASK_SCHEDULER", cluster.address)
    out = tmp_path / "den.zarr"
    assert main(["denoise", str(small_dwi), str(out), *args]) == 0, cluster.logs()
    np.testing.assert_array_equal(open_dwi(out)[0].compute(), open_dwi(ref)[0].compute())


def test_storage_options_reach_workers(cluster, small_dwi, local_result, tmp_path):
    """S3 in and out, credentials only on the command line (the workers'
    environment has none): the options travel with the tasks."""
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        options = {"key": "testing", "secret": "testing",
                   "client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir(BUCKET)
        stem = str(small_dwi).removesuffix(".nii.gz")
        for ext in (".nii.gz", ".bval", ".bvec"):
            fs.put(stem + ext, f"{BUCKET}/in/dwi{ext}")
        assert main(["denoise", f"s3://{BUCKET}/in/dwi.nii.gz",
                     f"s3://{BUCKET}/out/den.nii.gz",
                     "--chunks", CHUNKS, "--scheduler", cluster.address, "--quiet",
                     "--storage-options", json.dumps(options)]) == 0, cluster.logs()
        fs.invalidate_cache()
        # no work store left
        assert fs.find(f"{BUCKET}/out") == [f"{BUCKET}/out/den{e}" for e in
                                            (".bval", ".bvec", ".json", ".nii.gz")]
        fs.get(f"{BUCKET}/out/den.nii.gz", str(tmp_path / "den.nii.gz"))
    finally:
        server.stop()
    np.testing.assert_array_equal(np.asanyarray(nib.load(tmp_path / "den.nii.gz").dataobj),
                                  local_result)


def test_workers_must_see_local_files(cluster, tmp_path):
    """With --scheduler, local paths work only where the workers share the
    file system; the pipeline checks that before any work."""
    from p2s_dask.run.executors import require_shared_files
    from p2s_dask.errors import InputError

    shared = tmp_path / "params.json"
    shared.write_text("{}")
    with cluster.client() as client:
        require_shared_files(client, [str(shared)])  # one machine: the same file
        # /proc/self/stat is another file in every process, as a local path
        # is another file (or none) on a worker on another machine
        with pytest.raises(InputError, match=r"Dask workers do not see /proc/self/stat "
                                             r"as this machine does: .*s3://"):
            require_shared_files(client, [str(shared), "/proc/self/stat"], attempts=1)


def test_losing_a_worker_mid_run(cluster, small_dwi, tmp_path):
    """SIGKILL one of two workers once some output chunks are written: the
    run still finishes, with the uninterrupted run's output."""
    ref = tmp_path / "ref.nii.gz"
    assert main(["denoise", str(small_dwi), str(ref), "--chunks", KILL_CHUNKS,
                 "--quiet"]) == 0
    cluster.wait_for_workers(2)
    victim = len(cluster.workers) - 2
    out = tmp_path / "den.nii.gz"
    done = Path(str(out) + ".p2s-work") / "done"
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2s_dask.fronts.cli", "denoise", str(small_dwi), str(out),
         "--chunks", KILL_CHUNKS, "--scheduler", cluster.address, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_clean_env())
    try:
        deadline = time.monotonic() + 120
        n_at_kill = 0
        while time.monotonic() < deadline and proc.poll() is None:
            n_at_kill = len(os.listdir(done)) if done.is_dir() else 0
            if n_at_kill >= 6:
                break
            time.sleep(0.01)
        cluster.kill_worker(victim)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # later tests get two workers again
        cluster.add_worker()
    assert proc.returncode == 0, stderr + cluster.logs()
    assert 6 <= n_at_kill < N_KILL_TASKS, "the kill must land during the prediction"
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj),
                                  np.asanyarray(nib.load(ref).dataobj))
    assert not done.parent.exists()
    assert "Traceback" not in stderr
    worker_log = (cluster.folder / f"worker{victim}.log").read_text(errors="replace")
    assert "End worker" not in worker_log  # it was killed, not stopped politely


def test_chunks_follow_each_workers_memory_limit(tmp_path):
    """Two clusters whose workers report 256 MiB and 1 GiB: two chunk sizes,
    each the chunk policy's for that worker, and each run equal to a local
    run on the same chunks."""
    from p2s_dask.planning.chunking import chunk_policy
    rng = np.random.default_rng(3)
    shape, n = (96, 96, 60), 40
    bvals = np.array([0, 0] + [1000] * (n - 2), float)
    data = (800 * rng.random(shape)[..., None] + rng.normal(0, 30, shape + (n,)))
    path = tmp_path / "dwi.nii"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(path))
    np.savetxt(tmp_path / "dwi.bval", bvals[None], fmt="%g")
    # the limits are reported, not enforced: Dask's memory manager would
    # pause workers whose interpreter alone is near them
    env = _clean_env(DASK_DISTRIBUTED__WORKER__MEMORY__TARGET="False",
                     DASK_DISTRIBUTED__WORKER__MEMORY__SPILL="False",
                     DASK_DISTRIBUTED__WORKER__MEMORY__PAUSE="False",
                     DASK_DISTRIBUTED__WORKER__MEMORY__TERMINATE="False")
    seen = {}
    for limit in (256 << 20, 1 << 30):
        c = Cluster(tmp_path / f"c{limit}", env=env, worker_args=["--memory-limit", str(limit)])
        try:
            out, report = tmp_path / f"den{limit}.nii", tmp_path / f"r{limit}.json"
            assert main(["denoise", str(path), str(out), "--quiet", "--scheduler",
                         c.address, "--report-json", str(report)]) == 0
        finally:
            c.stop()
        plan = json.loads(report.read_text())["plan"]
        assert plan["memory_per_worker"] == limit and plan["threads_per_worker"] == 1
        # on a cluster the .nii is staged into a store: its volume-major
        # float32 blocks are counted as stored
        assert plan["input"] == "stage"
        assert tuple(plan["chunks"]) == chunk_policy(shape + (n,), 4, limit, 1)
        seen[limit] = tuple(plan["chunks"])
        local = tmp_path / f"local{limit}.nii"
        chunks = ",".join(map(str, plan["chunks"]))
        assert main(["denoise", str(path), str(local), "--quiet", "--chunks", chunks]) == 0
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj),
                                      np.asanyarray(nib.load(str(local)).dataobj))
    assert seen[256 << 20] != seen[1 << 30]
