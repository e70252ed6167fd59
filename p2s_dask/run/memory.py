"""Peak resident memory of this process and all its children."""

from __future__ import annotations

import threading

import psutil


def tree_rss(proc: psutil.Process | None = None) -> int:
    """Resident bytes of a process and its descendants, now."""
    proc = proc or psutil.Process()
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakMemory:
    """Sample :func:`tree_rss` in a background thread; ``peak`` is the maximum.

    A context manager: sampling runs between ``__enter__`` and ``__exit__``.

    Parameters
    ----------
    pid : int, optional
        The process whose tree is sampled (default: this one).
    interval : float
        Seconds between samples.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        try:
            self.peak = max(self.peak, tree_rss(self._proc))
        except psutil.Error:  # the process has ended
            pass

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._proc = psutil.Process(self.pid)
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()
        return False
