"""``--groups``: which volumes are regressed together, from a short spec.

* ``shell``: the b0 volumes, then one group per shell (b-values rounded to
  the nearest 100, as scanners jitter them);
* ``batch:N``: the b0 volumes, then the diffusion volumes in acquisition
  order in batches of N (a last batch of one volume joins the one before:
  a single volume cannot be regressed);
* a file (local or URL) of one integer label per volume; negative labels
  pass volumes through.

The result is a label per volume, which :func:`p2s_dask.config.groups.make_groups`
turns into groups, as for the API's ``groups=``.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from .options import spell

SHELL_ROUNDING = 100.0


def group_labels(spec, bvals, b0_threshold, storage_options=None):
    """Labels ``(n,)`` for ``spec`` (None: None, the default b0/DWI split).

    Parameters
    ----------
    spec : str, array-like or None
    bvals : ndarray (n,)
    b0_threshold : float
    storage_options : dict, optional
        For a labels file given as a URL.

    Returns
    -------
    ndarray of int or None
    """
    if spec is None or not isinstance(spec, (str, os.PathLike)):
        return spec
    text = str(spec).strip()
    bvals = np.asarray(bvals, float)
    dwi = bvals > b0_threshold
    if text.lower() == "shell":
        shells = np.rint(bvals / SHELL_ROUNDING).astype(np.int64)
        _, index = np.unique(shells[dwi], return_inverse=True)
        labels = np.zeros(bvals.size, np.int64)
        labels[dwi] = index + 1
        return labels
    if text.lower().startswith("batch:"):
        return _batches(text, dwi)
    return _labels_file(text, bvals.size, storage_options)


def _batches(text, dwi):
    try:
        size = int(text.split(":", 1)[1])
    except ValueError:
        size = 0
    if size < 2:
        raise InputError(f"{spell('groups')} {text!r}: batch:N needs an integer N >= 2")
    order = np.flatnonzero(dwi)
    batch = np.arange(order.size) // size
    if order.size % size == 1 and batch.max(initial=0) > 0:
        batch[-1] -= 1  # a lone last volume joins the batch before it
    labels = np.zeros(dwi.size, np.int64)
    labels[order] = batch + 1
    return labels


def _labels_file(path, n, storage_options):
    from ..io.fsl import read_text
    try:
        text = read_text(path, storage_options)
    except InputError as exc:
        raise InputError(f"{spell('groups')} {path!r} is not 'shell', 'batch:N' or a "
                         f"readable file of labels ({exc})") from None
    try:
        labels = np.array([int(v) for v in text.split()], np.int64)
    except ValueError:
        raise InputError(f"{spell('groups')} {path}: labels must be integers") from None
    except OverflowError:
        raise InputError(f"{spell('groups')} {path}: labels must fit 64-bit integers "
                         "(a label names a group; small numbers do)") from None
    if labels.size != n:
        raise InputError(f"{spell('groups')} {path} has {labels.size} labels but the data "
                         f"has {n} volumes")
    return labels
