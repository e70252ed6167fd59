"""The files that travel beside a NIfTI image: ``.bval``, ``.bvec``, ``.json``.

FSL, MRtrix, DIPY and BIDS tools find a DWI's gradients in ``stem.bval`` /
``stem.bvec`` and its metadata in ``stem.json`` (BIDS sidecar). Each is small
and written under a temporary name, then renamed (a copy on object stores),
so no reader sees half of one.
"""

from __future__ import annotations

import json
import os
import uuid

import numpy as np

from ..errors import InputError
from .urls import exists, fs_and_path, is_local, local_path, strip_suffix, user_errors

__all__ = ["SIDECAR_SUFFIXES", "read_json", "read_json_sidecar", "sidecar_urls",
           "write_sidecars"]

SIDECAR_SUFFIXES = (".bval", ".bvec", ".json")


def sidecar_urls(nifti_url) -> dict:
    """``{'.bval': url, '.bvec': url, '.json': url}`` beside a NIfTI."""
    stem = strip_suffix(os.fspath(nifti_url))
    return {s: stem + s for s in SIDECAR_SUFFIXES}


def read_json(url, storage_options=None):
    """The JSON document at ``url`` (at most 16 MiB), or None when there is
    none; one-line :class:`InputError` when it is not JSON."""
    if not exists(url, storage_options):
        return None
    fs, path = fs_and_path(url, storage_options)
    with user_errors(url, "reading"), fs.open(path, "rb") as fh:
        data = fh.read(16 << 20)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{url}: not a JSON document") from None


def read_json_sidecar(nifti_url, storage_options=None) -> dict | None:
    """The BIDS ``.json`` sidecar of a NIfTI, or None when there is none."""
    value = read_json(sidecar_urls(nifti_url)[".json"], storage_options)
    return value if isinstance(value, dict) else None


def _text_bvals(bvals) -> str:
    return " ".join(f"{b:g}" for b in np.asarray(bvals, float).ravel()) + "\n"


def _text_bvecs(bvecs) -> str:
    rows = np.asarray(bvecs, float).reshape(3, -1)
    return "".join(" ".join(f"{v:.8g}" for v in row) + "\n" for row in rows)


def _put(url, text: str, storage_options):
    fs, path = fs_and_path(url, storage_options)
    with user_errors(url, "writing"):
        if is_local(url):
            target = local_path(url)
            tmp = f"{target}.{uuid.uuid4().hex[:8]}.partial"
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, target)
        else:
            fs.pipe(path, text.encode())


def write_sidecars(nifti_url, *, bvals=None, bvecs=None, metadata=None,
                   storage_options=None) -> list:
    """Write the sidecars of a NIfTI; return the URLs written.

    Parameters
    ----------
    nifti_url : str
    bvals : array-like (n,), optional
    bvecs : array-like (3, n), optional
    metadata : dict, optional
        The ``.json`` sidecar's content.
    storage_options : dict, optional
    """
    urls = sidecar_urls(nifti_url)
    written = []
    for suffix, content in ((".bval", bvals), (".bvec", bvecs), (".json", metadata)):
        if content is None:
            continue
        text = (_text_bvals(content) if suffix == ".bval" else _text_bvecs(content)
                if suffix == ".bvec" else json.dumps(content, indent=2, sort_keys=True) + "\n")
        _put(urls[suffix], text, storage_options)
        written.append(urls[suffix])
    return written
