"""Writing the small targets of a manifest: folders, and whole small files.

The image outputs have their sinks (:mod:`.sinks`); what is left is small:
the folders a batch or BIDS run makes, the report JSON, the QC report's
pages and figures, BIDS ``dataset_description.json``. Each is written only
from a checked manifest entry, and a file is written under a partial name
beside it, then renamed (a whole-object put on object stores), so no reader
sees half of one.
"""

from __future__ import annotations

import contextlib
import os
import uuid

from ..io.urls import fs_and_path, local_path, user_errors
from ..planning.manifest import How, Manifest, Write


def make_folders(manifest: Manifest, run: str = "") -> list:
    """Make the missing local folders that ``manifest`` plans for ``run``.

    Returns
    -------
    list of str
        The folders made, parents first (see :func:`remove_empty`).
    """
    made = []
    for w in manifest.writes:
        if w.how is not How.FOLDER or w.run != run or not w.place.local:
            continue
        path = w.place.key
        if not os.path.isdir(path):
            with user_errors(w.place.url, "writing"):
                os.makedirs(path, exist_ok=True)
            made.append(path)
    return made


def remove_empty(folders) -> None:
    """Remove the folders a failed run made, deepest first, if still empty."""
    for path in reversed(list(folders)):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def put_text(target: Write, text: str, storage_options=None) -> None:
    """Write the whole file ``target`` (a manifest entry) atomically."""
    put_bytes(target, text.encode(), storage_options)


def put_bytes(target: Write, data: bytes, storage_options=None) -> None:
    """Write the whole file ``target`` (a manifest entry, e.g. a report's
    PNG figure) atomically."""
    url = target.place.url
    fs, path = fs_and_path(url, storage_options)
    with user_errors(url, "writing"):
        if target.place.local:
            final = local_path(url)
            folder, name = os.path.split(final)
            tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.partial")
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, final)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:
            fs.pipe(path, data)
