"""Executors: where the scheduler address comes from, one-line errors for
everything a user can get wrong, and the same results and per-worker budget
on threads, a LocalCluster and a real cluster (a ``dask scheduler`` and
``dask worker`` processes on 127.0.0.1, started and stopped here)."""

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import dask.array as da
import dask.system
import numpy as np
import pytest

from p2s_dask.errors import InputError
from p2s_dask.run.executors import (
    DistributedExecutor,
    ThreadsExecutor,
    active_client,
    current_executor,
    open_executor,
    resolve_scheduler,
    worker_budget,
)

MiB = 1 << 20
# variables that choose a scheduler: unset in every test unless it sets one
_CHOOSERS = ("P2S_DASK_SCHEDULER", "DASK_SCHEDULER_ADDRESS")


@pytest.fixture(autouse=True)
def no_scheduler_settings(monkeypatch):
    for var in _CHOOSERS:
        monkeypatch.delenv(var, raising=False)
    with dask.config.set({"scheduler-address": None}):
        yield


def _one_line(exc_info):
    text = str(exc_info.value)
    assert "\n" not in text and text.strip() == text
    return text


# -- a cluster of processes, in the style of test_cluster.py --------------------

def _worker_env():
    env = {k: v for k, v in os.environ.items()
           if k not in _CHOOSERS and not k.startswith("AWS_")}
    # the workers report their --memory-limit, but must not pause or restart
    # over it: their interpreter alone is a good part of 300 MiB
    for part in ("TARGET", "SPILL", "PAUSE", "TERMINATE"):
        env[f"DASK_DISTRIBUTED__WORKER__MEMORY__{part}"] = "False"
    return env


class Processes:
    """A ``dask scheduler`` and single-threaded ``dask worker`` processes,
    each in its own process group, stopped by :meth:`stop`."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.procs = []
        self.scheduler_file = self.folder / "scheduler.json"
        self._spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                     "--scheduler-file", str(self.scheduler_file),
                     # a safety net if these tests die without stopping it
                     "--idle-timeout", "300"], "scheduler.log")
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.address = json.loads(self.scheduler_file.read_text())["address"]
                break
            if time.monotonic() > deadline or self.procs[0].poll() is not None:
                self.stop()
                raise RuntimeError("the Dask scheduler did not start:\n" + self.logs())
            time.sleep(0.05)

    def _spawn(self, args, log_name):
        with open(self.folder / log_name, "wb") as log:
            self.procs.append(subprocess.Popen(
                [sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT,
                env=_worker_env(), start_new_session=True))

    def add_worker(self, memory_limit):
        i = len(self.procs)
        self._spawn(["distributed.cli.dask_worker", self.address, "--nthreads", "1",
                     "--memory-limit", memory_limit, "--host", "127.0.0.1",
                     "--no-dashboard", "--no-nanny", "--name", f"w{i}",
                     "--local-directory", str(self.folder / f"w{i}"),
                     "--death-timeout", "30"], f"worker{i}.log")

    def wait_for_workers(self, n):
        from distributed import Client
        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(n, timeout=60)
            return list(client.scheduler_info(n_workers=-1)["workers"])

    def logs(self):
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.folder.glob("*.log")))

    def stop(self):
        """SIGTERM, then SIGKILL: the workers, then the scheduler (a worker
        that loses its scheduler while it stops may linger)."""
        for group in (self.procs[1:], self.procs[:1]):
            for proc in group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            for proc in group:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A scheduler with two single-threaded workers of 300 and 600 MiB."""
    c = Processes(tmp_path_factory.mktemp("cluster"))
    try:
        c.add_worker("300MiB")
        c.add_worker("600MiB")
        c.worker_addresses = c.wait_for_workers(2)
        yield c
    finally:
        c.stop()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _array():
    x = da.arange(6 * 7 * 5, dtype="f8", chunks=40).reshape(6, 7, 5).rechunk((3, 4, 5))
    return (x * 2 + 1).sum(axis=1)


# -- where the scheduler comes from -------------------------------------------

def test_no_setting_is_a_local_run():
    assert resolve_scheduler() is None
    assert resolve_scheduler("", "") is None


def test_precedence(monkeypatch, tmp_path):
    sfile = tmp_path / "s.json"
    sfile.write_text(json.dumps({"address": "tcp://file:2"}))
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://daskenv:4")
    assert resolve_scheduler() == ("tcp://daskenv:4", "$DASK_SCHEDULER_ADDRESS")
    with dask.config.set({"scheduler-address": "tcp://config:5"}):
        # a setting made in code overrides the variable, as in Dask
        assert resolve_scheduler() == ("tcp://config:5",
                                       "the Dask config 'scheduler-address'")
        monkeypatch.setenv("P2S_DASK_SCHEDULER", "tcp://p2s:3")
        assert resolve_scheduler() == ("tcp://p2s:3", "$P2S_DASK_SCHEDULER")
        assert resolve_scheduler(scheduler_file=sfile) == ("tcp://file:2",
                                                           f"--scheduler-file {sfile}")
        assert resolve_scheduler(" tcp://flag:1 ", sfile) == ("tcp://flag:1", "--scheduler")


def test_dask_config_read_from_the_variable_is_named_so(monkeypatch):
    # what Dask does with DASK_SCHEDULER_ADDRESS when it is set before import
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://h:8786")
    with dask.config.set({"scheduler_address": "tcp://h:8786"}):
        assert resolve_scheduler() == ("tcp://h:8786", "$DASK_SCHEDULER_ADDRESS")


BAD_ADDRESSES = ["tcp//host", "foo:bar:baz", "tcp://host:notaport", "host",
                 "tcp://:8786", "tcp://host:70000", "http://host:80", "tcp://a b:1"]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
@pytest.mark.parametrize("source", ["--scheduler", "--scheduler-file", "$P2S_DASK_SCHEDULER",
                                    "$DASK_SCHEDULER_ADDRESS", "dask config"])
def test_malformed_address_is_one_line_naming_its_source(address, source, monkeypatch,
                                                         tmp_path):
    args, named = {}, source
    if source == "--scheduler":
        args = {"scheduler": address}
    elif source == "--scheduler-file":
        path = tmp_path / "s.json"
        path.write_text(json.dumps({"address": address}))
        args, named = {"scheduler_file": str(path)}, f"--scheduler-file {path}"
    elif source == "dask config":
        named = "the Dask config 'scheduler-address'"
    else:
        monkeypatch.setenv(source[1:], address)
    config = {"scheduler-address": address if source == "dask config" else None}
    with dask.config.set(config):
        with pytest.raises(InputError) as info:
            resolve_scheduler(**args)
        assert f"{address!r} (from {named})" in _one_line(info)
        # the same check guards open_executor, before any connection
        with pytest.raises(InputError, match="bad Dask scheduler address"):
            with open_executor(**args):
                pass


def test_scheduler_file_problems(tmp_path):
    missing = tmp_path / "none.json"
    with pytest.raises(InputError, match=rf"^--scheduler-file {missing}: no such file$"):
        resolve_scheduler(scheduler_file=missing)
    with pytest.raises(InputError, match=rf"^--scheduler-file {tmp_path}: cannot read it"):
        resolve_scheduler(scheduler_file=tmp_path)  # a folder
    bad = tmp_path / "bad.json"
    for text, why in [("{not json", "not JSON"), ('{"id": 1}', 'no "address"'),
                      ('["tcp://h:1"]', 'no "address"')]:
        bad.write_text(text)
        with pytest.raises(InputError) as info:
            resolve_scheduler(scheduler_file=bad)
        assert _one_line(info).startswith(f"--scheduler-file {bad} is not a Dask "
                                          f"scheduler file: {why}")


# -- counts and budget ----------------------------------------------------------

@pytest.mark.parametrize("flag", ["workers", "threads"])
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_counts_are_refused(flag, value):
    with pytest.raises(InputError, match=rf"^--{flag} must be a positive integer; "
                                         rf"got {value}$"):
        with open_executor(**{flag: value}):
            pass


def test_non_positive_memory_limit_is_refused():
    with pytest.raises(InputError, match="^memory_limit=0 is below the least workable budget"):
        with open_executor(memory_limit=0):
            pass


def test_threads_follow_dask_cpu_count(monkeypatch):
    # dask's count honours CPU affinity and cgroup quotas, os.cpu_count() does not
    monkeypatch.setattr(dask.system, "CPU_COUNT", 3)
    assert ThreadsExecutor().threads_per_worker == 3
    with open_executor(memory_limit=100 * MiB) as ex:
        assert isinstance(ex, ThreadsExecutor) and ex.is_local
        assert (ex.threads_per_worker, ex.n_workers, ex.memory_per_worker) == (3, 1, 100 * MiB)
    with open_executor(workers=1, threads=2) as ex:
        assert ex.threads_per_worker == 2


def test_worker_budget_fits_every_worker():
    assert worker_budget([], 7) == (7, 1)
    # no limit (0 or None): the run's budget
    assert worker_budget([{"memory_limit": 0, "nthreads": 2},
                          {"memory_limit": None, "nthreads": 2}], 800) == (800, 2)
    # alike workers: theirs
    assert worker_budget([{"memory_limit": 600, "nthreads": 4}] * 3, 1) == (600, 4)
    # the smallest worker's memory, with threads enough that its share per
    # thread is within the 1200/8 = 150 per thread of the bigger worker
    memory, threads = worker_budget([{"memory_limit": 300, "nthreads": 1},
                                     {"memory_limit": 1200, "nthreads": 8}], 1)
    assert (memory, threads) == (300, 2)


# -- running work ---------------------------------------------------------------

def test_threads_compute_run_and_progress_on_stderr(capsys):
    ex = ThreadsExecutor(2)
    np.testing.assert_array_equal(ex.compute(_array(), "stats", progress=True),
                                  _array().compute(scheduler="sync"))
    out, err = capsys.readouterr()
    # stderr is not a terminal here: one line for the stage, nothing on stdout
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("[stats] done")
    assert ex.run(os.getpid) == {"local": os.getpid()}
    # one machine: nothing to check, nothing run
    ex.run = lambda *a, **k: pytest.fail("files checked on a local run")
    ex.require_shared_files(["/proc/self/stat"])


def test_local_cluster(monkeypatch, capsys):
    monkeypatch.setattr(dask.system, "CPU_COUNT", 4)
    with open_executor(workers=2, memory_limit=512 * MiB) as ex:
        assert isinstance(ex, DistributedExecutor) and ex.is_local
        # the run's budget shared by the worker processes, the CPUs too
        assert (ex.n_workers, ex.memory_per_worker, ex.threads_per_worker) == \
            (2, 256 * MiB, 2)
        client = ex.client
        np.testing.assert_array_equal(ex.compute(_array(), "s", progress=True),
                                      _array().compute(scheduler="sync"))
        pids = ex.run(os.getpid)
        assert len(pids) == 2 and os.getpid() not in pids.values()
    assert client.status == "closed"
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("[s] done")


# -- a real cluster ---------------------------------------------------------------

def test_cluster_budget_is_the_smallest_workers(cluster):
    with open_executor(scheduler=cluster.address, memory_limit=4 << 30) as ex:
        assert not ex.is_local
        assert (ex.n_workers, ex.memory_per_worker, ex.threads_per_worker) == \
            (2, 300 * MiB, 1)
        local = ThreadsExecutor(2).compute([_array(), _array().max()])
        remote = ex.compute([_array(), _array().max()])
        np.testing.assert_array_equal(remote[0], local[0])
        assert remote[1] == local[1]
        assert sorted(ex.run(os.getpid)) == sorted(cluster.worker_addresses)
        with pytest.raises(InputError, match="Dask workers do not see /proc/self/stat"):
            ex.require_shared_files(["/proc/self/stat"], attempts=1)


def test_scheduler_from_file_and_variable(cluster, monkeypatch):
    with open_executor(scheduler_file=cluster.scheduler_file) as ex:
        assert ex.n_workers == 2
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.address)
    with open_executor() as ex:
        assert isinstance(ex, DistributedExecutor) and ex.n_workers == 2


def test_a_workers_address_is_not_a_scheduler(cluster):
    worker = cluster.worker_addresses[0]
    with pytest.raises(InputError) as info:
        with open_executor(scheduler=worker, connect_timeout=10):
            pass
    assert _one_line(info) == (f"cannot reach the Dask scheduler at {worker} (from "
                               "--scheduler): it is a Dask Worker, not a scheduler")


def test_single_worker_and_no_worker(tmp_path):
    c = Processes(tmp_path)
    try:
        with pytest.raises(InputError) as info:
            with open_executor(scheduler=c.address, worker_timeout=0.5):
                pass
        assert _one_line(info) == (f"the Dask scheduler at {c.address} (from --scheduler) "
                                   "has no workers (none joined within 0.5 s)")
        c.add_worker("600MiB")
        c.wait_for_workers(1)
        with open_executor(scheduler=c.address) as ex:
            assert (ex.n_workers, ex.memory_per_worker, ex.threads_per_worker) == \
                (1, 600 * MiB, 1)
    finally:
        c.stop()


def test_unreachable_scheduler(monkeypatch):
    address = f"tcp://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("P2S_DASK_SCHEDULER", address)
    with pytest.raises(InputError) as info:
        with open_executor(connect_timeout=1):
            pass
    assert _one_line(info).startswith(f"cannot reach the Dask scheduler at {address} "
                                      "(from $P2S_DASK_SCHEDULER): connection refused")


def test_a_port_that_never_answers(monkeypatch):
    """Something that accepts the connection and says nothing (a dashboard
    port instead of the scheduler's): distributed alone would wait for ever."""
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    server.timeout = 5
    monkeypatch.setattr(server.RequestHandlerClass, "log_message", lambda *a: None)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    address = f"tcp://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(InputError) as info:
            with open_executor(scheduler=address, connect_timeout=1):
                pass
    finally:
        thread.join()
        server.server_close()
    assert _one_line(info) == (f"cannot reach the Dask scheduler at {address} "
                               "(from --scheduler): no answer within 1 s")


# -- one place finds the user's Client; the API's executors --------------------

PACKAGE = Path(__file__).resolve().parents[1] / "p2s_dask"
# calls that find a current or default distributed Client (Client.current()
# is a method: only called as an attribute)
_CLIENT_FINDERS = {"get_scheduler", "get_client", "default_client"}


def _asks_for_a_client(node) -> bool:
    import ast

    if not isinstance(node, ast.Call):
        return False
    if isinstance(node.func, ast.Name):
        return node.func.id in _CLIENT_FINDERS
    return isinstance(node.func, ast.Attribute) and \
        node.func.attr in _CLIENT_FINDERS | {"current"}


def test_one_function_finds_the_active_client():
    """Only executors.active_client asks Dask or distributed for a Client;
    the API and file runs both go through it."""
    import ast

    askers = set()
    for path in PACKAGE.rglob("*.py"):
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) and \
                    any(_asks_for_a_client(node) for node in ast.walk(func)):
                askers.add((path.relative_to(PACKAGE).as_posix(), func.name))
    assert askers == {("run/executors.py", "active_client")}


@pytest.fixture(scope="module")
def threads_cluster():
    """A Client of an in-process LocalCluster (two one-thread workers)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address=None, silence_logs=40) as cluster:
        yield cluster


def test_current_executor_is_where_dask_compute_runs(threads_cluster):
    import distributed

    assert active_client() is None
    ex = current_executor()
    assert isinstance(ex, ThreadsExecutor) and ex.scheduler == "threads" and ex.in_process
    with dask.config.set(scheduler="sync", num_workers=3):
        ex = current_executor()
        assert (ex.scheduler, ex.threads_per_worker, ex.in_process) == ("sync", 3, True)
        np.testing.assert_array_equal(ex.compute(_array()), _array().compute(scheduler="sync"))
    with distributed.Client(threads_cluster) as client:
        assert active_client() is client
        ex = current_executor()
        assert isinstance(ex, DistributedExecutor) and ex.client is client
        # a LocalCluster's workers see this machine's files
        assert ex.is_local and ex.n_workers == 2
        # a local scheduler named in the config wins, as in dask.compute
        with dask.config.set(scheduler="threads"):
            assert active_client() is None
            assert isinstance(current_executor(), ThreadsExecutor)
        # a file run without a scheduler or --workers uses it too, and leaves it open
        with open_executor() as ex:
            assert isinstance(ex, DistributedExecutor) and ex.client is client
        assert client.status == "running"
        with open_executor(workers=1) as ex:
            assert isinstance(ex, ThreadsExecutor)
    assert active_client() is None


def _slow(i):
    time.sleep(0.2)
    return np.full(3, i)


@pytest.mark.parametrize("kind", ["threads", "distributed"])
def test_stream_places_each_result_as_its_task_ends(kind, threads_cluster):
    """Every result reaches ``place`` once, in this process, before the last
    task has ended (so a pass need not hold all its results)."""
    import distributed

    tasks = [dask.delayed(_slow, pure=False)(i) for i in range(6)]
    placed = []

    def place(i, result):
        placed.append((i, time.monotonic()))
        np.testing.assert_array_equal(result, np.full(3, i))

    with contextlib.ExitStack() as stack:
        if kind == "threads":
            ex = ThreadsExecutor(1)
        else:
            ex = DistributedExecutor(stack.enter_context(distributed.Client(threads_cluster)))
        ex.stream(tasks, place)
    assert sorted(i for i, _ in placed) == list(range(6))
    # six 0.2 s tasks on at most two threads: the first result was placed at
    # least 0.4 s before the last
    first, last = min(t for _, t in placed), max(t for _, t in placed)
    assert last - first >= 0.35


@pytest.mark.parametrize("order", ["C", "F"])
def test_blocks_of_an_array_in_its_layout(order, threads_cluster):
    """Blocks (and finer pieces of them) hold the data's values, each a
    contiguous array in the layout asked for; a cluster's copies go at exit."""
    import distributed

    data = np.asarray(np.arange(6 * 5 * 4 * 3, dtype="f4").reshape(6, 5, 4, 3), order=order)
    chunks = ((3, 3), (5,), (2, 2), (3,))
    finer = ((1, 2, 3), (5,), (2, 1, 1), (3,))

    def layout(block):
        ok = block.flags.f_contiguous if order == "F" else block.flags.c_contiguous
        return np.full((1, 1, 1, 1), ok)

    def check(ex):
        with ex.blocks_of(data, chunks, order) as blocks:
            for grid in (chunks, finer):
                arr = blocks.array(grid)
                assert arr.chunks == grid
                np.testing.assert_array_equal(ex.compute(arr), data)
                flags = arr.map_blocks(layout, chunks=(1, 1, 1, 1), dtype=bool)
                assert ex.compute(flags).all()

    check(ThreadsExecutor(2))
    with distributed.Client(threads_cluster) as client:
        check(DistributedExecutor(client))
        deadline = time.monotonic() + 10
        while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0


def _misaligned(array, order):
    """A copy of ``array`` in ``order`` whose values start 3 bytes off their
    alignment, as an array can arrive in a network buffer."""
    raw = np.empty(array.nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64 + 3
    out = raw[start:start + array.nbytes].view(array.dtype).reshape(array.shape, order=order)
    out[...] = array
    return out


@pytest.mark.parametrize("order", ["C", "F"])
def test_blocks_are_realigned_in_their_layout(order):
    from p2s_dask.graph.engine import aligned
    from p2s_dask.run.executors import contiguous

    values = np.arange(4 * 5 * 6 * 3, dtype="f8").reshape(4, 5, 6, 3)
    block = _misaligned(values, order)
    assert not block.flags.aligned
    for fixed in (contiguous(block, order), aligned(block)):
        assert fixed.flags.aligned and fixed.flags[f"{order}_CONTIGUOUS"]
        np.testing.assert_array_equal(fixed, values)
    # an aligned block is not copied
    ok = np.asarray(values, order=order)
    assert contiguous(ok, order) is ok and aligned(ok) is ok
