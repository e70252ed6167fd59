"""C library functions through ctypes, on Linux (glibc) only.

One loader for the few calls Python does not offer: ``mallopt`` and
``malloc_trim`` (:mod:`.malloc`), ``fallocate`` and ``sync_file_range``
(:mod:`.direct_io`).
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.lru_cache(maxsize=None)
def function(name: str, argtypes: tuple, restype=ctypes.c_int):
    """The libc function ``name`` with its argument types set, or None where
    there is no such function (another OS or C library). ``errno`` of a
    failed call is read with ``ctypes.get_errno()``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # the C library this process already loaded, found by the dynamic
        # linker (``ctypes.util.find_library`` would run ldconfig in a
        # subprocess, which opens files before a run is even checked)
        fn = getattr(_own_symbols(), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn


@functools.lru_cache(maxsize=None)
def _own_symbols():
    """The symbols of this process (its C library's among them)."""
    return ctypes.CDLL(None, use_errno=True)
