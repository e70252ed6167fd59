"""The names pipeline.py and the tests used before :mod:`p2s_dask.executors`:
thin wrappers over it, kept until every caller uses ``open_executor``."""

from __future__ import annotations

import contextlib

from .executors import (  # noqa: F401  (re-exported)
    DASK_SCHEDULER_ENV,
    SCHEDULER_ENV,
    DistributedExecutor,
    Executor,
    ThreadsExecutor,
    open_executor,
    require_shared_files,
    resolve_scheduler,
)

# the one-worker local run; LocalThreads(n_threads) still builds one
LocalThreads = ThreadsExecutor


def scheduler_address(explicit: str | None, scheduler_file=None) -> str | None:
    """The scheduler's address (see :func:`resolve_scheduler`), None for a
    local run."""
    found = resolve_scheduler(explicit, scheduler_file)
    return None if found is None else found[0]


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, *, workers: int | None = None,
                threads: int | None = None, memory_limit: int = 2 << 30, **kwargs):
    """:func:`open_executor`, yielding what the pipeline used to get: the
    ``distributed.Client`` of a cluster, or the :class:`ThreadsExecutor`.

    Parameters
    ----------
    scheduler : str, optional
    workers, threads : int, optional
    memory_limit : int
    **kwargs
        ``scheduler_file``, ``connect_timeout``... of :func:`open_executor`.
    """
    with open_executor(scheduler=scheduler, workers=workers, threads=threads,
                       memory_limit=memory_limit, **kwargs) as executor:
        yield executor.client if isinstance(executor, DistributedExecutor) else executor


def worker_threads(client) -> int:
    """Total threads of the workers (of an Executor, or a Client's cluster)."""
    if isinstance(client, Executor):
        return client.total_threads
    return DistributedExecutor(client).total_threads
