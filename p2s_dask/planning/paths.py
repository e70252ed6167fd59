"""Every path of a run, decided in one place: the manifests of the fronts.

Pure functions of what the user named (no file is opened here; a path's
real target is resolved by :class:`~.manifest.Place`). Each front builds the
manifest of its whole invocation from these and hands it to
:func:`.checker.check` before anything is written.
"""

from __future__ import annotations

import hashlib
import os
import posixpath

from ..io.sidecars import sidecar_urls
from ..io.urls import is_local, join, kind_of
from .manifest import How, Manifest, Place, Read, Write, canonical

WORK_SUFFIX = ".p2s-work"
LOCK_SUFFIX = ".p2s-lock"


def work_url(out, tmp_dir) -> str:
    """Where the work store of OUT goes: next to it, or in ``tmp_dir`` under
    a name that tells two OUTs of the same name apart."""
    base = str(out).rstrip("/")
    if tmp_dir:
        name = base.rsplit("/", 1)[-1]
        digest = hashlib.sha1(canonical(base).encode()).hexdigest()[:8]
        return join(str(tmp_dir), f"{name}.{digest}{WORK_SUFFIX}")
    return base + WORK_SUFFIX


def lock_path(out) -> str:
    """The advisory lock of a local OUT (next to it)."""
    return canonical(out) + LOCK_SUFFIX


def sidecars_of(url) -> list:
    """The ``.bval``/``.bvec``/``.json`` beside a NIfTI (none for a store)."""
    try:
        return list(sidecar_urls(url).values()) if kind_of(url) == "nifti" else []
    except Exception:  # an unknown suffix: validation says so in its own words
        return []


def _is_file_arg(value) -> bool:
    return isinstance(value, (str, os.PathLike)) and bool(str(value))


def _groups_file(groups):
    if not _is_file_arg(groups):
        return None
    text = str(groups).strip().lower()
    return None if text == "shell" or text.startswith("batch:") else groups


def input_reads(inp, *, bvals=None, bvecs=None, mask=None, groups=None, label="") -> list:
    """What a run reads: IN (and the sidecars beside it), the gradient
    files, the mask and the groups file given as paths."""
    reads = [Read("input", Place.of(inp), label)]
    reads += [Read("input's sidecar", Place.of(s), label) for s in sidecars_of(inp)]
    named = (("--bvals file", bvals), ("--bvecs file", bvecs), ("--mask", mask),
             ("--groups file", _groups_file(groups)))
    reads += [Read(role, Place.of(v), label) for role, v in named if _is_file_arg(v)]
    return reads


def output_writes(out, work, *, label="", flag="OUT") -> list:
    """What a run writes for OUT: OUT itself (built under a partial name
    beside it), its sidecars when it is a NIfTI, its work store and its lock."""
    writes = [Write("output", Place.of(out), How.CREATE, label, flag)]
    writes += [Write("sidecar", Place.of(s), How.CREATE, label, f"{flag}'s sidecar")
               for s in sidecars_of(out)]
    writes.append(Write("work store", Place.of(work), How.SCRATCH, label, "work store"))
    if is_local(out):
        writes.append(Write("lock", Place.of(lock_path(out)), How.SCRATCH, label, "lock"))
    return writes


def run_manifest(inp, out, opts, *, bvals=None, bvecs=None, label="") -> Manifest:
    """The manifest of one denoising run (IN -> OUT with ``opts``)."""
    work = work_url(out, opts.tmp_dir)
    reads = input_reads(inp, bvals=bvals, bvecs=bvecs, mask=opts.mask, groups=opts.groups,
                        label=label)
    writes = output_writes(out, work, label=label)
    return Manifest(tuple(reads), tuple(writes)) + tmp_manifest(opts.tmp_dir)


def tmp_manifest(tmp_dir) -> Manifest:
    """``--tmp-dir``: a folder made if missing, holding work stores and scratch."""
    if not tmp_dir:
        return Manifest()
    place = Place.of(tmp_dir)
    return Manifest(writes=(Write("tmp dir", place, How.FOLDER, flag="--tmp-dir"),),
                    scratch_roots=(place.key,))


def front_manifest(*, report_json=None, log_file=None) -> Manifest:
    """The files a front writes for the whole invocation."""
    writes = []
    if report_json:
        writes.append(Write("report", Place.of(report_json), How.CREATE, flag="--report-json"))
    if log_file:
        writes.append(Write("log", Place.of(log_file), How.APPEND, flag="--log-file"))
    return Manifest(writes=tuple(writes))


def folders_between(root, leaf_parent, *, flag, label="") -> Manifest:
    """The folders a run makes from ``root`` (included) down to
    ``leaf_parent``: each a :attr:`How.FOLDER` target."""
    root_s, leaf = str(root).rstrip("/"), str(leaf_parent).rstrip("/")
    chain = []
    while leaf and leaf != root_s and leaf.startswith(root_s + "/"):
        chain.append(leaf)
        leaf = posixpath.dirname(leaf)
    chain.append(root_s)
    return Manifest(writes=tuple(Write("folder", Place.of(p), How.FOLDER, label, flag)
                                 for p in reversed(chain)))
