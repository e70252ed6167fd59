"""Where the Dask work runs: a local cluster within a memory budget, or the
user's cluster."""

from __future__ import annotations

import contextlib
import os

from .errors import InputError

SCHEDULER_ENV = "P2S_DASK_SCHEDULER"


def scheduler_address(explicit: str | None) -> str | None:
    """The scheduler to use: ``--scheduler``, else ``$P2S_DASK_SCHEDULER``."""
    return explicit or os.environ.get(SCHEDULER_ENV) or None


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, *, workers: int | None = None,
                threads: int | None = None, memory_limit: int = 2 << 30):
    """A ``distributed.Client`` for the run (:class:`LocalThreads` for a
    one-worker local run), closed afterwards.

    Parameters
    ----------
    scheduler : str, optional
        Address of an existing scheduler (``tcp://host:port``); its workers
        must reach the same stores as this machine (object stores or a
        shared file system).
    workers, threads : int, optional
        For the local cluster. One worker (default) runs its threads in this
        process, so the whole budget is one address space and no data is
        copied between processes; more workers are separate processes that
        share the budget.
    memory_limit : int
        The run's budget. p2s-dask keeps it through its chunk sizes; Dask's
        own per-worker limit is switched off (see below).
    """
    address = scheduler_address(scheduler)
    if address:
        from distributed import Client
        try:
            client = Client(address, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {address}: "
                             f"{type(exc).__name__}") from None
        try:
            yield client
        finally:
            client.close()
        return
    n_workers = max(1, int(workers or 1))
    n_threads = max(1, int(threads or os.cpu_count() or 1))
    if workers is None and threads is None:
        n_threads = os.cpu_count() or 1
    elif workers is not None and threads is None:
        n_threads = max(1, (os.cpu_count() or 1) // n_workers)
    if n_workers == 1:
        yield LocalThreads(n_threads)
        return
    from distributed import Client, LocalCluster
    with LocalCluster(
        n_workers=n_workers, threads_per_worker=n_threads, processes=True,
        # The budget is kept by the chunk sizes p2s-dask chooses. Dask's own
        # memory manager measures the whole process (interpreter and libraries
        # included) and pauses a worker that is over: with a small budget that
        # would wait forever, so it is off.
        memory_limit=0,
        dashboard_address=None, silence_logs=40,
        # no dashboard, but the scheduler still serves health checks over
        # HTTP, by default on 0.0.0.0:8787 with a warning when that port is
        # taken (e.g. by a docker-compose scheduler): a free loopback port
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        # worker processes talk over loopback only
        host="127.0.0.1",
    ) as cluster, Client(cluster) as client:
        yield client


class LocalThreads:
    """The default local run: Dask's threaded scheduler in this process.

    One worker's threads in one address space is what a local
    ``distributed`` cluster with one worker would be, without its
    per-task bookkeeping, which costs a quarter of the run time here.
    It answers the few ``Client`` calls the pipeline makes.
    """

    def __init__(self, n_threads: int):
        self.n_threads = int(n_threads)

    def compute(self, collection, desc: str = "", progress: bool = False):
        import dask
        from dask.diagnostics import ProgressBar
        bar = ProgressBar(width=40) if progress else contextlib.nullcontext()
        if progress:
            print(f"[{desc}]", flush=True)
        with bar:
            (result,) = dask.compute(collection, scheduler="threads",
                                     num_workers=self.n_threads)
        return result

    def run(self, fn, *args, **kwargs) -> dict:
        return {"local": fn(*args, **kwargs)}


def worker_threads(client) -> int:
    """Total threads of the cluster's workers."""
    if isinstance(client, LocalThreads):
        return client.n_threads
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else \
        client.scheduler_info()
    return max(1, sum(w.get("nthreads", 1) for w in info["workers"].values()))


def _accepts_n_workers(client) -> bool:
    import inspect
    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def _digests(paths) -> list:
    """SHA-1 of each file's bytes, None where it cannot be read (on a worker)."""
    import hashlib

    out = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                out.append(hashlib.sha1(fh.read()).hexdigest())
        except OSError:
            out.append(None)
    return out


def require_shared_files(client, paths, attempts: int = 3) -> None:
    """Refuse a run whose workers do not see these local files as we do.

    A scheduler of the user's may have workers on other machines, where a
    local path names another file or none: Zarr reads a missing chunk as
    zeros, so such a run would compute garbage, then fail late with a
    misleading error. Comparing the content of a few small files the run
    has just written (or will read) catches it before any work.

    Parameters
    ----------
    client : distributed.Client
    paths : sequence of str
        Absolute local paths of small files.
    attempts : int, optional
        Network file systems may show a new file to other machines a moment
        later: ask again, half a second apart, before giving up.

    Raises
    ------
    InputError
        Naming the first file and how many workers do not see it.
    """
    import time

    paths = list(paths)
    expected = _digests(paths)
    for attempt in range(attempts):
        seen = client.run(_digests, paths)
        blind = {w: got for w, got in seen.items() if got != expected}
        if not blind:
            return
        if attempt + 1 < attempts:
            time.sleep(0.5)
    first = next(p for i, p in enumerate(paths)
                 if any(got[i] != expected[i] for got in blind.values()))
    raise InputError(
        f"{len(blind)} of {len(seen)} Dask workers do not see {first} as this machine "
        "does: with --scheduler, use object-store URLs (s3://, gs://) for IN and OUT, or "
        "paths on a file system the workers share at the same path (and --tmp-dir there "
        "for the work store)")
