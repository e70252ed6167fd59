"""Test and benchmark helpers: a synthetic DWI phantom and an exact reference.

Both need DIPY (and the reference scikit-learn), which are test/benchmark
dependencies of p2s_dask only. The helpers are loaded on first access, so
importing this package is always cheap and safe, and
``python -m p2s_dask.testing.phantom`` does not import its module twice.
"""

import importlib

__all__ = ["make_phantom", "reference_patch2self", "write_phantom"]

_WHERE = {"make_phantom": ".phantom", "write_phantom": ".phantom",
          "reference_patch2self": ".reference"}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
