"""Keep BLAS to one thread while Dask runs one task per core."""

from __future__ import annotations

import contextlib
import threading

from threadpoolctl import ThreadpoolController, threadpool_limits


@contextlib.contextmanager
def single_threaded_blas():
    """One BLAS thread per Dask worker thread.

    Dask's threaded scheduler already runs a task per core; a multithreaded
    BLAS inside each task oversubscribes the cores (measured: 1.3x slower on
    2 cores). Distributed workers set this through their environment.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield


@contextlib.contextmanager
def solving_blas(threads: int):
    """BLAS on ``threads`` threads while this process solves alone.

    The solve and the cross-validation run between passes, when no task
    runs: one BLAS thread there leaves the other cores idle (measured at
    F = 4000: 1.35 s on one thread, 0.86 s on two). The count must not
    depend on the executor (OpenBLAS splits a factorisation by its
    threads): the caller gives the plan's.
    """
    with threadpool_limits(limits=max(1, int(threads)), user_api="blas"):
        yield


class OneBlasThread:
    """Single-threaded BLAS while any task of this process holds it.

    Counted, so concurrent tasks share one limit and the original setting
    comes back when the last one ends (a plain ``threadpool_limits`` per task
    would restore the old count while another task is still computing). The
    controller is found once per process: each use then costs microseconds.
    """

    _lock = threading.Lock()
    _users = 0
    _limiter = None
    _controller = None

    def __enter__(self):
        cls = type(self)
        with cls._lock:
            if cls._users == 0:
                if cls._controller is None:
                    cls._controller = ThreadpoolController()
                cls._limiter = cls._controller.limit(limits=1, user_api="blas")
            cls._users += 1
        return self

    def __exit__(self, *exc):
        cls = type(self)
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                cls._limiter.restore_original_limits()
                cls._limiter = None
        return False
