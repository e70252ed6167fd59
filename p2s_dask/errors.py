"""Exceptions with one-line messages meant for the user."""


class InputError(ValueError):
    """Bad input or a failed environment: the message says what, in one line."""


class DataError(InputError):
    """The input's data itself is unusable (NaN, truncated, corrupt, an empty
    mask): found during a run, after which nothing of the run is kept."""


class OutputExistsError(InputError):
    """The output is there already; the front decides how to say "replace it"
    (``overwrite=True`` in Python, ``--overwrite`` on the command line)."""


class BusyError(InputError):
    """Another p2s-dask process holds the output's lock: a batch counts the
    run as taken by that process, not as failed."""
