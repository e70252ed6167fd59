"""The memory budget option: its default, its least workable value, its parser.

Every front reads ``--memory-limit`` / ``memory_limit`` through
:func:`parse_memory_limit`, so the same bad value gives the same one line
from ``p2s-dask denoise``, ``p2s-dask convert`` and the Python API (only the
option's spelling differs, as :func:`~p2s_dask.config.options.spell` has it).

The least workable budget was measured with ``p2s-dask denoise`` on 96 x 96 x
48 x 40 float32 data (``.nii`` and ``.nii.gz``): beyond the ~146 MiB that
Python and the libraries take before any work, a run holds about 10 MiB of
its own (thread stacks, gzip and codec buffers, the work store's files) plus
what the budget gives its blocks. At 16 MiB a run grew by 24 MiB, at 32 MiB
by 32 MiB, at 64 MiB by 55 MiB: from 64 MiB the budget is kept (as
``tests/test_memory.py`` and ``tests/test_zarr_path.py`` check); below it, it
is not, so a smaller one is refused rather than silently overrun.
"""

from __future__ import annotations

import math
import numbers
import os

from ..errors import InputError

__all__ = ["AUTO", "DEFAULT_MEMORY_LIMIT", "MIN_MEMORY_LIMIT", "auto_memory_limit",
           "check_worker_share", "parse_memory_limit", "size_text"]

MIN_MEMORY_LIMIT = 64 << 20
# the default budget, as Dask's memory_limit='auto': this share of the memory
# the process may use (the machine's RAM or its cgroup's limit, the smaller)
AUTO = "auto"
AUTO_SHARE = 0.5
# where a container's memory limit is (cgroup v2, then v1); "max" or a huge
# number means none
CGROUP_LIMIT_FILES = ("/sys/fs/cgroup/memory.max",
                      "/sys/fs/cgroup/memory/memory.limit_in_bytes")
# tests only: a lower floor lets small test images take the out-of-core
# paths (streamed slabs, scratch files) that real data takes at real budgets
MIN_MEMORY_ENV = "P2S_DASK_MIN_MEMORY_LIMIT"

_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def size_text(nbytes: int) -> str:
    """``nbytes`` as a person writes it: ``'64 MiB'``, ``'2 GiB'``.

    >>> size_text(64 << 20)
    '64 MiB'
    >>> size_text(1536 << 20)
    '1.5 GiB'
    """
    for unit, size in _UNITS:
        if nbytes >= size:
            return f"{nbytes / size:.4g} {unit}"
    return f"{nbytes} B"


def _cgroup_limit() -> int | None:
    for path in CGROUP_LIMIT_FILES:
        try:
            with open(path) as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes 2**63 - 4096 for none
            return int(text)
        return None
    return None


def machine_memory() -> int:
    """The memory this process may use: the machine's RAM, or its cgroup's
    (container's) limit when that is smaller."""
    import psutil

    total = int(psutil.virtual_memory().total)
    limit = _cgroup_limit()
    return min(total, limit) if limit else total


def auto_memory_limit() -> int:
    """The default budget: :data:`AUTO_SHARE` of :func:`machine_memory`
    (never under the least workable budget)."""
    return max(least_memory_limit(), int(AUTO_SHARE * machine_memory()))


def least_memory_limit() -> int:
    """The floor in force: :data:`MIN_MEMORY_LIMIT`, unless a test lowered it."""
    from dask.utils import parse_bytes

    text = os.environ.get(MIN_MEMORY_ENV, "").strip()
    try:
        return max(1, parse_bytes(text)) if text else MIN_MEMORY_LIMIT
    except ValueError:
        return MIN_MEMORY_LIMIT


def parse_memory_limit(memory_limit) -> int:
    """Bytes from an int or a string such as ``"512MiB"``, at least the floor.

    Parameters
    ----------
    memory_limit : int, float or str
        A number of bytes, or a size in Dask's notation (``"2GiB"``,
        ``"512 MB"``).

    Returns
    -------
    int

    Raises
    ------
    InputError
        One line naming the option as the current front spells it: a value
        that is not an amount of memory, or one below the least workable
        budget (:data:`MIN_MEMORY_LIMIT`).
    """
    from dask.utils import parse_bytes

    from .options import spell_value

    value = None
    if memory_limit is None or (isinstance(memory_limit, str)
                                and memory_limit.strip().lower() == AUTO):
        return auto_memory_limit()
    if isinstance(memory_limit, str) and memory_limit.strip():
        try:
            value = parse_bytes(memory_limit)
        except (ValueError, OverflowError):
            value = None
    elif isinstance(memory_limit, numbers.Real) and not isinstance(memory_limit, bool) \
            and math.isfinite(memory_limit):
        value = int(memory_limit)
    if value is None:
        raise InputError(f"{spell_value('memory_limit', memory_limit)} is not an amount of "
                         "memory; give bytes or a size such as 2GiB or 512MiB")
    least = least_memory_limit()
    if value < least:
        raise InputError(f"{spell_value('memory_limit', memory_limit)} is below the least "
                         f"workable budget, {size_text(least)}")
    return value


def check_worker_share(memory_limit, workers) -> None:
    """Refuse a budget that leaves each of ``workers`` local worker processes
    less than the least workable budget (they share it).

    Parameters
    ----------
    memory_limit : int or str
        The run's budget (``--memory-limit``).
    workers : int or None
        Local worker processes (``--workers``); None or 1 is one.
    """
    budget = parse_memory_limit(memory_limit)
    if not workers or workers < 2:
        return
    least = least_memory_limit()
    if budget // workers < least:
        from .options import spell, spell_value
        raise InputError(
            f"{spell_value('memory_limit', memory_limit)} shared by "
            f"{spell_value('workers', workers)} leaves each worker "
            f"{size_text(budget // workers)}, below the least workable budget, "
            f"{size_text(least)}; give at least {size_text(least * workers)} or fewer "
            f"{spell('workers')}")


# what a run gets when nobody names a budget (the int for code that needs
# bytes at import time, e.g. an executor's default argument)
DEFAULT_MEMORY_LIMIT = auto_memory_limit()
