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
    """A ``distributed.Client`` for the run, closed afterwards.

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
        Bytes for the whole local cluster.
    """
    from distributed import Client, LocalCluster

    address = scheduler_address(scheduler)
    if address:
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
    processes = n_workers > 1
    with LocalCluster(
        n_workers=n_workers, threads_per_worker=n_threads, processes=processes,
        memory_limit=(memory_limit // n_workers) if processes else memory_limit,
        dashboard_address=None, silence_logs=40,
        # worker processes talk over loopback only; threads need no network
        **({"host": "127.0.0.1"} if processes else {}),
    ) as cluster, Client(cluster) as client:
        yield client


def worker_threads(client) -> int:
    """Total threads of the cluster's workers."""
    info = client.scheduler_info(n_workers=-1) if _accepts_n_workers(client) else \
        client.scheduler_info()
    return max(1, sum(w.get("nthreads", 1) for w in info["workers"].values()))


def _accepts_n_workers(client) -> bool:
    import inspect
    return "n_workers" in inspect.signature(client.scheduler_info).parameters
