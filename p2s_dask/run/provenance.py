"""What made an output: the fingerprint recorded beside it, read back by reruns.

A batch or BIDS rerun trusts an existing output only by fingerprint: the
input's identity and content, its gradients, the mask, the groups and every
option that changes the result, hashed into one string recorded in the
output's ``.json`` sidecar (``P2SDask.Fingerprint``). The input's *name* is
not part of it, so the same dataset named by another path is still done, and
a replaced image or a fixed ``.bval`` under the same name is redone.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from .. import __version__
from ..io.sidecars import read_json, sidecar_urls
from ..errors import InputError
from ..io.urls import kind_of
from .workstore import content_hash


def result_fingerprint(run) -> dict:
    """A digest of each part of what decides ``run``'s numbers.

    Parameters
    ----------
    run : Run
        A validated run (:func:`p2s_dask.run.pipeline.describe_run`).

    Returns
    -------
    dict
        ``{part: SHA-256 hex digest}`` for the parts named in
        :data:`PARTS`.
    """
    options = run.opts.result_fields()
    options.pop("mask", None)  # by content below
    bvecs = run.meta.bvecs
    record = {
        "p2s_dask": __version__,
        "input": run.input_fingerprint(),
        "bvals": content_hash(np.asarray(run.bvals, np.float64)),
        "bvecs": None if bvecs is None else content_hash(np.asarray(bvecs, np.float64)),
        "mask": None if run.mask is None else content_hash(run.mask),
        "groups": [[g.name, [int(i) for i in g.indices], bool(g.denoise)] for g in run.groups],
        "options": {**options, "out_dtype": str(run.out_dtype),
                    "calc_dtype": str(run.calc_dtype)},
    }
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()
            for k, v in record.items()}


# the parts of a fingerprint, and how a rerun says which one changed
PARTS = {"input": "the input image changed", "bvals": "the b-values changed",
         "bvecs": "the b-vectors changed", "mask": "the mask changed",
         "groups": "the groups changed", "options": "the options changed",
         "p2s_dask": "it was made by another version of p2s-dask"}


def why_redone(recorded: dict, current: dict) -> str:
    """The first part that differs, in words."""
    return next((text for k, text in PARTS.items() if recorded.get(k) != current.get(k)),
                "its record differs")


def recorded_fingerprint(out, storage_options=None) -> dict | None:
    """The fingerprint recorded with an existing output: in a NIfTI's
    ``.json`` sidecar, or in a store's attributes (None: there is none)."""
    side = _recorded_sidecar(out, storage_options)
    try:
        value = side["P2SDask"]["Fingerprint"]
    except (KeyError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def _recorded_sidecar(out, storage_options):
    if kind_of(out) == "zarr":
        from ..io.zarr_store import open_dwi_array
        try:
            return open_dwi_array(out, storage_options)[1].sidecar
        except InputError:  # not ours, or not complete: nothing recorded
            return None
    try:
        return read_json(sidecar_urls(out)[".json"], storage_options)
    except InputError:  # not JSON: nothing of ours recorded
        return None
