"""Background threads: two stages of a stream overlapped (e.g. gunzip and
Zarr writes), and the writers that store what tasks hand over.

zlib and the Zarr codecs release the GIL, so producing the next slab in a
thread while the current one is consumed uses two cores; a token count keeps
the number of slabs alive, and so the memory, fixed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable

__all__ = ["BackgroundWriter", "WriterPool", "run_pipelined"]

_DONE = object()


def run_pipelined(items: Iterable, consume: Callable, ahead: int = 1) -> None:
    """Call ``consume(item)`` for each item, producing items in a thread.

    Parameters
    ----------
    items : iterable
        Iterated in a background thread (e.g. a generator that reads slabs).
    consume : callable
        Called in the calling thread, in order.
    ahead : int, optional
        How many items may be produced while one is consumed: at most
        ``ahead + 1`` items exist at any time.

    Raises
    ------
    Exception
        The first exception from either side; the other side is stopped.
    """
    tokens = threading.Semaphore(ahead + 1)
    handoff: queue.Queue = queue.Queue()
    stop = threading.Event()

    def produce():
        try:
            iterator = iter(items)
            while True:
                tokens.acquire()
                if stop.is_set():
                    return
                item = next(iterator, _DONE)
                handoff.put((item, None))
                if item is _DONE:
                    return
                del item
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            handoff.put((_DONE, exc))

    thread = threading.Thread(target=produce, name="p2s-io-producer", daemon=True)
    thread.start()
    try:
        while True:
            item, error = handoff.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            consume(item)
            # drop our reference before letting the producer make another
            del item
            tokens.release()
    finally:
        stop.set()
        tokens.release()
        thread.join()


class BackgroundWriter:
    """Stores items handed over by tasks, from background threads.

    A task hands its item (an encoded chunk, a block) over with
    :meth:`submit` and goes on computing while a writer thread waits for the
    storage, then runs the item's ``then`` (e.g. marking its chunk done). The
    queue is bounded, so at most ``depth + threads`` items wait in memory, and
    a task that hands one over while the queue is full waits for room.

    After the first failure the items still queued are dropped (their
    ``then`` never runs: nothing unwritten is marked done) and that error is
    raised in the caller, by the next :meth:`submit` and by :meth:`close`.

    Subclasses define :meth:`write` (run in a writer thread) and may define
    :meth:`finish` (run once by :meth:`close`, after every thread has ended).

    Parameters
    ----------
    depth : int
        Items the queue holds beside those being written.
    threads : int
        Writer threads: several keep several writes in flight (one at a
        time would leave the storage idle between them).
    name : str
        Of the threads, for debuggers and profiles.
    """

    def __init__(self, depth: int, threads: int, name: str = "p2s-writer"):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                        for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def submit(self, item: tuple, then: Callable | None = None) -> None:
        """Queue ``write(*item)`` (waits while the queue is full).

        Raises
        ------
        Exception
            The error of an earlier write, if any.
        """
        if self.error is not None:
            raise self.error
        # a list, which the writer empties: the item goes once written
        self.queue.put([item, then])

    def write(self, *item) -> None:
        """Store one item (in a writer thread)."""
        raise NotImplementedError

    def finish(self, ok: bool) -> None:
        """Run once by :meth:`close` after the threads ended; ``ok``: no
        write failed."""

    def _run(self) -> None:
        while True:
            entry = self.queue.get()
            try:
                if entry is None:
                    return
                if self.error is None:
                    self._write(entry)
            except BaseException as exc:  # noqa: BLE001 - raised in the caller
                if self.error is None:
                    self.error = exc
            finally:
                # the item goes now, not when the next one arrives
                entry = None
                self.queue.task_done()

    def _write(self, entry: list) -> None:
        item, then = entry
        entry.clear()
        self.write(*item)
        del item  # freed before ``then`` runs (its last reference)
        if then is not None:
            then()

    def close(self) -> None:
        """Write every queued item, stop the threads, run :meth:`finish`;
        then raise the first error, if any (it takes precedence over one
        from :meth:`finish`, which it likely caused)."""
        # one stop mark per thread, queued after every item: each thread
        # ends only once the items before its mark are written
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()
        try:
            self.finish(self.error is None)
        finally:
            if self.error is not None:
                raise self.error


class WriterPool:
    """This process's background writers, one per target (a file, a store).

    Tasks of a run that write to one target share its writer; the run
    finishes it (on every worker of a cluster) once all tasks are done.
    """

    def __init__(self):
        self._writers: dict = {}
        self._lock = threading.Lock()

    def get(self, target, make: Callable[[], BackgroundWriter]) -> BackgroundWriter:
        """The writer of ``target``, made by ``make()`` if there is none."""
        with self._lock:
            writer = self._writers.get(target)
            if writer is None:
                writer = self._writers[target] = make()
            return writer

    def finish(self, target) -> bool:
        """Close the writer of ``target`` (if any), raising its first error.

        Returns
        -------
        bool
            Whether there was a writer.
        """
        with self._lock:
            writer = self._writers.pop(target, None)
        if writer is None:
            return False
        writer.close()
        return True
