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


# the figures of a run's QC report (p2s_dask.report.figures draws them) and
# the manifest roles of the report's files
QC_FIGURES = ("mosaic", "noise", "residuals", "histogram")
QC_PAGE, QC_NOISE, QC_SECTION = "qc report", "noise map", "qc section"
QC_MATPLOTLIB = "matplotlib cache"


def matplotlib_dir(tmp_dir=None) -> str:
    """Where matplotlib keeps its configuration and font cache while a run
    draws its report (it writes the cache the first time it draws): the
    user's ``MPLCONFIGDIR`` when set, else a folder of ours under
    ``--tmp-dir`` (a local one) or the system's temporary folder, kept
    between runs, never in the user's home. The fronts set it as
    ``MPLCONFIGDIR`` before matplotlib is first imported."""
    if os.environ.get("MPLCONFIGDIR"):
        return os.environ["MPLCONFIGDIR"]
    # the folder tempfile would choose, named without its probe (which
    # writes a file there)
    system = next((os.environ[k] for k in ("TMPDIR", "TEMP", "TMP") if os.environ.get(k)),
                  "/tmp")
    base = str(tmp_dir) if tmp_dir and is_local(tmp_dir) else system
    who = os.getuid() if hasattr(os, "getuid") else "user"
    return os.path.join(base, f"p2s-dask-matplotlib-{who}")


def qc_figure_role(name) -> str:
    """The manifest role of the QC figure ``name`` (one of :data:`QC_FIGURES`)."""
    return f"qc figure {name}"


def noise_map_url(out) -> str:
    """Where ``denoise --report`` writes OUT's noise map: beside OUT, its
    name without the image extension and ``_noise.nii.gz`` (``o.nii.gz`` ->
    ``o_noise.nii.gz``, ``o.zarr`` -> ``o_noise.nii.gz``)."""
    base = str(out).rstrip("/")
    for ext in (".nii.gz", ".nii", ".zarr"):
        if base.endswith(ext):
            base = base[:-len(ext)]
            break
    return base + "_noise.nii.gz"


def report_manifest(label, *, noise=None, reportlets=None, pages=(), matplotlib=None,
                    flag="--report"):
    """What a QC report writes.

    Parameters
    ----------
    label : str
        The run whose noise map and reportlets these are (its input, as a
        batch labels it); the run writes them, and makes its summaries
        only when its manifest holds its noise map.
    noise : str, optional
        The run's noise map.
    reportlets : dict, optional
        ``{role: path}`` of the run's figures (:func:`qc_figure_role`) and
        its section (:data:`QC_SECTION`), for a page put together later.
    pages : sequence of str
        The pages the front writes (the invocation's own targets).
    matplotlib : str, optional
        The folder matplotlib may write its caches into
        (:func:`matplotlib_dir`), for the invocation that draws figures.
    flag : str
        The option or argument that named them, for messages.

    Returns
    -------
    Manifest
    """
    writes = [Write(QC_PAGE, Place.of(p), How.CREATE, flag=flag) for p in pages]
    if noise:
        writes.append(Write(QC_NOISE, Place.of(noise), How.CREATE, str(label), flag))
    writes += [Write(role, Place.of(url), How.CREATE, str(label), flag)
               for role, url in (reportlets or {}).items()]
    roots = ()
    if matplotlib:
        place = Place.of(matplotlib)
        writes.append(Write(QC_MATPLOTLIB, place, How.SCRATCH, flag=flag))
        roots = (place.key,)
    return Manifest(writes=tuple(writes), scratch_roots=roots)


def qc_targets(manifest: Manifest, label) -> dict:
    """``{role: Write}`` of the QC report's files that the run ``label``
    writes itself (its noise map and reportlets) in ``manifest``."""
    mine = {QC_NOISE, QC_SECTION} | {qc_figure_role(n) for n in QC_FIGURES}
    return {w.role: w for w in manifest.writes if w.run == str(label) and w.role in mine}
