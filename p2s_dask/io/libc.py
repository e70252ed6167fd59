"""C library functions through ctypes, on Linux (glibc) only.

One loader for the few calls Python does not offer: ``mallopt`` and
``malloc_trim`` (:mod:`.malloc`), ``fallocate`` and ``sync_file_range``
(:mod:`.direct_io`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
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
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = getattr(lib, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn
