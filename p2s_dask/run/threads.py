"""BLAS threads: one per task wherever tasks run, the plan's count for the solve.

The thread count of a BLAS call can change the order of its float sums, so
every task must run on one BLAS thread on every executor, or a cluster's
answer differs from a local one in the last bits. Who may set the count:

- OpenBLAS built with pthreads (NumPy's and SciPy's wheels) has one count
  for the whole process, and since threadpoolctl 3.8 only one Python thread
  at a time may change it: the first to set it controls it until its last
  ``with`` block ends, and the others' settings are silently ignored. A task
  that set the count outside a ``with`` block (as this module once did, to
  save threadpoolctl's library scan per task) kept that control for the life
  of its pool thread; later the caller's settings were ignored and tasks ran
  on two threads (issue 17). So the process's count is set only by the thread
  that runs the work: :func:`single_threaded_blas` around an executor's
  computation, :func:`solving_blas` around a solve, and
  :func:`pin_one_blas_thread` once in a cluster's worker process.
- MKL and OpenMP-threaded BLAS keep a count per thread: :func:`task_blas`
  sets the task's own thread, and the process's count only in a process
  nobody prepared (then it runs one task at a time, e.g. a worker of Dask's
  multiprocessing scheduler).

threadpoolctl does the setting; what it lacks is this division of roles.
"""

from __future__ import annotations

import contextlib
import threading

from threadpoolctl import ThreadpoolController, threadpool_limits

_found = threading.Lock()
_blas = None  # the BLAS libraries, found once per process (a scan costs ms)


def _blas_controller() -> ThreadpoolController:
    global _blas
    with _found:
        if _blas is None:
            _blas = ThreadpoolController().select(user_api="blas")
        return _blas


def _claim_process_count() -> None:
    """Let this thread set OpenBLAS's process-wide count even if another
    thread took control and never gave it back (threadpoolctl >= 3.8; older
    versions let any thread set it)."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:  # pragma: no cover - a threadpoolctl without it
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@contextlib.contextmanager
def single_threaded_blas():
    """One BLAS thread for the whole process while this thread runs tasks.

    Dask's threaded scheduler already runs a task per core; a multithreaded
    BLAS inside each task oversubscribes the cores (measured: 1.3x slower on
    2 cores) and sums in another order than a cluster's workers. Entered by
    the thread that starts the computation, which then controls the count.
    """
    with solving_blas(1):
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
    _claim_process_count()
    with threadpool_limits(limits=max(1, int(threads)), user_api="blas"):
        yield


@contextlib.contextmanager
def task_blas():
    """One BLAS thread for a task, in any thread of any process.

    Where the process is held at one thread already (by the executor's
    :func:`single_threaded_blas` or a worker's :func:`pin_one_blas_thread`)
    this changes nothing process-wide: concurrent tasks that each set and
    restored the process's count would restore it under each other. The
    check costs microseconds (one call into each library).
    """
    blas = _blas_controller()
    if all(lib.num_threads == 1 for lib in blas.lib_controllers):
        yield
        return
    with blas.limit(limits=1):
        yield


def pin_one_blas_thread() -> None:
    """Hold this process's BLAS at one thread for its life: a cluster's
    worker process, whose tasks run on its own threads. Called from the
    worker's event-loop thread, which then keeps control of the count."""
    _claim_process_count()
    _blas_controller().limit(limits=1)
