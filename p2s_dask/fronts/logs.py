"""The 'p2s_dask' log as each front shows it: a handler attached for one call."""

from __future__ import annotations

import contextlib
import logging

LOGGER = logging.getLogger("p2s_dask")


@contextlib.contextmanager
def attached(handler=None, level=None):
    """``handler`` (if any) on the 'p2s_dask' log and its ``level`` (if any)
    set for the block; both undone after, whatever happens.

    Parameters
    ----------
    handler : logging.Handler, optional
        Closed after, with the block.
    level : int or str, optional
    """
    old_level = LOGGER.level
    if level is not None:
        LOGGER.setLevel(level)
    if handler is not None:
        LOGGER.addHandler(handler)
    try:
        yield
    finally:
        if handler is not None:
            LOGGER.removeHandler(handler)
            handler.close()
        LOGGER.setLevel(old_level)
