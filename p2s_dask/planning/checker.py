"""The safety rules, applied once to a run's whole manifest before anything is written.

* No write target is, contains, or lies inside a place the run reads (real
  paths through links, the same file through hard links, normalised URLs):
  whatever ``--overwrite`` says, p2s-dask never writes over its input.
* No two write targets collide (the same place, or one inside another that
  is not a folder made to hold it).
* An existing target is replaced only with ``--overwrite``, or when it is the
  run's own unfinished or stale work (decided by fingerprint, by the front,
  and handed in as ``ours``), and only at commit.
* Every target can be written where it says: a local target's nearest
  existing folder is a folder we may write; a folder target is not a file;
  a path holding ``s3:`` as a folder name (a URL whose ``//`` was lost) is
  refused, never written as a local folder.

The rules compare :class:`~.manifest.Place` keys with dictionaries and by
walking each key's parents, so a BIDS dataset of thousands of runs is
checked in linear time.
"""

from __future__ import annotations

import os
import posixpath
import re

from ..config.options import spell
from ..errors import InputError
from ..io.urls import exists
from .manifest import How, Manifest

# a folder name that is a URL scheme: 's3:' from Path('s3://bucket/x')
_SCHEME_DIR = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:$")


def check(manifest: Manifest, *, overwrite=False, ours=frozenset(),
          storage_options=None) -> None:
    """Refuse a run whose manifest breaks a safety rule.

    Parameters
    ----------
    manifest : Manifest
    overwrite : bool
        The user's ``--overwrite``: existing targets may be replaced.
    ours : set of str, or a callable returning one
        Keys of existing targets that are the run's own unfinished or
        stale work (replaced or resumed without ``--overwrite``).
    storage_options : dict, optional

    Raises
    ------
    InputError
        One line naming the option and the place.
    """
    check_layout(manifest)
    if callable(ours):  # looked up only once the layout holds (it reads the targets)
        ours = ours()
    problems = check_existing(manifest, overwrite=overwrite, ours=ours,
                              storage_options=storage_options)
    if problems:
        raise InputError(next(iter(problems.values())))


def check_layout(manifest: Manifest) -> None:
    """The rules that hold for the whole invocation at once: no target
    touches a read place, no two targets collide, every target writable.

    Raises
    ------
    InputError
    """
    writes = _unique(manifest.writes)
    _no_write_touches_a_read(writes, manifest.reads)
    _no_two_writes_collide(writes)
    folders = {w.place.key for w in writes if w.how is How.FOLDER}
    for w in writes:
        _writable(w)
        _has_a_folder(w, folders)


def check_existing(manifest: Manifest, *, overwrite=False, ours=frozenset(),
                   storage_options=None) -> dict:
    """Targets that exist and may not be replaced, per run.

    Returns
    -------
    dict
        ``{run label: one-line message}`` (label '' for the invocation's own
        targets); empty when nothing stands in the way.
    """
    problems = {}
    for w in manifest.writes:
        if w.how is not How.CREATE or w.place.key in ours or overwrite or w.run in problems:
            continue
        if exists(w.place.url, storage_options):
            problems[w.run] = (f"{_name(w)} already exists; use {spell('overwrite')} "
                               "to replace it")
    return problems


def _unique(writes) -> list:
    """Folder and scratch targets named twice (every run of a batch lists its
    output folder) count once."""
    seen, out = set(), []
    for w in writes:
        key = (w.place.key, w.how) if w.how in (How.FOLDER, How.SCRATCH) else id(w)
        if key not in seen:
            seen.add(key)
            out.append(w)
    return out


def _parents(key: str):
    """``key``'s parent folders, nearest first."""
    while True:
        parent = posixpath.dirname(key.rstrip("/"))
        if not parent or parent == key or parent.endswith(":/") or parent.endswith(":"):
            return
        yield parent
        key = parent


def _name(w) -> str:
    who = f"{w.flag} " if w.flag else ""
    return f"{who}({w.place.url})" if who else w.place.url


def _no_write_touches_a_read(writes, reads) -> None:
    by_key = {r.place.key: r for r in reads}
    inodes = _inodes(reads)
    for w in writes:
        hit = by_key.get(w.place.key) or next(
            (by_key[p] for p in _parents(w.place.key) if p in by_key), None)
        if hit is None and w.place.local:
            hit = inodes.get(_inode(w.place.key))
        if hit is not None:
            where = "is" if hit.place.key == w.place.key or hit.place.same_file(w.place) \
                else "lies inside"
            raise InputError(f"{_name(w)} {where} the {hit.role} {hit.place.url}; "
                             "p2s-dask never writes over what it reads: choose another path")
    # a folder target is never replaced: it may hold what the run reads (the
    # files it writes there are checked one by one above)
    write_keys = {w.place.key: w for w in writes if w.how is not How.FOLDER}
    for r in reads:
        w = next((write_keys[p] for p in _parents(r.place.key) if p in write_keys), None)
        if w is not None:
            raise InputError(f"the {r.role} {r.place.url} lies inside {_name(w)}; "
                             "choose another path")


def _inodes(reads) -> dict:
    """``{(device, inode): read}`` of the local reads that exist."""
    out = {}
    for r in reads:
        if r.place.local:
            ino = _inode(r.place.key)
            if ino is not None:
                out[ino] = r
    return out


def _inode(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _no_two_writes_collide(writes) -> None:
    files = {}
    for w in writes:
        if w.how is How.FOLDER:
            continue
        other = files.get(w.place.key)
        if other is not None:
            raise InputError(_collision(other, w))
        files[w.place.key] = w
    for w in writes:
        for p in _parents(w.place.key):
            holder = files.get(p)
            if holder is not None and holder is not w:
                raise InputError(f"{_name(w)} would be written inside {_name(holder)}; "
                                 "choose another path")


def _collision(a, b) -> str:
    if a.run and b.run and a.run != b.run:
        return (f"the runs of {a.run} and {b.run} would both write {a.place.url}; "
                "give them different outputs")
    return f"{_name(a)} and {_name(b)} are the same place; choose another path"


def _has_a_folder(w, folders) -> None:
    """A local file target's folder exists, or the run makes it."""
    if not w.place.local or w.how is How.FOLDER:
        return
    parent = posixpath.dirname(w.place.key)
    if parent not in folders and not os.path.isdir(parent):
        raise InputError(f"{_name(w)} cannot be written: the folder {parent} does not exist")


def _writable(w) -> None:
    if not w.place.local:
        _known_protocol(w)
        return
    parts = w.place.key.split("/")
    bad = next((p for p in parts if _SCHEME_DIR.match(p)), None)
    if bad is not None:
        raise InputError(f"{_name(w)} has a folder named {bad!r}: a URL that lost its "
                         f"'//'? write {bad}//... for an object store")
    if os.path.isdir(w.place.key) and w.how not in (How.FOLDER, How.SCRATCH) \
            and w.role not in ("output", "work store"):
        raise InputError(f"{_name(w)} is a folder; give a file name")
    if w.how is How.FOLDER and os.path.exists(w.place.key) and not os.path.isdir(w.place.key):
        raise InputError(f"{_name(w)} is a file, not a folder; choose a folder")
    folder = next((p for p in _parents(w.place.key) if os.path.exists(p)), "/")
    if not os.path.isdir(folder):
        raise InputError(f"{_name(w)} cannot be written: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{_name(w)} cannot be written: no permission to write in {folder}")


def _known_protocol(w) -> None:
    """A URL target names a storage fsspec knows (it is written there, never
    to a local folder of that name)."""
    from fsspec.registry import known_implementations, registry
    protocol = w.place.key.split("://", 1)[0]
    if protocol not in known_implementations and protocol not in registry:
        raise InputError(f"{_name(w)}: unknown URL protocol {protocol!r}; use a local "
                         "path or s3://, gs://, ...")
