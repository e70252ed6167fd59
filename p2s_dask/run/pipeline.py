"""File to file denoising: NIfTI or Zarr in, NIfTI or Zarr out, bounded memory.

The run, in order:

1. :func:`prepare` validates everything that can be checked up front (the
   options, IN and OUT, the header, the gradients, the mask) and touches
   nothing;
2. an executor is opened (local threads or a cluster) and a :class:`Plan`
   is made for its workers' budget;
3. the work store is started or resumed by fingerprint (:mod:`.workstore`);
4. the passes of the plan run: stage the input, statistics, solve, minima,
   predict into a sink, commit the sink (:mod:`.sinks`).

Bad data found during the run (NaN, a corrupt stream) removes the work
store; any other failure (Ctrl-C, a full disk, a lost endpoint) leaves it
for the same command to resume. Nothing at OUT looks complete before the
commit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from .. import __version__
from ..core.postprocess import resolve_postprocess
from ..errors import DataError, InputError
from .executors import open_executor
from ..config.groups import make_groups
from ..config.groupspec import group_labels
from ..io import fs_and_path, fsl_siblings, kind_of, read_bvals, read_bvecs, user_errors
from ..io.budget import parse_memory_limit
from ..io.urls import exists, is_local, join, local_path
from ..io.sidecars import read_json_sidecar, sidecar_urls
from ..io.zarr_store import store_state
from .memory import PeakMemory
from ..config.options import Options, check_run_options, is_auto
from ..planning.plan import Data, Endpoint, Settings, Workers, make_plan
from .passes import execute
from ..planning.checker import check
from ..planning.manifest import canonical
from ..planning.paths import QC_SECTION, qc_targets, run_manifest, work_url
from .lock import output_lock
from ..graph.engine import local_threads
from ..config.validate import (auto_settings, check_bvals, check_fit_voxels, check_options,
                               check_precision, check_shape)
from .workstore import WorkStore, content_hash, fingerprint

logger = logging.getLogger("p2s_dask")
# the options object of earlier releases
DenoiseOptions = Options


@dataclass
class Report:
    """What a run did: seconds per stage, voxel rate, peak memory."""

    output: str
    shape: tuple
    stages: dict = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss: int = 0
    resumed: list = field(default_factory=list)
    started_over: str = ""
    plan: dict = field(default_factory=dict)
    # what the QC report shows of the run: its input and options, and the
    # QcResult (p2s_dask.report.results) of a run asked for a report
    input: str = ""
    options: dict = field(default_factory=dict)
    qc: object = None
    # a radius or penalty left to the data: the choice and its table of
    # held-out errors (p2s_dask.run.auto.decide)
    cross_validation: dict | None = None
    # the report's figures, drawn while the output pass runs (a Future; see
    # p2s_dask.report.draw_in_background); not part of the record
    drawing: object = None

    @property
    def voxels_per_second(self) -> float:
        return float(np.prod(self.shape[:3])) / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        out = dict(output=self.output, shape=list(self.shape), stages=self.stages,
                   seconds=self.seconds, peak_rss=self.peak_rss, resumed=self.resumed,
                   started_over=self.started_over, plan=self.plan,
                   voxels_per_second=self.voxels_per_second, input=self.input,
                   version=__version__, options=self.options)
        if self.qc is not None:
            out["qc"] = self.qc.as_json()
        if self.cross_validation is not None:
            out["cross_validation"] = self.cross_validation
        return out

    def summary_line(self) -> str:
        from dask.utils import format_bytes
        return (f"p2s-dask: denoised {'x'.join(map(str, self.shape))} in "
                f"{self.seconds:.1f} s ({self.voxels_per_second:,.0f} voxels/s), "
                f"peak memory {format_bytes(self.peak_rss)} -> {self.output}")


@dataclass
class Run:
    """Everything known about a run after validation (plain data)."""

    inp: str
    out: str
    in_kind: str
    out_kind: str
    shape: tuple
    meta: object  # DwiMeta of the input (header or store)
    bvals: np.ndarray
    bvecs: object
    groups: list
    mask: object  # bool ndarray or None
    radius: tuple
    model: str
    out_dtype: object
    calc_dtype: object
    shift: bool
    clip: bool
    budget: int
    work_url: str
    opts: Options
    stored_chunks: tuple | None = None  # a Zarr input's chunks
    sidecar: dict | None = None  # the input's BIDS .json sidecar
    fit_scale: bool = False  # an integer output with a fitted scl_slope
    # the QC report's files this run writes ({manifest role: Write}); a run
    # whose manifest gives it a noise map summarises its residuals
    qc: dict = field(default_factory=dict)
    # ridge's and lasso's penalty (a number; 'auto' until chosen)
    alpha: object = 1.0
    # what is left to the data (AutoSettings; radius is then the largest
    # scored) and, once chosen, the choice (see p2s_dask.run.auto)
    auto: object = None
    cross_validation: dict | None = None

    def input_fingerprint(self) -> dict:
        """The input's fingerprint (:func:`~.workstore.fingerprint`), read
        once per run: the work store's identity and the output's provenance
        both record it, and a store's is a sample of its chunks (0.3 s for
        a 350 MB store, measured: twice made the Zarr path 25% slower)."""
        cached = self.__dict__.get("_input_fingerprint")
        if cached is None:
            cached = fingerprint(self.inp, self.opts.storage_options)
            self.__dict__["_input_fingerprint"] = cached
        return cached


def denoise_file(inp, out, *, bvals=None, bvecs=None, options: Options | None = None,
                 executor=None, manifest=None, **run_options) -> Report:
    """Denoise a NIfTI or Zarr dataset into a NIfTI or Zarr file.

    Parameters
    ----------
    inp, out : str
        Paths or fsspec URLs ending in ``.nii``, ``.nii.gz`` or ``.zarr``.
    bvals, bvecs : str or array-like, optional
        FSL files (or arrays). By default those stored in a Zarr input, or
        ``IN``'s FSL-named siblings (``dwi.bval`` / ``dwi.bvec``).
    options : Options, optional
        Every option of the run (see :class:`p2s_dask.config.options.Options`).
    executor : Executor, optional
        An open executor (:func:`p2s_dask.run.executors.open_executor`) shared by
        several runs; by default one is opened for this run and closed after.
    manifest : Manifest, optional
        The checked manifest of the invocation this run is part of (a batch,
        a BIDS dataset, a command with a report and a log); by default the
        run's own is built and checked here.
    **run_options
        Fields of :class:`Options` given directly (e.g. ``memory_limit``,
        ``workers``, ``overwrite``, ``tmp_dir``), overriding ``options``.

    Returns
    -------
    Report
    """
    start = time.perf_counter()
    opts = (options or Options()).with_(**run_options)
    run = prepare(str(inp), str(out), bvals, bvecs, opts, manifest)
    if manifest is not None:
        run.qc = qc_targets(manifest, inp)
    report = Report(output=str(out), shape=run.shape, input=str(inp),
                    options=run_options_record(run))
    with output_lock(out), PeakMemory() as peak:
        with _executor(executor, opts, run.budget) as ex:
            _run_plan(run, ex, report)
    report.seconds = time.perf_counter() - start
    report.peak_rss = peak.peak
    if report.qc is not None and QC_SECTION in run.qc:
        # a BIDS run's reportlets, for its subject's page (put together by
        # the front once every run is done)
        from ..report import write_reportlets
        write_reportlets(report.as_dict(), report.qc, run.qc, opts.storage_options,
                         report.drawing)
    return report


def run_options_record(run: Run) -> dict:
    """The options that made the run's numbers, as its sidecar records them."""
    options = run.opts.result_fields()
    options.update(out_dtype=str(run.out_dtype), calc_dtype=str(run.calc_dtype))
    if run.mask is not None:
        options["mask"] = str(run.opts.mask)
    return options


def _executor(executor, opts, budget):
    """The given executor (left open), or a new one closed after the run."""
    if executor is not None:
        return contextlib.nullcontext(executor)
    return open_executor(scheduler=opts.scheduler, scheduler_file=opts.scheduler_file,
                         workers=opts.workers, threads=opts.threads, memory_limit=budget)


def _run_plan(run: Run, executor, report: Report) -> None:
    """Plan, start or resume the work store, execute; remove the work store
    after success or bad data (kept after any other failure, to resume)."""
    plan = plan_for(run, executor)
    report.plan = plan.as_dict()
    work = WorkStore(run.work_url, run.opts.storage_options)
    report.started_over = work.start(identity(run, plan)) or ""
    if report.started_over:
        logger.warning("starting over: %s", report.started_over)
    try:
        execute(run, plan, work, executor, report)
    except DataError:
        work.remove()  # bad data: nothing of this run is worth keeping
        raise
    work.remove()


def prepare(inp, out, bvals, bvecs, opts: Options, manifest=None) -> Run:
    """Validate a run; read headers and small files only, write nothing.

    The run's paths are checked against the safety rules here, unless the
    front checked them as part of its invocation's ``manifest`` (then the
    run's own targets must all be in it)."""
    checked_options(opts)
    check_paths(inp, out, bvals, bvecs, opts, manifest)
    return describe_run(inp, out, bvals, bvecs, opts)


def checked_options(opts):
    """``(budget, radius, model, out_dtype)`` of valid options."""
    check_run_options(opts)
    budget = parse_memory_limit(opts.memory_limit)
    radius, model, out_dtype = check_options(
        patch_radius=opts.patch_radius, model=opts.model, alpha=opts.alpha,
        version=opts.version, out_dtype=opts.out_dtype,
        max_patch_radius=opts.max_patch_radius)
    check_precision(opts.precision, None, None)
    return budget, radius, model, out_dtype


def describe_run(inp, out, bvals, bvecs, opts: Options) -> Run:
    """The validated :class:`Run` of IN -> OUT (no path rules: see
    :func:`prepare`); reads headers and small files only."""
    budget, radius, model, out_dtype = checked_options(opts)
    in_kind, out_kind = kind_of(inp), kind_of(out)
    wurl = work_url(out, opts.tmp_dir)
    _require_input(inp, opts.storage_options)
    shape, meta, stored_chunks = _probe(inp, in_kind, opts.storage_options)
    check_shape(shape)
    bvals, bvecs = _gradients(inp, in_kind, bvals, bvecs, meta, opts.storage_options)
    bvals = check_bvals(bvals, shape[3])
    if bvecs is not None and np.asarray(bvecs).size != 3 * shape[3]:
        raise InputError(f"bvecs has {np.asarray(bvecs).size // 3} vectors but the data "
                         f"has {shape[3]} volumes")
    # outputs carry the gradients (a Zarr store's arrays, a NIfTI's sidecars)
    meta = meta.with_gradients(bvals, None if bvecs is None else
                               np.asarray(bvecs, float).reshape(3, -1))
    sidecar = read_json_sidecar(inp, opts.storage_options) if in_kind == "nifti" \
        else meta.sidecar
    labels = group_labels(opts.groups, bvals, opts.b0_threshold, opts.storage_options)
    groups = make_groups(bvals, shape[3], b0_threshold=opts.b0_threshold,
                         b0_denoising=opts.b0_denoising, groups=labels)
    mask = _load_mask(opts.mask, shape, opts.storage_options, meta.affine)
    auto = auto_settings(opts.patch_radius, model, opts.alpha, opts.max_patch_radius)
    # 'auto': what the smallest candidate risks (the choice avoids the rest)
    check_fit_voxels(groups, mask, shape, radius if auto is None else auto.radii[0], model,
                     1.0 if is_auto(opts.alpha) else opts.alpha)
    # scaled integer input comes back as its integer type with a fitted
    # scl_slope (as nibabel writes it), unless --out-dtype says otherwise
    fit_scale = out_dtype is None and meta.scaled and np.issubdtype(meta.raw_dtype, np.integer)
    if out_dtype is None:
        out_dtype = meta.raw_dtype if fit_scale else _default_out_dtype(meta)
    calc_dtype = check_precision(opts.precision, meta.value_dtype, out_dtype)
    shift, clip = resolve_postprocess(opts.shift_intensity, opts.clip_negative_vals)
    return Run(inp, out, in_kind, out_kind, shape, meta, bvals, bvecs, groups, mask, radius,
               model, np.dtype(out_dtype), calc_dtype, shift, clip, budget, wurl, opts,
               stored_chunks, sidecar, fit_scale, alpha=opts.alpha, auto=auto)


def _require_input(inp, storage_options):
    with user_errors(inp, "reading"):
        if not exists(inp, storage_options):
            raise InputError(f"input not found: {inp}{_bucket_note(inp, storage_options)}")


def check_paths(inp, out, bvals, bvecs, opts, manifest=None) -> None:
    """Check the run's manifest (its own, or that its front checked)."""
    own = run_manifest(inp, out, opts, bvals=bvals, bvecs=bvecs)
    if manifest is None:
        check(own, overwrite=opts.overwrite, ours=lambda: unfinished_work(out, opts),
              storage_options=opts.storage_options)
        return
    planned = {w.place.key for w in manifest.writes}
    stray = [w.place.url for w in own.writes if w.place.key not in planned]
    if stray:  # a front that forgot a target: a bug, never a user's error
        raise RuntimeError(f"run writes outside its checked manifest: {stray}")


def unfinished_work(out, opts) -> set:
    """Keys of what exists at OUT because of our own unfinished run (its work
    store holds a recorded run): an incomplete store of ours, and a NIfTI
    OUT's sidecars, which such a run writes before its image. The work store
    decides by fingerprint whether any of it is reused."""
    so = opts.storage_options
    wurl = work_url(out, opts.tmp_dir)
    if not exists(join(wurl, "run.json"), so):
        return set()
    ours = {canonical(u) for u in sidecar_urls(out).values()} if kind_of(out) == "nifti" \
        else set()
    if kind_of(out) == "zarr" and store_state(out, so) == "incomplete":
        ours.add(canonical(out))
    return ours


def plan_for(run: Run, executor):
    """The :class:`~p2s_dask.planning.plan.Plan` of ``run`` on ``executor``'s
    workers: the facts are gathered here, every decision is the plan's
    (:func:`p2s_dask.planning.plan.make_plan`)."""
    data = Data(run.shape, run.meta.raw_dtype, run.out_dtype, bool(run.meta.scaled),
                run.stored_chunks, np.dtype(run.calc_dtype).itemsize)
    workers = Workers(executor.n_workers, executor.memory_per_worker,
                      executor.threads_per_worker, bool(executor.in_process),
                      bool(executor.is_local))
    # the minima pass gives the range that the shift and a fitted slope need
    settings = Settings(run.radius, bool(run.shift or run.fit_scale), run.opts.chunks,
                        is_local(run.work_url), run.budget,
                        folds=run.auto.n_folds if run.auto is not None else 0,
                        scratch_free=free_disk(run.work_url),
                        penalty_grid=run.auto is not None and run.auto.penalty_grid,
                        client_threads=run.opts.threads or local_threads())
    return make_plan(data, Endpoint(run.in_kind, str(run.inp), is_local(run.inp)),
                     Endpoint(run.out_kind, str(run.out), is_local(run.out)), workers,
                     settings)


def free_disk(url) -> int | None:
    """Bytes free on the disk of a local ``url`` (its nearest existing
    folder: the work store may not exist yet); None when it is not local."""
    if not is_local(url):
        return None
    path = os.path.abspath(local_path(url))
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def identity(run: Run, plan) -> dict:
    """What a resumed run must share with the one that made the work store."""
    options = run.opts.result_fields()
    options.pop("mask", None)  # by content below, wherever the file lives
    return {
        "p2s_dask": __version__,
        "input": {"url": canonical(run.inp),
                  **run.input_fingerprint()},
        "output": canonical(run.out),
        "mask": None if run.mask is None else content_hash(run.mask),
        "bvals": [float(b) for b in run.bvals],
        "groups": [[g.name, list(g.indices), g.denoise] for g in run.groups],
        "options": {**options, "out_dtype": str(run.out_dtype),
                    "calc_dtype": str(run.calc_dtype)},
        # the modes as the strings earlier work stores recorded
        "plan": plan.identity(),
    }


def _bucket_note(url, storage_options) -> str:
    """Why an object-store ``url`` is missing, when it is its bucket."""
    if is_local(url):
        return ""
    fs, path = fs_and_path(url, storage_options)
    bucket = path.split("/", 1)[0]
    try:
        # s3fs probes a bucket with HEAD: a refusal reads as absence too
        missing = bool(bucket) and not fs.exists(bucket)
    except Exception:
        return ""
    return f" (the bucket {bucket} does not exist or is not accessible)" if missing else ""


def _gradients(inp, kind, bvals, bvecs, meta, storage_options):
    """bvals/bvecs: given, else stored in a Zarr input, else FSL siblings."""
    if bvals is not None:
        bvals = read_bvals(bvals, storage_options) if isinstance(bvals, (str, os.PathLike)) \
            else np.asarray(bvals, float)
    if bvecs is not None and isinstance(bvecs, (str, os.PathLike)):
        bvecs = read_bvecs(bvecs, storage_options)
    if bvals is None and kind == "zarr" and meta.bvals is not None:
        bvals = np.asarray(meta.bvals, float)
        bvecs = meta.bvecs if bvecs is None else bvecs
    if bvals is None and kind == "nifti":
        sib_bval, sib_bvec = fsl_siblings(inp, storage_options)
        if sib_bval is None:
            raise InputError(f"no bvals given and none found next to {inp} "
                             "(expected a .bval file with the same name); use --bvals")
        bvals = read_bvals(sib_bval, storage_options)
        if bvecs is None and sib_bvec is not None:
            bvecs = read_bvecs(sib_bvec, storage_options)
    if bvals is None:
        raise InputError(f"{inp} stores no bvals; use --bvals")
    return bvals, bvecs


def _probe(url, kind, storage_options):
    """Shape and meta of the input, from its header or its store."""
    if kind == "zarr":
        from ..io.zarr_store import probe_store
        return probe_store(url, storage_options)
    from ..io.nifti_stream import NiftiReader
    reader = NiftiReader(url, storage_options=storage_options)
    try:
        return tuple(reader.meta.shape), reader.meta, None
    finally:
        reader.close()


def _default_out_dtype(meta):
    """The input's dtype; float32 for float input (float64 for float64)."""
    if meta.scaled or np.issubdtype(meta.raw_dtype, np.floating):
        return np.dtype(np.float32) if meta.raw_dtype.itemsize <= 4 else np.dtype(np.float64)
    return meta.raw_dtype


# how far a mask's affine may be from the data's and still be its grid:
# headers hold float32 (about 1e-7 of a rotation's terms, 1e-5 mm of a
# translation of 100 mm); a mask of another space is off by far more
MASK_LINEAR_TOLERANCE, MASK_SHIFT_TOLERANCE = 1e-5, 1e-3


def _check_mask_grid(mask, mask_affine, affine) -> None:
    """Refuse a mask whose voxels are not the data's (another affine): its
    shape alone may match a grid of another space."""
    if affine is None or mask_affine is None:
        return
    diff = np.abs(np.asarray(mask_affine, float) - np.asarray(affine, float))
    linear, shift = diff[:3, :3].max(), diff[:3, 3].max()
    if linear > MASK_LINEAR_TOLERANCE or shift > MASK_SHIFT_TOLERANCE:
        raise InputError(f"--mask {mask} is not on the data's grid: its affine differs "
                         f"(by {shift:.3g} mm in translation, {linear:.3g} in the linear "
                         "part); resample it to the data")


def _load_mask(mask, shape, storage_options, affine=None):
    """The mask as a bool array of the data's spatial shape (None: no mask),
    on the data's grid (``affine``, the data's; None: not checked)."""
    if mask is None:
        return None
    import gzip
    import warnings

    import nibabel as nib
    from nibabel.imageglobals import logger as nib_logger
    fs, path = fs_and_path(mask, storage_options)
    with user_errors(mask, "reading"), fs.open(path, "rb") as fh:
        data = fh.read()
    # nibabel reports a bad header on its own log and in warnings before it
    # raises: the user gets our one line instead
    level = nib_logger.level
    nib_logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if data[:2] == b"\x1f\x8b":  # a mask is small: gunzip it whole
                data = gzip.decompress(data)
            img = nib.Nifti1Image.from_bytes(data)
            arr = np.asanyarray(img.dataobj)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--mask {mask} is not a readable NIfTI file ({reason})") from None
    finally:
        nib_logger.setLevel(level)
    if arr.shape[:3] != shape[:3] or (arr.ndim == 4 and arr.shape[3] != 1) or arr.ndim > 4:
        raise InputError(f"--mask has shape {arr.shape} but the data's spatial shape is "
                         f"{shape[:3]}")
    _check_mask_grid(mask, img.affine, affine)
    arr = arr.reshape(shape[:3]) > 0
    if np.count_nonzero(arr) < 2:
        raise InputError(f"--mask {mask} selects {np.count_nonzero(arr)} voxel(s): too "
                         "few to fit a regression")
    return arr


def _radius_words(run: Run) -> str:
    if run.auto is None or not run.auto.radius_auto:
        return str(list(run.radius))
    return f"auto (0 up to {list(run.radius)}, chosen by cross-validation)"


def _alpha_words(run: Run) -> str:
    if run.auto is not None and run.auto.alpha is None:
        return " (alpha auto: chosen by cross-validation)"
    return ""


def dry_run_lines(inp, out, opts: Options, bvals=None, bvecs=None) -> list:
    """What ``--dry-run`` prints for one run: the data and the plan the run
    would make on this executor (opened for the workers' budgets: a
    scheduler is asked, nothing is written)."""
    run = describe_run(str(inp), str(out), bvals, bvecs, opts)
    with _executor(None, opts, run.budget) as ex:
        plan = plan_for(run, ex)
        where = (f"{ex.n_workers} worker(s) x {ex.threads_per_worker} thread(s), "
                 f"{ex.memory_per_worker / 2**30:.2f} GiB each")
    head = [f"run: {inp} -> {out}",
            f"  data: {'x'.join(map(str, run.shape))} {run.meta.raw_dtype}"
            f"{' (scaled)' if run.meta.scaled else ''}, radius {_radius_words(run)}, "
            f"model {run.model}{_alpha_words(run)}, output {run.out_dtype}",
            "  groups: " + ", ".join(f"{g.name} ({len(g.indices)} volumes"
                                      f"{'' if g.denoise else ', passed through'})"
                                      for g in run.groups),
            f"  executor: {where}"]
    return head + ["  " + line for line in plan.describe()]
