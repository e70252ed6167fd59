"""The work store: a run's resumable state, trusted by fingerprint only.

A run's state (the staged input, the statistics, the minima, the finished
output chunks) is reused by a rerun only when the rerun's identity matches
the one recorded when the state was made: a fingerprint of the input (size,
modification time, and a hash of its header and of samples spread over its
bytes), of the mask and gradients, of every option that changes the result
and of the chunk grid (float rounding follows the blocks). Otherwise the
state is discarded and the run says in one line why it starts over.

Everything is JSON or ``.npy``/``.npz`` read with ``allow_pickle=False``: a
work store on a shared bucket must never be a way to run code in the next
user's process. Finished output chunks are recorded by the region they
cover (their bounds), not by a grid index.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import numpy as np

from ..core.stats import Stats
from ..io import fs_and_path, user_errors
from ..io.urls import is_local, join

FORMAT = "p2s-dask-work"
VERSION = 2
# samples hashed over the input's bytes: enough that an edited region of
# any size changes at least the size, the time or one sample's hash in
# practice, cheap on object stores (a few ranged reads)
SAMPLES = 64
SAMPLE_BYTES = 4096
HEADER_BYTES = 64 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_fingerprint(fs, path) -> dict:
    info = fs.info(path)
    size = int(info.get("size") or 0)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        digest.update(fh.read(min(size, HEADER_BYTES)))
        for k in range(SAMPLES):
            fh.seek(max(0, (size - SAMPLE_BYTES) * k // max(1, SAMPLES - 1)))
            digest.update(fh.read(SAMPLE_BYTES))
    stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
    return {"size": size, "stamp": str(stamp), "sha256": digest.hexdigest()}


def _store_fingerprint(fs, path) -> dict:
    """A Zarr store: its metadata documents, its listing with sizes and
    times, and a sample of its chunk objects."""
    listing = sorted(fs.find(path, detail=True).items())
    digest = hashlib.sha256()
    chunks = []
    for name, info in listing:
        rel = name[len(path):]
        stamp = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
        digest.update(f"{rel}\0{info.get('size')}\0{stamp}\n".encode())
        if rel.endswith(".json"):
            digest.update(fs.cat_file(name))
        else:
            chunks.append(name)
    step = max(1, len(chunks) // 16)
    for name in chunks[::step]:
        digest.update(fs.cat_file(name))
    return {"objects": len(listing), "sha256": digest.hexdigest()}


def fingerprint(url, storage_options=None) -> dict:
    """Fingerprint of a file or a Zarr store at ``url``.

    Parameters
    ----------
    url : str
    storage_options : dict, optional

    Returns
    -------
    dict
        JSON-able; equal for unchanged data.
    """
    fs, path = fs_and_path(url, storage_options)
    with user_errors(url, "reading"):
        fs.invalidate_cache(path)
        if fs.isdir(path):
            return {"kind": "store", **_store_fingerprint(fs, path.rstrip("/"))}
        return {"kind": "file", **_file_fingerprint(fs, path)}


def content_hash(array) -> str:
    """SHA-256 of an array's dtype, shape and bytes (masks, gradients)."""
    arr = np.ascontiguousarray(array)
    return _sha(f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes())


def why_different(old: dict, new: dict) -> str:
    """The first part of a run's identity that changed, in words."""
    names = {"input": "the input changed", "mask": "the mask changed",
             "bvals": "the b-values changed", "options": "the options changed",
             "plan": "the chunk grid changed (memory limit, threads or chunks)",
             "groups": "the groups changed", "output": "the output is another one"}
    for key, text in names.items():
        if old.get(key) != new.get(key):
            return text
    return "it was made by another version of p2s-dask"


class WorkStore:
    """A run's scratch folder or prefix, holding state for a rerun.

    Parameters
    ----------
    url : str
        Local path or fsspec URL of the work store.
    storage_options : dict, optional
    """

    def __init__(self, url, storage_options=None):
        self.url = str(url).rstrip("/")
        self.so = storage_options
        self.fs, self.path = fs_and_path(self.url, storage_options)

    def file(self, name) -> str:
        """URL of ``name`` inside the store."""
        return join(self.url, name)

    def _p(self, name) -> str:
        return f"{self.path}/{name}"

    def exists(self) -> bool:
        with user_errors(self.url, "reading"):
            self.fs.invalidate_cache(self.path)
            return self.fs.exists(self.path)

    def has(self, name) -> bool:
        with user_errors(self.url, "reading"):
            self.fs.invalidate_cache(self._p(name))
            return self.fs.exists(self._p(name))

    def makedirs(self, name=""):
        # object stores have no folders, and s3fs's makedirs would create a
        # missing bucket: a typo must be an error, not a new bucket
        if is_local(self.url):
            with user_errors(self.url, "writing"):
                self.fs.makedirs(self._p(name).rstrip("/"), exist_ok=True)

    def write_bytes(self, name, data: bytes) -> None:
        """Write then rename: a crash never leaves a half-written file."""
        tmp = self._p(name + ".partial")
        with user_errors(self.url, "writing"):
            with self.fs.open(tmp, "wb") as fh:
                fh.write(data)
            self.fs.mv(tmp, self._p(name))

    def read_bytes(self, name) -> bytes:
        with user_errors(self.url, "reading"), self.fs.open(self._p(name), "rb") as fh:
            return fh.read()

    def remove(self, name="") -> None:
        target = self._p(name).rstrip("/") if name else self.path
        with user_errors(self.url, "writing"):
            self.fs.invalidate_cache(target)
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)

    # -- identity
    def identity(self) -> dict | None:
        """The recorded identity, or None when there is none (or it is unreadable)."""
        if not self.has("run.json"):
            return None
        try:
            record = json.loads(self.read_bytes("run.json"))
        except ValueError:
            return None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            return None
        return record.get("identity")

    def start(self, identity: dict) -> str | None:
        """Begin or resume a run of ``identity``.

        Returns None when the recorded work is reused, else a one-line reason
        why any earlier work was discarded ('' when there was none).
        """
        old = self.identity() if self.exists() else None
        if old == identity:
            return None
        reason = "" if not self.exists() else (
            why_different(old, identity) if old is not None
            else "its earlier work was not recorded completely")
        self.remove()
        self.makedirs()
        record = {"format": FORMAT, "version": VERSION, "identity": identity}
        self.write_bytes("run.json", json.dumps(record, sort_keys=True).encode())
        return reason

    # -- arrays, never pickled
    def save_arrays(self, name, **arrays) -> None:
        """An ``.npz`` written straight to its file (then renamed): at 300
        volumes and radius 1 the statistics are ~0.5 GB, and a buffer in
        memory would hold them twice more."""
        tmp = self._p(name + ".partial")
        with user_errors(self.url, "writing"):
            with self.fs.open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            self.fs.mv(tmp, self._p(name))

    def load_arrays(self, name) -> dict | None:
        if not self.has(name):
            return None
        try:
            # from the file, not from its bytes read whole: each array is
            # read into place (a fold's statistics at radius 1 are 0.5 GB,
            # held twice through a buffer)
            with self.fs.open(self._p(name), "rb") as fh, \
                    np.load(fh, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # damaged: recomputed

    def save_array(self, name, array) -> None:
        """One ``.npy`` written straight to its file (then renamed)."""
        tmp = self._p(name + ".partial")
        with user_errors(self.url, "writing"):
            with self.fs.open(tmp, "wb") as fh:
                np.save(fh, array, allow_pickle=False)
            self.fs.mv(tmp, self._p(name))

    def load_array(self, name):
        """The array of an ``.npy`` :meth:`save_array` wrote; None when there
        is none or it is damaged (then recomputed)."""
        if not self.has(name):
            return None
        try:
            with self.fs.open(self._p(name), "rb") as fh:
                return np.load(fh, allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return None

    def stems(self, folder, suffix) -> set:
        """The names in ``folder`` that end in ``suffix``, without it (an
        empty set when there is no such folder)."""
        path = self._p(folder)
        with user_errors(self.url, "reading"):
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                return set()
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]
        return {name[:-len(suffix)] for name in names if name.endswith(suffix)}

    # -- finished output regions
    def done_regions(self) -> set:
        with user_errors(self.url, "reading"):
            self.fs.invalidate_cache(self._p("done"))
            if not self.fs.exists(self._p("done")):
                return set()
            return {os.path.basename(p.rstrip("/"))
                    for p in self.fs.ls(self._p("done"), detail=False)}

    def mark_done(self, key: str, clipped: int = 0) -> None:
        """Record a finished output region (and how many values its cast
        clipped, so that a resumed run still reports them all)."""
        with user_errors(self.url, "writing"):
            self.fs.pipe(self._p(f"done/{key}"), str(int(clipped)).encode())

    def done_counts(self, keys) -> int:
        """The clipped values recorded with these finished regions."""
        total = 0
        with user_errors(self.url, "reading"):
            for key in keys:
                text = self.fs.cat_file(self._p(f"done/{key}")).decode() or "0"
                total += int(text) if text.strip().isdigit() else 0
        return total


def stats_to_arrays(stats: list, minima) -> dict:
    """Statistics of every group (None for pass-through) as plain arrays."""
    out = {"minima": np.asarray(minima, np.float64),
           "present": np.array([s is not None for s in stats])}
    for i, s in enumerate(stats):
        if s is not None:
            out[f"count{i}"] = np.array(s.count, np.int64)
            out[f"mean{i}"] = s.mean
            out[f"scatter{i}"] = s.scatter
    return out


def stats_from_arrays(arrays: dict):
    """Inverse of :func:`stats_to_arrays`: ``(stats list, minima)``."""
    stats = []
    for i, present in enumerate(arrays["present"]):
        stats.append(Stats(int(arrays[f"count{i}"]), arrays[f"mean{i}"],
                           np.asfortranarray(arrays[f"scatter{i}"]))
                     if present else None)
    return stats, arrays["minima"]
