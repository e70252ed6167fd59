"""The passes of a file run, each resumable from the work store.

:func:`execute` runs a :class:`~p2s_dask.planning.plan.Plan` on an executor: it
stages the input, computes (or reloads) the statistics, solves, computes
(or reloads) the prediction minima, predicts every chunk not yet done into
the sink, and commits the sink. Each pass is a small function; the Dask
graphs come from :mod:`.engine`, the storage from :mod:`.io` and
:mod:`.sinks`.
"""

from __future__ import annotations

import contextlib
import os
import time
import logging
from dataclasses import dataclass

import dask
import numpy as np

from .. import __version__
from ..graph import engine
from ..planning.chunking import patch_lanes
from ..core.layout import rows_order
from ..core.postprocess import fit_slope, intensity_shift, outside_range
from ..errors import DataError, InputError
from ..io import nifti_to_zarr, open_dwi
from ..io.malloc import return_freed_memory, reuse_freed_memory
from ..io.nifti_direct import open_nifti
from ..io.nifti_memory import as_blocks, read_whole
from ..io.sidecars import write_sidecars
from ..io.urls import describe_error, is_local, local_path
from ..io.zarr_store import compressor_for, store_state
from ..planning.plan import region_key
from .sinks import NiftiDirectSink, NiftiMemorySink, NiftiViaZarrSink, ZarrSink
from ..config.validate import describe_nonfinite
from .workstore import stats_from_arrays, stats_to_arrays

logger = logging.getLogger("p2s_dask")

# seconds to wait after each output chunk: lets tests interrupt a run mid-way
CHUNK_DELAY_ENV = "P2S_DASK_CHUNK_DELAY"
# a stage name: the run stops before that stage (it writes ``paused-STAGE``
# into the work store and sleeps) so that fault tests can kill it there
PAUSE_ENV = "P2S_DASK_PAUSE_BEFORE"


def execute(run, plan, work, executor, report) -> None:
    """Run every pass of ``plan``; stage times and reuse go into ``report``."""
    timed = _Timer(report)
    with timed("input", work):
        values = stage_input(run, plan, work, executor, report)
    if not any(run.radius):
        # every task allocates a block and its prediction of the same size:
        # let the allocator hand freed ones back instead of fresh pages
        reuse_freed_memory(int(np.prod(plan.chunks)) * run.shape[3] * 8)
    else:
        # with a patch the arithmetic dwarfs page faults, and the lanes'
        # buffers come in many sizes: give freed ones back rather than keep
        # the process at its high-water mark
        return_freed_memory()
    arr = engine.as_chunked(values, plan.chunks, run.radius)
    with timed("statistics", work):
        summary = statistics(run, plan, arr, work, executor, report)
        # the summary is saved in the work store and read by nothing else
        fitted = engine.fit_models(summary, run.groups, run.radius, run.model,
                                   run.opts.alpha, run.calc_dtype, spend=True)
    with timed("minima", work):
        post = post_processing(run, arr, fitted, work, executor, report)
    with timed("predict", work):
        sink = make_sink(run, plan, work, post.slope, sample_block(values, plan, executor))
        clipped = predict(run, plan, arr, fitted, post, sink, work, executor, report)
    if clipped:
        logger.warning("%d denoised values fell outside the range of %s and were "
                       "clipped to it", clipped, run.out_dtype)
    with timed("output", work), _errors("writing the output"):
        if run.out_kind == "nifti":
            # the sidecars first: until the image is renamed into place
            # nothing at OUT looks complete
            write_sidecars(run.out, bvals=run.bvals, bvecs=run.meta.bvecs,
                           metadata=provenance(run), storage_options=run.opts.storage_options)
        sink.commit(executor)


def provenance(run) -> dict:
    """The output's ``.json`` sidecar: the input's fields, then what made it
    (BIDS derivative ``Sources`` and ``Description``, our version and options)."""
    options = run.opts.result_fields()
    options.update(out_dtype=str(run.out_dtype), calc_dtype=str(run.calc_dtype))
    if run.mask is not None:
        options["mask"] = str(run.opts.mask)
    return {**(run.sidecar or {}),
            "Sources": [str(run.inp)],
            "Description": "Denoised with Patch2Self (p2s-dask, exact regression from "
                           "sufficient statistics)",
            "P2SDask": {"Version": __version__, "Options": options}}


class _Timer:
    def __init__(self, report):
        self.report = report

    @contextlib.contextmanager
    def __call__(self, name, work=None):
        if work is not None and os.environ.get(PAUSE_ENV) == name:
            _pause(name, work)
        t0 = time.perf_counter()
        yield
        self.report.stages[name] = time.perf_counter() - t0


def _pause(name, work):
    """The fault tests' hook (see PAUSE_ENV): wait here to be killed."""
    work.write_bytes(f"paused-{name}", b"")
    time.sleep(600)


@contextlib.contextmanager
def _errors(doing: str):
    """Failures inside a pass as one line: storage errors raised in tasks
    (a full disk, a lost endpoint) and lost workers."""
    try:
        yield
    except (InputError, KeyboardInterrupt):
        raise
    except Exception as exc:
        message = describe_error(exc) or _cluster_error(exc)
        if message is None:
            raise
        raise InputError(f"{doing}: {message}; rerun the same command to resume") from exc


def _cluster_error(exc) -> str | None:
    name = type(exc).__name__
    if name in ("KilledWorker", "FutureCancelledError", "CancelledError"):
        return f"the Dask workers were lost ({name})"
    if name in ("CommClosedError", "StreamClosedError", "TimeoutError"):
        return f"the connection to the Dask cluster was lost ({name})"
    return None


def stage_input(run, plan, work, executor, report):
    """The input as a dask array chunked by the plan."""
    so = run.opts.storage_options
    if plan.input_mode == "in-place":
        values, _ = open_nifti(run.inp, plan.chunks, meta=run.meta)
        return values
    if plan.input_mode == "memory":
        with _errors("reading the input"):
            whole = read_whole(run.inp, run.meta, so)
        return as_blocks(whole, plan.chunks, run.meta)
    if plan.input_mode == "store":
        values = open_dwi(run.inp, so)[0]
        if values.chunksize != (*plan.chunks, run.shape[3])[:4] or run.stored_chunks is None:
            # another tool's image (e.g. one chunk per volume), or blocks
            # the budget cannot hold: rechunked by Dask as it reads
            values = values.rechunk((*plan.chunks, -1))
        return values
    src = work.file("input.zarr")
    if store_state(src, so) == "complete":
        report.resumed.append("input")
    else:
        with _errors("staging the input"):
            nifti_to_zarr(run.inp, src, chunks=plan.chunks, memory_limit=run.budget,
                          bvals=run.bvals, bvecs=run.bvecs, overwrite=True,
                          storage_options=so, tmp_dir=_scratch_dir(run, work),
                          progress=run.opts.progress)
    return open_dwi(src, so)[0]


def _scratch_dir(run, work):
    """Scratch files go under --tmp-dir or the (local) work store."""
    if run.opts.tmp_dir and is_local(run.opts.tmp_dir):
        return local_path(run.opts.tmp_dir)
    if is_local(work.url):
        return local_path(work.url)
    return None


def statistics(run, plan, arr, work, executor, report):
    """Pass 1: the merged statistics, saved in the work store."""
    saved = work.load_arrays("statistics.npz")
    if saved is not None:
        report.resumed.append("statistics")
        stats, lowest = stats_from_arrays(saved)
        return engine.Summary(stats, lowest)
    # one lane of patch statistics per thread, as far as the plan's budget
    # holds them (the chunk policy left the rest for the blocks)
    per_worker = patch_lanes(run.shape, run.radius, plan.memory_per_worker,
                             plan.threads_per_worker)
    graph = engine.summarize(arr, run.groups, run.radius, run.mask,
                             lanes=executor.n_workers * per_worker)
    with _errors("computing the statistics"):
        # with a patch, no more threads than lanes: a thread without a lane
        # would read the blocks of the lanes' later steps ahead and hold them
        # (measured with one lane on 145x174x36x288: every block read within
        # 5 s of the start, 2.8 GB resident against 1.8)
        threads = per_worker if any(run.radius) else None
        summary = executor.compute(graph, "statistics", run.opts.progress, threads=threads)
    if summary.nonfinite:
        raise DataError(describe_nonfinite(summary.nonfinite, summary.first_nonfinite))
    for group, st in zip(run.groups, summary.stats):
        if st is not None and st.count < 2:
            raise DataError(f"the mask selects {st.count} voxel(s): too few to fit the "
                            f"{group.name} group")
    work.save_arrays("statistics.npz", **stats_to_arrays(summary.stats, summary.minima))
    return summary


@dataclass
class Post:
    """What the prediction pass does after the products: the per-volume
    shift, the scale of a scaled integer output (its ``scl_slope``), and
    whether values may fall outside an integer output (then they are
    counted as they are clipped)."""

    shift: object = None
    slope: float = 1.0
    count_outside: bool = False


def post_processing(run, arr, fitted, work, executor, report) -> Post:
    """Pass 2 (when needed): the prediction's per-volume range, from which
    the shift, the output's slope and the clipping forecast follow."""
    integer = np.issubdtype(run.out_dtype, np.integer)
    if not (run.shift or run.fit_scale):
        return Post(count_outside=integer)  # no range known: count as we go
    saved = work.load_arrays("range.npz")
    if saved is not None:
        report.resumed.append("minima")
        lowest, highest = saved["range"]
    else:
        graph = (engine.prediction_range if integer else engine.prediction_minima)(
            arr, fitted, run.radius)
        with _errors("computing the minima"):
            both = np.asarray(executor.compute(graph, "minima", run.opts.progress), float)
        lowest, highest = both if integer else (both, np.full_like(both, np.inf))
        work.save_arrays("range.npz", range=np.stack([lowest, highest]))
    shift = intensity_shift(fitted.minima, lowest) if run.shift else None
    if shift is not None:
        lowest, highest = lowest + shift, highest + shift
    if run.clip:
        lowest, highest = np.maximum(lowest, 0), np.maximum(highest, 0)
    if not integer:
        return Post(shift)
    slope = fit_slope(lowest.min(), highest.max(), run.out_dtype) if run.fit_scale else 1.0
    return Post(shift, slope, outside_range(lowest, highest, run.out_dtype, 1 / slope))


def make_sink(run, plan, work, slope=1.0, sample=None):
    """The sink of the plan's output mode; a store's codec is chosen by how
    well ``sample`` (some input values, see :func:`sample_block`) compresses."""
    out_meta = run.meta.for_values(run.out_dtype, run.shape, slope=slope)
    so = run.opts.storage_options
    if plan.output_mode == "nifti-direct":
        return NiftiDirectSink(run.out, work, out_meta)
    if plan.output_mode == "nifti-memory":
        return NiftiMemorySink(run.out, out_meta, so)
    codec = None if sample is None else compressor_for(sample, run.out_dtype)
    if plan.output_mode == "zarr":
        return ZarrSink(run.out, work, out_meta, plan.chunks, so, compressor=codec)
    return NiftiViaZarrSink(run.out, work, out_meta, plan.chunks, so,
                            memory_limit=run.budget, tmp_dir=_scratch_dir(run, work),
                            progress=run.opts.progress, compressor=codec)


def sample_block(values, plan, executor):
    """The input's middle block (all volumes), for choosing an output codec;
    None for a NIfTI written without a store, which has none."""
    if plan.output_mode in ("nifti-direct", "nifti-memory"):
        return None
    middle = tuple(len(c) // 2 for c in values.chunks[:3]) + (0,)
    return executor.compute(values.blocks[middle], "sample")


def predict(run, plan, arr, fitted, post, sink, work, executor, report) -> int:
    """Pass 3: every chunk not yet done, predicted and written by the sink.
    Returns how many values the cast to an integer output clipped."""
    done = work.done_regions()
    with _errors("creating the output"):
        resumed = sink.create(resume=bool(done))
    if not resumed:
        if done:
            work.remove("done")
        done = set()
    work.makedirs("done")
    executor.require_shared_files(_shared_files(sink))
    tasks = _write_tasks(plan, arr, fitted, run, post, sink, work, done)
    if done:
        report.resumed.append(f"{len(done)} output chunks")
    try:
        with _errors("writing the output"):
            counts = executor.compute(tasks, "predict", run.opts.progress) if tasks else []
            sink.finish(executor)
    except BaseException:
        sink.abort(executor)
        raise
    earlier = work.done_counts(done) if (done and post.count_outside) else 0
    return int(sum(counts)) + earlier


def _shared_files(sink):
    url = getattr(sink, "url", None)
    if url is None or not is_local(url) or not os.path.isdir(local_path(url)):
        return []
    return [os.path.join(local_path(url), "zarr.json")]


def _write_chunk(block, region, fitted, radius, post, clip, dtype, sink, work, key):
    # a volume-major block predicts straight into the writer's layout
    buffer = sink.buffer(region, dtype) if rows_order(block) == "F" else None
    counter = engine.Outside(dtype) if post.count_outside else None
    scale = None if post.slope == 1.0 else 1.0 / post.slope
    out = engine.predict_chunk(block, fitted, radius, post.shift, clip, dtype, out=buffer,
                               scale=scale, counter=counter)
    clipped = 0 if counter is None else counter.count
    # the marker goes after the data: a marked chunk is always fully written
    sink.write(region, out, lambda: work.mark_done(key, clipped))
    delay = float(os.environ.get(CHUNK_DELAY_ENV, 0) or 0)
    if delay:
        time.sleep(delay)
    return clipped


def _write_tasks(plan, arr, fitted, run, post, sink, work, done):
    """One task per chunk of the plan whose region is not done yet."""
    blocks = engine.with_halo(arr, run.radius).to_delayed()
    fitted_d = dask.delayed(fitted)
    write = dask.delayed(_write_chunk, pure=False)
    tasks = []
    for idx, region in plan.regions():
        key = region_key(region)
        if key not in done:
            tasks.append(write(blocks[idx + (0,)], region, fitted_d, run.radius, post,
                               run.clip, run.out_dtype, sink, work, key))
    return tasks
