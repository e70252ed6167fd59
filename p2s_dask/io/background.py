"""Overlap two stages of a stream (e.g. gunzip and Zarr writes) with a thread.

zlib and the Zarr codecs release the GIL, so producing the next slab in a
thread while the current one is consumed uses two cores; a token count keeps
the number of slabs alive, and so the memory, fixed.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable

__all__ = ["run_pipelined"]

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
