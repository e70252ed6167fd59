"""Where the Dask work of a run happens: Dask's threaded scheduler in this
process, a ``LocalCluster`` of worker processes started for the run, or the
user's ``distributed`` cluster.

Every executor answers the same few calls (:meth:`Executor.compute`,
:meth:`Executor.stream`, :meth:`Executor.blocks_of`, :meth:`Executor.run`,
:meth:`Executor.require_shared_files`) and says how much memory and how many
threads one worker has, so that the plan chooses chunks that fit every worker.
File runs and the in-memory API run on the same executors:
:func:`open_executor` picks one for a file run from the options and the
environment and closes whatever it opened; :func:`current_executor` is the
scheduler ``dask.compute`` would use now, for the API. Both find a user's
``distributed.Client`` with :func:`active_client`, the one place that looks.
Everything a user can get wrong (an address, a scheduler file, a count, a
scheduler that does not answer) ends in an :class:`~p2s_dask.errors.InputError`
with one line naming the flag or variable it came from.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import threading
import time
import uuid

from ..config.budget import DEFAULT_MEMORY_LIMIT  # the one default of every front
from ..errors import InputError
from .threads import pin_one_blas_thread, single_threaded_blas

SCHEDULER_ENV = "P2S_DASK_SCHEDULER"
DASK_SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"

# the protocols of distributed's comm registry that take HOST:PORT
_HOST_PORT_PROTOCOLS = ("tcp", "tls", "ws", "wss", "ucx")
# a host name or IPv4 address, or an IPv6 address in brackets
_HOST = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.%A-Za-z]+\]")
# Dask's local schedulers whose tasks run in this process's threads
_IN_PROCESS_SCHEDULERS = ("threads", "threading", "sync", "synchronous", "single-threaded")


def _cpu_count() -> int:
    # read at call time (not imported by name): CPU affinity (taskset, SLURM
    # cpusets) and cgroup quotas are what Dask counts, and tests patch it
    import dask.system
    return max(1, int(dask.system.CPU_COUNT))


# -- where the scheduler is ---------------------------------------------------

def check_address(address, source: str) -> str:
    """The address, stripped, if it has the form of a Dask scheduler address.

    Parameters
    ----------
    address : str
        ``[PROTOCOL://]HOST:PORT`` (``tcp`` when no protocol is given), or an
        ``inproc://`` address of this process.
    source : str
        Where it came from (``--scheduler``, ``$P2S_DASK_SCHEDULER``...), for
        the message.

    Raises
    ------
    InputError
        One line naming the address, its source and what is wrong.
    """
    text = str(address).strip()
    why = _address_problem(text)
    if why:
        raise InputError(f"bad Dask scheduler address {str(address)!r} (from {source}): "
                         f"{why}; expected tcp://HOST:PORT")
    return text


def _address_problem(text: str) -> str | None:
    """What is wrong with an address, or None."""
    if not text or any(c.isspace() for c in text):
        return "empty or contains spaces"
    protocol, sep, location = text.partition("://")
    if not sep:
        protocol, location = "tcp", text
        if "/" in text:
            return "a '/' without '://' before it"
    if protocol == "inproc":
        return None if location else "no location after inproc://"
    if protocol not in _HOST_PORT_PROTOCOLS:
        return f"unknown protocol {protocol!r} (known: {', '.join(_HOST_PORT_PROTOCOLS)})"
    host, colon, port = location.rpartition(":")
    if not colon:
        return "no port"
    if not _HOST.fullmatch(host):
        return (f"{host!r} is not a host name or IP address (an IPv6 address goes in "
                "brackets: [::1])")
    if not (port.isdigit() and 0 < int(port) < 65536):
        return f"port {port!r} is not a number from 1 to 65535"
    return None


def _read_scheduler_file(path) -> tuple[str, str]:
    """The address in a scheduler file (distributed's JSON) and its source."""
    source = f"--scheduler-file {os.fspath(path)}"
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise InputError(f"{source}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InputError(f"{source}: cannot read it ({reason})") from None
    try:
        info = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{source} is not a Dask scheduler file: not JSON ({exc})") from None
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, str) or not address.strip():
        raise InputError(f'{source} is not a Dask scheduler file: no "address" in it')
    return check_address(address, source), source


def _from_dask_config() -> tuple[str, str] | None:
    """Dask's ``scheduler-address`` (which ``$DASK_SCHEDULER_ADDRESS`` sets)."""
    import dask

    value = dask.config.get("scheduler-address", None)
    env = os.environ.get(DASK_SCHEDULER_ENV, "").strip()
    if value is not None and str(value).strip():
        # Dask reads its variables once, at import: name the variable when
        # the setting is what it holds, the config otherwise
        source = (f"${DASK_SCHEDULER_ENV}" if env == str(value).strip()
                  else "the Dask config 'scheduler-address'")
        return check_address(value, source), source
    if env:  # set after Dask was imported: Dask's Client would not see it, we do
        return check_address(env, f"${DASK_SCHEDULER_ENV}"), f"${DASK_SCHEDULER_ENV}"
    return None


def resolve_scheduler(scheduler=None, scheduler_file=None) -> tuple[str, str] | None:
    """The Dask scheduler a run uses, and where that choice came from.

    First of: ``scheduler`` (``--scheduler``), ``scheduler_file``
    (``--scheduler-file``), ``$P2S_DASK_SCHEDULER``, Dask's config
    ``scheduler-address`` (set by ``$DASK_SCHEDULER_ADDRESS``). Empty values
    count as unset. The address's form is checked; nothing is contacted.

    Parameters
    ----------
    scheduler : str, optional
        ``tcp://HOST:PORT``.
    scheduler_file : str or path-like, optional
        A JSON file with an ``"address"``, as ``dask scheduler
        --scheduler-file`` writes.

    Returns
    -------
    tuple of (str, str) or None
        ``(address, source)``, source being e.g. ``"--scheduler"``; None for a
        run on this machine.

    Raises
    ------
    InputError
        A malformed address, or a scheduler file that is missing, unreadable
        or not one: one line naming the source.
    """
    if scheduler is not None and str(scheduler).strip():
        return check_address(scheduler, "--scheduler"), "--scheduler"
    if scheduler_file is not None and str(scheduler_file).strip():
        return _read_scheduler_file(scheduler_file)
    env = os.environ.get(SCHEDULER_ENV, "").strip()
    if env:
        return check_address(env, f"${SCHEDULER_ENV}"), f"${SCHEDULER_ENV}"
    return _from_dask_config()


# -- the executors ------------------------------------------------------------

class Executor:
    """What runs a run's Dask work; see :func:`open_executor`.

    Attributes
    ----------
    is_local : bool
        The work runs on this machine (threads here, or a ``LocalCluster``,
        this run's or the user's), so local files are seen as here.
    memory_per_worker : int
        Bytes one worker may use: the smallest over the workers.
    threads_per_worker : int
        Threads sharing ``memory_per_worker``: chunks sized for
        ``memory_per_worker / threads_per_worker`` per thread fit every worker.
    n_workers : int
    in_process : bool
        Tasks run in this process's threads, so they may fill arrays this
        process holds (an in-memory input or output).
    """

    is_local: bool = True
    in_process: bool = False
    memory_per_worker: int = DEFAULT_MEMORY_LIMIT
    threads_per_worker: int = 1
    n_workers: int = 1

    @property
    def total_threads(self) -> int:
        """Threads of all workers together (how many tasks run at once)."""
        return self.n_workers * self.threads_per_worker

    def compute(self, collection, desc: str = "", progress: bool = False,
                threads: int | None = None):
        """The value of a Dask collection, as ``dask.compute(collection)[0]``.

        ``threads`` caps the threads of a local run (e.g. the lanes of patch
        statistics: a thread without a lane would only read blocks ahead and
        hold them); a cluster's workers keep their own.
        """
        raise NotImplementedError

    def stream(self, tasks, place) -> None:
        """Compute ``tasks`` (a list of Delayed) and call ``place(i, result)``
        in this process as each task ends, in any order, once per task.

        ``place`` keeps what it needs and may drop the rest (e.g. writes the
        values into an array of this process and clears them): results are
        not held until the last task ends, so a pass over many pieces holds a
        few at a time.
        """
        raise NotImplementedError

    def blocks_of(self, data, chunks, order: str = "C"):
        """A context of the blocks of the NumPy array ``data`` for tasks.

        Returns a context manager that yields a :class:`LocalBlocks` or
        :class:`ScatteredBlocks` cut by ``chunks`` (4 tuples), each block a
        contiguous array in ``order``, and releases what it holds on exit.
        """
        raise NotImplementedError

    def run(self, fn, *args, **kwargs) -> dict:
        """``fn(*args, **kwargs)`` on every worker, results by worker."""
        raise NotImplementedError

    def require_shared_files(self, paths, attempts: int = 3) -> None:
        """Refuse a run whose workers do not see these local files as we do;
        nothing to check when the work runs on this machine. See
        :func:`require_shared_files`."""
        if not self.is_local:
            require_shared_files(self, paths, attempts)


class ThreadsExecutor(Executor):
    """Dask's threaded scheduler in this process: the default local run.

    One worker's threads in one address space is what a local
    ``distributed`` cluster with one worker would be, without its per-task
    bookkeeping, which costs a quarter of the run time here.

    Parameters
    ----------
    threads : int, optional
        Default: the CPUs this process may use (``dask.system.CPU_COUNT``).
    memory_limit : int
        The run's budget, all of it for this one worker.
    scheduler : str or callable, optional
        The local scheduler: Dask's threads by default; the in-memory API
        passes the one ``dask.config`` names (see :func:`current_executor`).
    """

    def __init__(self, threads: int | None = None, memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 scheduler="threads"):
        threads = _check_count(threads, "--threads")
        self.threads_per_worker = threads or _cpu_count()
        self.memory_per_worker = _check_memory(memory_limit)
        self.n_workers = 1
        self.is_local = True
        self.scheduler = scheduler
        self.in_process = scheduler in _IN_PROCESS_SCHEDULERS

    # its tasks run in this process's threads, which hold one BLAS thread
    # for them (see .threads)
    @single_threaded_blas()
    def compute(self, collection, desc: str = "", progress: bool = False,
                threads: int | None = None):
        """The value of a Dask collection, computed by this process's threads.

        Parameters
        ----------
        collection : dask collection (or list of them)
        desc : str
            The stage's name, for the progress output.
        progress : bool
            A bar on stderr when it is a terminal, else one line per stage.
        threads : int, optional
            Fewer threads than the worker's (see :meth:`Executor.compute`).
        """
        import dask
        from dask.diagnostics import ProgressBar

        with _stage(desc, progress) as tty:
            bar = ProgressBar(width=40, out=sys.stderr) if tty else contextlib.nullcontext()
            with bar:
                (result,) = dask.compute(collection, **self._kwargs(threads))
        return result

    def _kwargs(self, threads=None) -> dict:
        """``dask.compute``'s scheduler and, for a named one, its threads."""
        kwargs = {"scheduler": self.scheduler}
        # Dask's named schedulers take a thread count (the synchronous one
        # drops it); a callable or pool of the user's has its own
        if isinstance(self.scheduler, str):
            kwargs["num_workers"] = min(self.threads_per_worker,
                                        threads or self.threads_per_worker)
        return kwargs

    # as compute()
    @single_threaded_blas()
    def stream(self, tasks, place) -> None:
        """Compute ``tasks`` and ``place(i, result)`` each as it ends.

        Dask's local schedulers keep every requested result until the end: a
        callback hands each result to ``place`` as its task finishes (in
        this process), so ``place`` can drop its values at once. A scheduler
        that runs no callbacks gets its results placed at the end.
        """
        import dask
        from dask.callbacks import Callback

        order = {t.key: i for i, t in enumerate(tasks)}
        placed = set()

        def posttask(key, result, dsk, state, worker_id):
            i = order.get(key)
            if i is not None and i not in placed:
                placed.add(i)
                place(i, result)

        with Callback(posttask=posttask):
            results = dask.compute(*tasks, **self._kwargs())
        for i, result in enumerate(results):
            if i not in placed:
                placed.add(i)
                place(i, result)

    @contextlib.contextmanager
    def blocks_of(self, data, chunks, order: str = "C"):
        """:class:`LocalBlocks` of ``data``: tasks cut their block from it."""
        yield LocalBlocks(data, order)

    def run(self, fn, *args, **kwargs) -> dict:
        """``fn(*args, **kwargs)`` once, here: ``{"local": result}``."""
        return {"local": fn(*args, **kwargs)}


class DistributedExecutor(Executor):
    """A ``distributed.Client``'s cluster: the user's, or a LocalCluster.

    The workers' budget is read once, here: the smallest worker's
    ``memory_limit`` (one without a limit counts as ``memory_limit``) and
    enough threads that ``memory_per_worker / threads_per_worker`` is at most
    every worker's memory per thread (the smallest worker's thread count when
    the workers are alike).

    Parameters
    ----------
    client : distributed.Client
        Not closed here: whoever opened it closes it.
    memory_limit : int
        Budget of a worker that reports no memory limit (0 or None).
    is_local : bool
        True for a LocalCluster this run started.
    """

    def __init__(self, client, *, memory_limit: int = DEFAULT_MEMORY_LIMIT,
                 is_local: bool = False):
        self.client = client
        self.is_local = bool(is_local)
        workers = _scheduler_info(client)["workers"]
        self.n_workers = len(workers)
        self.memory_per_worker, self.threads_per_worker = worker_budget(
            workers.values(), _check_memory(memory_limit))
        _pin_workers_blas(client)

    @property
    def total_threads(self) -> int:
        """Threads of the workers now connected, all together."""
        workers = _scheduler_info(self.client)["workers"].values()
        return max(1, sum(int(w.get("nthreads") or 1) for w in workers))

    # workers in this process (a cluster of threads) run on its BLAS
    # count; worker processes hold their own (_pin_workers_blas)
    @single_threaded_blas()
    def compute(self, collection, desc: str = "", progress: bool = False,
                threads: int | None = None):
        """The value of a Dask collection, computed on the cluster.

        Parameters
        ----------
        collection : dask collection (or list of them)
        desc : str
            The stage's name, for the progress output.
        progress : bool
            A bar on stderr when it is a terminal, else one line per stage.
        """
        from distributed import futures_of

        futures = self.client.compute(collection)
        try:
            with _stage(desc, progress) as tty:
                if tty:
                    _draw_progress(futures_of(futures))
                result = self.client.gather(futures)
            # Client.compute answers a tuple with a list, dask.compute with a tuple
            return tuple(result) if isinstance(collection, tuple) else result
        except BaseException:
            # Ctrl-C or a failed task: the cluster stops working for us now,
            # not when the futures are garbage collected
            with contextlib.suppress(Exception):
                self.client.cancel(futures)
            raise

    # as compute()
    @single_threaded_blas()
    def stream(self, tasks, place) -> None:
        """Compute ``tasks`` on the cluster and ``place(i, result)`` each as
        it completes, releasing it on the cluster then."""
        from distributed import as_completed

        futures = self.client.compute(list(tasks))
        order = {f.key: i for i, f in enumerate(futures)}
        try:
            for future in as_completed(futures):
                place(order[future.key], future.result())
                future.release()
        except BaseException:
            # as compute(): the cluster stops working for us now
            with contextlib.suppress(Exception):
                self.client.cancel(futures)
            raise

    @contextlib.contextmanager
    def blocks_of(self, data, chunks, order: str = "C"):
        """:class:`ScatteredBlocks` of ``data``, released from the cluster
        on exit."""
        blocks = ScatteredBlocks(self.client, data, chunks, order)
        try:
            yield blocks
        finally:
            blocks.release()

    def run(self, fn, *args, **kwargs) -> dict:
        """``fn(*args, **kwargs)`` on every worker, results by worker address."""
        return self.client.run(fn, *args, **kwargs)


def _pin_workers_blas(client) -> None:
    """Every worker process of the cluster, now and joining later, on one
    BLAS thread for its life (see :mod:`.threads`); workers in this process
    run under :meth:`DistributedExecutor.compute`'s
    :func:`~.threads.single_threaded_blas` instead, which leaves the solve
    here its own count."""
    from distributed.diagnostics.plugin import WorkerPlugin

    class OneBlasThreadPerWorker(WorkerPlugin):
        name = "p2s-dask-one-blas-thread"

        def __init__(self, client_pid):
            self.client_pid = client_pid

        def setup(self, worker):
            if os.getpid() != self.client_pid:
                pin_one_blas_thread()

    client.register_plugin(OneBlasThreadPerWorker(os.getpid()))


def worker_budget(workers, memory_limit: int) -> tuple[int, int]:
    """``(memory, threads)`` of one worker such that chunks fit every worker.

    Parameters
    ----------
    workers : iterable of dict
        Values of ``scheduler_info()["workers"]`` (``memory_limit``,
        ``nthreads``).
    memory_limit : int
        Budget of a worker without a limit (``memory_limit`` 0 or None).

    Returns
    -------
    tuple of int
        The smallest worker budget, and the fewest threads that keep its
        share per thread within every worker's own.
    """
    budgets = [(int(w.get("memory_limit") or 0) or memory_limit,
                max(1, int(w.get("nthreads") or 1))) for w in workers]
    if not budgets:
        return memory_limit, 1
    memory = min(m for m, _ in budgets)
    # ceil(t * memory / m): memory / threads <= m / t for every worker
    threads = max(-(-t * memory // m) for m, t in budgets)
    return memory, max(1, threads)


def _scheduler_info(client) -> dict:
    """The scheduler's info with every worker (recent versions list 5 unless
    asked for all)."""
    import inspect

    if "n_workers" in inspect.signature(client.scheduler_info).parameters:
        return client.scheduler_info(n_workers=-1)
    return client.scheduler_info()


# -- the scheduler dask.compute would use -------------------------------------

def active_client():
    """The ``distributed.Client`` that ``dask.compute`` would use now, or None.

    The one place where p2s-dask looks for a user's Client (the API and file
    runs both ask here): a Client made current (``with Client(...)``,
    ``as_current``) or the default one (the last created), unless
    ``dask.config``'s ``scheduler`` names a local scheduler, which wins, as
    in ``dask.compute``.

    Returns
    -------
    distributed.Client or None
    """
    import dask

    get = dask.base.get_scheduler()
    # a Client is Dask's scheduler as its bound `get`
    client = getattr(get, "__self__", None)
    if client is None:
        return None
    from distributed import Client

    return client if isinstance(client, Client) else None


def _on_this_machine(client) -> bool:
    """Whether a Client's workers are a LocalCluster's (they see our files)."""
    from distributed import LocalCluster

    return isinstance(getattr(client, "cluster", None), LocalCluster)


def current_executor(memory_limit: int = DEFAULT_MEMORY_LIMIT) -> Executor:
    """The executor of the scheduler ``dask.compute`` would use now.

    The active Client's cluster (:func:`active_client`), else Dask's local
    scheduler that ``dask.config`` names (``scheduler``, ``num_workers``),
    else threads on every usable core. Nothing is started, so nothing needs
    closing: the in-memory API runs where the user's other Dask work runs.

    Parameters
    ----------
    memory_limit : int
        The budget of a worker that reports no memory limit (all of it for
        the local scheduler).

    Returns
    -------
    Executor
    """
    import dask

    from ..graph.engine import local_threads

    client = active_client()
    if client is not None:
        return DistributedExecutor(client, memory_limit=memory_limit,
                                   is_local=_on_this_machine(client))
    return ThreadsExecutor(local_threads(), memory_limit,
                           scheduler=dask.config.get("scheduler", None) or "threads")


# -- the blocks of an in-memory array -------------------------------------------

def contiguous(view, order: str):
    """``view`` as a contiguous array in ``order`` whose values are aligned
    (itself when it is one).

    A block scattered to a worker arrives in a network buffer at any byte
    offset, and NumPy sums unaligned values in another order: realigned, a
    block gives the same bits on every executor (see
    :func:`p2s_dask.graph.engine.aligned`).
    """
    import numpy as np

    return np.require(view, requirements=[order, "ALIGNED"])


def _sub_block(parent, index, order: str):
    """A piece of a (scattered) block, cut where the block is."""
    return contiguous(parent[index], order)


def chunk_grid(chunks):
    """``(block index, 4D slices)`` of every chunk, in C order."""
    import numpy as np
    from dask.array.core import slices_from_chunks

    return zip(np.ndindex(*[len(c) for c in chunks]), slices_from_chunks(chunks))


def _task_array(tasks: dict, chunks, dtype):
    """A dask array from ``{block index: task or value}``."""
    import dask.array as da

    name = f"p2s-block-{uuid.uuid4().hex}"
    return da.Array({(name,) + idx: t for idx, t in tasks.items()}, name, chunks,
                    dtype=dtype)


class LocalBlocks:
    """Blocks of an array of this process for Dask's local schedulers: each
    task cuts its own block from the array (a copy only when the cut is
    strided), so nothing is copied ahead of the work.

    Parameters
    ----------
    data : ndarray
    order : {'C', 'F'}
        The layout every block is given.
    """

    def __init__(self, data, order: str):
        self.data, self.order = data, order

    def array(self, chunks):
        """A dask array of ``data`` cut by ``chunks``, blocks in ``order``."""
        tasks = {idx: (contiguous, self.data[slc], self.order)
                 for idx, slc in chunk_grid(chunks)}
        return _task_array(tasks, chunks, self.data.dtype)


class ScatteredBlocks:
    """Blocks of an array of this process, scattered once to a cluster.

    Each block of ``chunks`` is sent to one worker (one at a time: the client
    holds at most one block's copy); every pass uses them, each task gets only
    its own block, and smaller pieces are cut on the worker holding their
    block.

    Parameters
    ----------
    client : distributed.Client
    data : ndarray
    chunks : tuple of 4 tuples
        The blocks scattered; :meth:`array` takes these or finer chunks that
        nest in them.
    order : {'C', 'F'}
        The layout every block and piece is given.
    """

    def __init__(self, client, data, chunks, order: str):
        self.client, self.order, self.chunks = client, order, chunks
        self.dtype = data.dtype
        self.blocks = {idx: client.scatter(contiguous(data[slc], order), hash=False)
                       for idx, slc in chunk_grid(chunks)}

    def array(self, chunks):
        """A dask array of the scattered blocks, or of pieces of them."""
        import numpy as np

        if chunks == self.chunks:
            # each block realigned on its worker (a copy only when it is not)
            tasks = {idx: (contiguous, block, self.order) for idx, block in self.blocks.items()}
            return _task_array(tasks, chunks, self.dtype)
        ends = [np.cumsum(c) for c in self.chunks[:3]]
        tasks = {}
        for idx, slc in chunk_grid(chunks):
            parent, local = [], []
            for a in range(3):
                j = int(np.searchsorted(ends[a], slc[a].start, side="right"))
                start = int(ends[a][j] - self.chunks[a][j])
                parent.append(j)
                local.append(slice(slc[a].start - start, slc[a].stop - start))
            tasks[idx] = (_sub_block, self.blocks[tuple(parent) + (0,)], tuple(local),
                          self.order)
        return _task_array(tasks, chunks, self.dtype)

    def release(self) -> None:
        """Drop the blocks from the cluster."""
        with contextlib.suppress(Exception):  # a cluster already gone holds nothing
            self.client.cancel(list(self.blocks.values()))
        self.blocks = {}


# -- progress -----------------------------------------------------------------

@contextlib.contextmanager
def _stage(desc: str, progress: bool):
    """Progress output of one stage, on stderr (stdout stays the program's).

    Yields True when a bar should be drawn (stderr is a terminal), False when
    one line is printed at the end of the stage (a log file), None for none.
    """
    if not progress:
        yield None
        return
    name = desc or "compute"
    tty = _isatty(sys.stderr)
    if tty:
        print(f"[{name}]", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield tty
    if not tty:
        print(f"[{name}] done in {time.perf_counter() - start:.1f} s", file=sys.stderr,
              flush=True)


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _stderr_bar_class():
    from distributed.diagnostics.progressbar import TextProgressBar

    class StderrProgressBar(TextProgressBar):
        """distributed's text bar, drawn on stderr and left on screen."""

        def _draw_bar(self, remaining, all, **kwargs):
            from dask.utils import format_time

            # the look of dask.diagnostics.ProgressBar, the local runs' bar
            frac = (1 - remaining / all) if all else 1.0
            with contextlib.suppress(ValueError):
                sys.stderr.write(f"\r[{'#' * int(self.width * frac):<{self.width}}] | "
                                 f"{int(100 * frac)}% Completed | "
                                 f"{format_time(self.elapsed)}")
                sys.stderr.flush()

        def _draw_stop(self, **kwargs):
            with contextlib.suppress(ValueError):
                sys.stderr.write("\n")
                sys.stderr.flush()

    return StderrProgressBar


def _draw_progress(futures) -> None:
    """Draw a bar until these futures (and what they depend on) are done."""
    _stderr_bar_class()(futures, complete=True)


# -- opening one ----------------------------------------------------------------

def _check_count(value, flag: str) -> int | None:
    """None, or a positive int; the message names the CLI flag."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{flag} must be a positive integer; got {value!r}")
    return value


def _check_memory(memory_limit) -> int:
    """Bytes from an int or a string such as ``"2GiB"``: the options' parser
    (:func:`p2s_dask.config.budget.parse_memory_limit`), one message for all."""
    from ..config.budget import parse_memory_limit
    return parse_memory_limit(memory_limit)


def _unreachable(address: str, source: str, reason) -> str:
    """The one-line message for a scheduler we cannot use."""
    if isinstance(reason, BaseException):
        text = str(reason).strip().splitlines()
        reason = f"{type(reason).__name__}: {text[0]}" if text else type(reason).__name__
    return f"cannot reach the Dask scheduler at {address} (from {source}): {reason}"


def _probe(address: str, source: str, timeout: float) -> None:
    """Connect (within ``timeout`` s), then ask the scheduler who it is
    (within ``timeout`` s more).

    distributed's own connect bounds the TCP connection, not the handshake:
    a port where something else listens (a scheduler's dashboard, 8787,
    instead of 8786) would keep ``Client`` waiting for ever.
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.core import rpc
    from distributed.security import Security

    _tcp_connect(address, source, timeout)

    async def ask():
        # the outer wait_for alone decides when to give up
        async with rpc(address, timeout=2 * timeout,
                       connection_args=Security().get_connection_args("client")) as remote:
            return await remote.identity()

    async def bounded():
        return await asyncio.wait_for(ask(), timeout)

    # a thread of its own: the caller may already run an event loop (Jupyter)
    with ThreadPoolExecutor(1) as pool:
        try:
            info = pool.submit(asyncio.run, bounded()).result()
        except (asyncio.TimeoutError, TimeoutError):
            raise InputError(_unreachable(address, source, f"no answer within {timeout:g} s"))\
                from None
        except Exception as exc:  # TLS settings, garbage or a hang-up in the handshake
            lines = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
            raise InputError(_unreachable(address, source, f"the Dask handshake failed "
                                          f"({detail}); is that a Dask scheduler's port?"))\
                from None
    kind = info.get("type") if isinstance(info, dict) else None
    if kind != "Scheduler":
        raise InputError(_unreachable(address, source, f"it is a Dask {kind or 'server'}, "
                                                       "not a scheduler"))


def _tcp_connect(address: str, source: str, timeout: float) -> None:
    """Open and close a TCP connection to the scheduler's port.

    distributed retries a refused connection until its timeout and then says
    only that it timed out: a plain socket tells a refused connection, an
    unknown host and a silent network apart, at once.
    """
    import socket

    protocol, sep, location = address.partition("://")
    if not sep:
        protocol, location = "tcp", address
    if protocol not in ("tcp", "tls", "ws", "wss"):  # UCX and inproc: not over TCP
        return
    host, _, port = location.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except socket.gaierror:
        raise InputError(_unreachable(address, source, f"unknown host {host!r}")) from None
    except ConnectionRefusedError:
        raise InputError(_unreachable(address, source, "connection refused (is it "
                                                       "running, on that port?)")) from None
    except (TimeoutError, socket.timeout):
        raise InputError(_unreachable(address, source,
                                      f"no connection within {timeout:g} s")) from None
    except OSError as exc:
        raise InputError(_unreachable(address, source, exc.strerror or exc)) from None


def _connect(address: str, source: str, timeout: float, worker_timeout: float):
    """A ``distributed.Client`` of a scheduler that has at least one worker."""
    from distributed import Client

    _probe(address, source, timeout)
    try:
        client = Client(address, timeout=timeout)
    except Exception as exc:
        raise InputError(_unreachable(address, source, exc)) from None
    try:
        # the budget is read from the workers: wait for a first one (workers
        # started with the scheduler take a few seconds to register)
        client.wait_for_workers(1, timeout=worker_timeout)
    except (TimeoutError, OSError):
        client.close()
        raise InputError(f"the Dask scheduler at {address} (from {source}) has no "
                         f"workers (none joined within {worker_timeout:g} s)") from None
    except BaseException:
        client.close()
        raise
    return client


@contextlib.contextmanager
def _children_ignore_ctrl_c():
    """Processes started in this block ignore SIGINT.

    A Ctrl-C at a terminal goes to the whole foreground process group: the
    LocalCluster's worker processes would each die of it, printing their
    KeyboardInterrupt's traceback and their lost heartbeats' errors, while
    this process stops the run and closes the cluster in order anyway. A
    process started while SIGINT is ignored keeps ignoring it (Python leaves
    an inherited SIG_IGN alone), so the workers are started so. A Ctrl-C in
    these seconds of start-up is lost; one later stops the run.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread sets handlers; and it gets the Ctrl-C
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _local_cluster(n_workers: int, n_threads: int):
    """A Client of a LocalCluster of worker processes on this machine."""
    from distributed import Client

    with _children_ignore_ctrl_c():
        cluster = _start_local_cluster(n_workers, n_threads)
    with cluster, Client(cluster) as client:
        yield client


def _start_local_cluster(n_workers: int, n_threads: int):
    """A started LocalCluster of a run's local worker processes."""
    from distributed import LocalCluster

    return LocalCluster(
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
    )


@contextlib.contextmanager
def open_executor(*, scheduler=None, scheduler_file=None, workers=None, threads=None,
                  memory_limit=DEFAULT_MEMORY_LIMIT, connect_timeout: float = 5.0,
                  worker_timeout: float = 60.0):
    """The executor of a run, closed (with all it started) afterwards.

    An existing cluster when :func:`resolve_scheduler` finds one; else, with
    ``workers`` None, the active Client's (:func:`active_client`) if there is
    one; else, with ``workers`` None or 1, a :class:`ThreadsExecutor`; else a
    LocalCluster of ``workers`` processes on 127.0.0.1 sharing
    ``memory_limit``.

    Parameters
    ----------
    scheduler, scheduler_file : optional
        ``--scheduler`` and ``--scheduler-file``; see :func:`resolve_scheduler`.
    workers, threads : int, optional
        Local run shape. Threads default to the CPUs this process may use
        (``dask.system.CPU_COUNT``), divided among the workers. Ignored on an
        existing cluster, whose workers have their own.
    memory_limit : int or str
        The run's budget: split among local workers; on an existing cluster,
        the budget of a worker that reports no memory limit.
    connect_timeout : float
        Seconds to reach an existing scheduler.
    worker_timeout : float
        Seconds to wait for an existing scheduler's first worker.

    Yields
    ------
    Executor

    Raises
    ------
    InputError
        Bad counts, budget or address, or a scheduler that cannot be reached
        or has no workers: one line, naming the flag or variable.
    """
    budget = _check_memory(memory_limit)
    workers = _check_count(workers, "--workers")
    threads = _check_count(threads, "--threads")
    found = resolve_scheduler(scheduler, scheduler_file)
    if found is not None:
        client = _connect(*found, connect_timeout, worker_timeout)
        try:
            yield DistributedExecutor(client, memory_limit=budget)
        finally:
            client.close()
        return
    client = active_client() if workers is None else None
    if client is not None:  # the user's (not closed here), as the API uses it
        yield DistributedExecutor(client, memory_limit=budget,
                                  is_local=_on_this_machine(client))
        return
    if workers in (None, 1):
        yield ThreadsExecutor(threads, memory_limit=budget)
        return
    with _local_cluster(workers, threads or max(1, _cpu_count() // workers)) as client:
        yield DistributedExecutor(client, memory_limit=max(1, budget // workers),
                                  is_local=True)


# -- workers that must see our files ------------------------------------------

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
    client : distributed.Client or Executor
        Anything with ``run(fn, *args)`` returning results by worker.
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
