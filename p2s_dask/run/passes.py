"""The passes of a file run, each resumable from the work store.

:func:`execute` runs a :class:`~p2s_dask.planning.plan.Plan` on an executor:
it iterates the plan's passes in their order and hands each to its function
(:data:`PASSES`, by name): stage or read the input, compute (or reload) the
statistics, with a radius or penalty left to the data choose them (the
crossval pass, see :mod:`.auto`), solve, compute (or reload) the prediction's
range, predict every chunk not yet done into the sink, commit the sink.
Nothing here decides what
the plan decides (modes, chunks, lanes, thread caps, memory, which passes):
each function reads it from the plan or its :class:`Pass`. The Dask graphs
come from :mod:`.engine`, the storage from :mod:`.io` and :mod:`.sinks`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import logging
from dataclasses import dataclass, replace

import dask
import numpy as np

from .. import __version__
from ..graph import engine
from ..core.layout import rows_order
from ..core.postprocess import fit_slope, intensity_shift, outside_range
from ..errors import DataError, InputError
from ..io import nifti_to_zarr, open_dwi
from ..io.malloc import return_freed_memory, reuse_freed_memory
from ..io.nifti_direct import open_nifti, read_with_halo
from ..io.nifti_memory import as_blocks, read_whole
from ..io.sidecars import write_sidecars
from ..io.urls import describe_error, is_local, local_path
from ..io.zarr_store import compressor_for, store_state
from ..planning.plan import InputMode, OutputMode, Pass, Plan, region_key
from .sinks import NiftiDirectSink, NiftiMemorySink, NiftiViaZarrSink, Stream, ZarrSink
from ..planning.paths import QC_NOISE
from ..report import draw_in_background, results as qc_results, write_noise_map
from ..report import summaries as qc_summaries
from ..config.validate import describe_nonfinite
from . import auto
from .provenance import result_fingerprint
from .threads import solving_blas
from .workstore import stats_from_arrays, stats_to_arrays

logger = logging.getLogger("p2s_dask")

# seconds to wait after each output chunk: lets tests interrupt a run mid-way
CHUNK_DELAY_ENV = "P2S_DASK_CHUNK_DELAY"
# a stage name: the run stops before that stage (it writes ``paused-STAGE``
# into the work store and sleeps) so that fault tests can kill it there
PAUSE_ENV = "P2S_DASK_PAUSE_BEFORE"


@dataclass
class Execution:
    """A plan being run: what it runs on and what its passes hand on.

    Attributes
    ----------
    run : Run
        The validated run (:class:`p2s_dask.run.pipeline.Run`).
    plan : Plan
    work : WorkStore
    executor : Executor
    report : Report
        Stage times and reuse go here.
    values, arr : dask.array.Array
        The input as read (chunked by the plan), and as the passes see it.
    summary, fitted, post, sink
        The statistics, the solved models, the range's consequences and the
        output's sink, each from the pass that makes it.
    """

    run: object
    plan: Plan
    work: object
    executor: object
    report: object
    values: object = None
    arr: object = None
    summary: object = None
    fitted: object = None
    post: object = None
    sink: object = None


def execute(run, plan: Plan, work, executor, report) -> None:
    """Run the passes of ``plan`` in its order, each timed into ``report``.

    Parameters
    ----------
    run : Run
    plan : Plan
    work : WorkStore
    executor : Executor
    report : Report
    """
    state = Execution(run, plan, work, executor, report)
    timed = _Timer(report)
    for step in plan.passes:
        if step.name not in PASSES:
            raise ValueError(f"the plan has a pass {step.name!r} that no function runs")
        with timed(step.name, work):
            PASSES[step.name](state, step)


def provenance(run, qc=None) -> dict:
    """The output's ``.json`` sidecar: the input's fields, then what made it
    (BIDS derivative ``Sources`` and ``Description``, our version and options)
    and, from a run's QC report (``qc``, a QcResult), the volumes it flagged
    (``FlaggedVolumes``, 0-based); with a radius or penalty left to the data,
    the choice and its table of held-out errors (``CrossValidation``)."""
    options = run.opts.result_fields()
    options.update(out_dtype=str(run.out_dtype), calc_dtype=str(run.calc_dtype))
    if run.mask is not None:
        options["mask"] = str(run.opts.mask)
    ours = {"Version": __version__, "Options": options, "Fingerprint": result_fingerprint(run)}
    if qc is not None:
        ours["FlaggedVolumes"] = qc.flagged_volumes
    if run.cross_validation is not None:
        ours["CrossValidation"] = auto.sidecar_record(run.cross_validation)
    return {**(run.sidecar or {}),
            "Sources": list(run.opts.sources or [str(run.inp)]),
            "Description": "Denoised with Patch2Self (p2s-dask, exact regression from "
                           "sufficient statistics)",
            "P2SDask": ours}


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


# -- the input ------------------------------------------------------------------

def input_pass(state: Execution, step: Pass) -> None:
    """Read the input into memory, or stage it into the work store (the
    plan has this pass only for the modes that need it)."""
    state.values = SOURCES[state.plan.input_mode](state, step)


def _in_place(state, step):
    values, _ = open_nifti(state.run.inp, state.plan.chunks, meta=state.run.meta)
    return values


def _read_whole(state, step):
    run = state.run
    with _errors("reading the input"):
        whole = read_whole(run.inp, run.meta, run.opts.storage_options)
    return as_blocks(whole, state.plan.chunks, run.meta)


def _store(state, step):
    run, chunks = state.run, state.plan.chunks
    values = open_dwi(run.inp, run.opts.storage_options)[0]
    if values.chunksize != (*chunks, run.shape[3])[:4] or run.stored_chunks is None:
        # another tool's image (e.g. one chunk per volume), or blocks the
        # budget cannot hold: rechunked by Dask as it reads
        values = values.rechunk((*chunks, -1))
    return values


def _staged(state, step):
    """The input converted into the work store within the pass's memory
    (kept there: a rerun reuses a complete one)."""
    run, work, so = state.run, state.work, state.run.opts.storage_options
    src = work.file("input.zarr")
    if store_state(src, so) == "complete":
        state.report.resumed.append("input")
    else:
        with _errors("staging the input"):
            nifti_to_zarr(run.inp, src, chunks=state.plan.chunks, memory_limit=step.memory,
                          bvals=run.bvals, bvecs=run.bvecs, overwrite=True,
                          storage_options=so, tmp_dir=_scratch_dir(run, work),
                          progress=run.opts.progress)
    return open_dwi(src, so)[0]


# where each input mode's blocks come from
SOURCES = {InputMode.IN_PLACE: _in_place, InputMode.MEMORY: _read_whole,
           InputMode.STAGE: _staged, InputMode.STORE: _store}


def _blocks(state: Execution):
    """The input as the passes see it: chunked by the plan, with the halo
    the radius needs. A mode without an input pass opens it here (a
    header or a store's metadata: nothing is read yet)."""
    if state.arr is not None:
        return state.arr
    plan, run = state.plan, state.run
    if state.values is None:
        if plan.input_mode not in SOURCES:
            raise ValueError(f"a file run cannot read a {plan.input_mode.value} input")
        state.values = SOURCES[plan.input_mode](state, plan.pass_named("input"))
    _tune_allocator(plan, run)
    state.arr = engine.as_chunked(state.values, plan.chunks, plan.radius)
    return state.arr


def _tune_allocator(plan: Plan, run) -> None:
    """Set this process's allocator for the blocks the passes will hold."""
    if not any(plan.radius):
        # every task allocates a block and its prediction of the same size:
        # let the allocator hand freed ones back instead of fresh pages
        reuse_freed_memory(int(np.prod(plan.chunks)) * run.shape[3] * 8)
    else:
        # with a patch the arithmetic dwarfs page faults, and the lanes'
        # buffers come in many sizes: give freed ones back rather than keep
        # the process at its high-water mark
        return_freed_memory()


def _scratch_dir(run, work):
    """Scratch files go under --tmp-dir or the (local) work store."""
    if run.opts.tmp_dir and is_local(run.opts.tmp_dir):
        return local_path(run.opts.tmp_dir)
    if is_local(work.url):
        return local_path(work.url)
    return None


# -- statistics, solve, minima ----------------------------------------------------

def statistics_pass(state: Execution, step: Pass) -> None:
    """The merged statistics, saved in the work store (or reloaded)."""
    run, work = state.run, state.work
    saved = work.load_arrays("statistics.npz")
    if saved is not None:
        state.report.resumed.append("statistics")
        stats, lowest = stats_from_arrays(saved)
        state.summary = engine.Summary(stats, lowest)
        return
    if state.plan.folds:
        summary = _fold_statistics(state, step)
    else:
        with engine.lanes_in_sequence(state.executor.in_process):
            graph = engine.summarize(_blocks(state), run.groups, run.radius, run.mask,
                                     lanes=step.lanes)
        with _errors("computing the statistics"):
            # the plan's cap: with a patch no more threads than lanes (see
            # planning.plan.plan_passes)
            summary = state.executor.compute(graph, "statistics", run.opts.progress,
                                             threads=step.threads)
    if summary.nonfinite:
        raise DataError(describe_nonfinite(summary.nonfinite, summary.first_nonfinite))
    for group, st in zip(run.groups, summary.stats):
        if st is not None and st.count < 2:
            raise DataError(f"the mask selects {st.count} voxel(s): too few to fit the "
                            f"{group.name} group")
    work.save_arrays("statistics.npz", **stats_to_arrays(summary.stats, summary.minima))
    state.summary = summary


def _fold_statistics(state: Execution, step: Pass):
    """The statistics fold by fold (whole blocks, see :mod:`.auto`), each
    computed as the statistics of a run over its blocks, saved in the work
    store as it comes (a rerun reuses the folds done; the crossval pass
    reads them back) and merged here into the total (returned)."""
    run, work, plan = state.run, state.work, state.plan
    labels = auto.fold_labels(tuple(len(g) for g in plan.grid), plan.folds)
    with engine.lanes_in_sequence(state.executor.in_process):
        graphs = engine.fold_summaries(_blocks(state), run.groups, run.radius, run.mask,
                                       labels, lanes=step.lanes)
    total, reused = None, 0
    for k, graph in enumerate(graphs):
        saved = work.load_arrays(f"fold{k}.npz")
        if saved is not None:
            reused += 1
            part = engine.Summary([_fold_group(work, k, i) for i in range(len(run.groups))],
                                  saved["minima"])
        else:
            with _errors("computing the statistics"):
                part = state.executor.compute(graph, f"statistics (fold {k + 1} of "
                                              f"{len(graphs)})", run.opts.progress,
                                              threads=step.threads)
            if part.nonfinite:
                return part  # reported by the caller
            _save_fold(work, k, part)
        total = auto.add_fold(total, part)
        # let the fold's F x F go before the next fold is summed (the total
        # holds what it needs): else three F x F live beside the lanes
        del part
    if reused:
        state.report.resumed.append(f"statistics of {reused} of {len(graphs)} folds")
    return total


def _save_fold(work, k, part) -> None:
    """Fold ``k``'s statistics, a file per group (the scoring reads one
    group's at a time), then its minima: the fold's mark of completion."""
    for i, st in enumerate(part.stats):
        work.save_arrays(f"fold{k}-{i}.npz", **stats_to_arrays([st], part.minima))
    work.save_arrays(f"fold{k}.npz", minima=part.minima)


def _fold_group(work, k, i):
    """Group ``i``'s statistics of fold ``k``, read back."""
    return stats_from_arrays(work.load_arrays(f"fold{k}-{i}.npz"))[0][0]


def crossval_pass(state: Execution, step: Pass) -> None:
    """The choice of the radius, model and penalty (see :mod:`.auto`):
    every candidate scored from the total and the folds (read back from the
    work store one at a time), the choice saved (or reloaded); the passes
    after it see the chosen setting, fitted from the total's sub-block."""
    run, work = state.run, state.work
    if work.has("crossval.json"):
        state.report.resumed.append("cross-validation")
        record = json.loads(work.read_bytes("crossval.json"))
    else:
        with solving_blas(step.threads):
            record = auto.decide(run.auto, state.summary.stats,
                                 lambda k, i: _fold_group(work, k, i), run.groups,
                                 state.plan.folds)
        work.write_bytes("crossval.json", json.dumps(record).encode())
    logger.info("%s", auto.choice_line(record))
    radius, model, alpha = auto.fitted_setting(record, run.alpha)
    state.summary = engine.Summary(auto.chosen_stats(state.summary.stats, run.radius, radius),
                                   state.summary.minima)
    state.run = replace(run, radius=radius, model=model, alpha=alpha,
                        cross_validation=record)
    state.plan = replace(state.plan, radius=radius)
    state.report.cross_validation = record


def solve_pass(state: Execution, step: Pass) -> None:
    """Every group's regression from the statistics, in this process."""
    run = state.run
    # the summary is saved in the work store and read by nothing else: its
    # scatters are inverted in place
    with solving_blas(step.threads):
        state.fitted = engine.fit_models(state.summary, run.groups, run.radius, run.model,
                                         run.alpha, run.calc_dtype, spend=True)
    state.summary = None


@dataclass
class Post:
    """What the prediction pass does after the products: the per-volume
    shift, the scale of a scaled integer output (its ``scl_slope``), and
    whether values may fall outside an integer output (then they are
    counted as they are clipped)."""

    shift: object = None
    slope: float = 1.0
    count_outside: bool = False


def minima_pass(state: Execution, step: Pass) -> None:
    """The prediction's per-volume range (saved, or reloaded), from which
    the shift, the output's slope and the clipping forecast follow."""
    run, work = state.run, state.work
    integer = np.issubdtype(run.out_dtype, np.integer)
    saved = work.load_arrays("range.npz")
    if saved is not None:
        state.report.resumed.append("minima")
        lowest, highest = saved["range"]
    else:
        with _errors("computing the minima"):
            lowest, highest = np.asarray(state.executor.compute(
                _range_graph(state, integer), "minima", run.opts.progress,
                threads=step.threads), float)
        if not integer:
            highest = np.full_like(lowest, np.inf)  # not needed: no bound
        work.save_arrays("range.npz", range=np.stack([lowest, highest]))
    state.post = post_processing(run, state.fitted, lowest, highest)


# where the minima pass keeps each block's predictions, in the work store
KEPT_FOLDER = "pred"


def _keeps(state: Execution) -> bool:
    """The plan keeps the minima pass's predictions, and the radius (as
    the cross-validation left it) has a patch."""
    return bool(state.plan.keep_predictions and any(state.plan.radius))


def _kept_name(key) -> str:
    return f"{KEPT_FOLDER}/{key}.npy"


def _keep_task(block, fitted, radius, work, key):
    return engine.kept_prediction_range(block, fitted, radius,
                                        lambda products: work.save_array(_kept_name(key),
                                                                         products))


def _range_of(*items):
    both = np.stack(items)
    return np.stack([both[:, 0].min(axis=0), both[:, 1].max(axis=0)])


def _range_graph(state: Execution, integer: bool):
    """The minima pass: one task per block gives the range of its
    prediction (the maximum only for an integer output), merged in a tree;
    a pass that keeps its predictions saves each block's products too."""
    plan, work = state.plan, state.work
    fitted = dask.delayed(state.fitted, pure=True)
    if _keeps(state):
        work.makedirs(KEPT_FOLDER)
        keep = dask.delayed(_keep_task, pure=False)
        tasks = [keep(block, fitted, plan.radius, work, region_key(region))
                 for block, region in _halo_blocks(state)]
    else:
        task = dask.delayed(engine.block_range, pure=True)
        tasks = [task(block, fitted, plan.radius, integer)
                 for block, _ in _halo_blocks(state)]
    return _merge_tree(tasks, _range_of)


def _halo_blocks(state: Execution):
    """``(block with its halo, region)`` of every chunk of the plan, in its
    order: the input as the prediction passes read it. A plain local
    ``.nii`` is read region by region with the halo, volume-major (see
    :func:`~p2s_dask.io.nifti_direct.read_with_halo`: no neighbouring
    blocks assembled); other inputs come through Dask's overlap of the
    pass's blocks."""
    plan = state.plan
    if plan.input_mode is InputMode.IN_PLACE:
        _tune_allocator(plan, state.run)  # as _blocks (a resumed run reads no statistics)
        read = dask.delayed(read_with_halo, pure=True)
        path, meta = local_path(state.run.inp), state.run.meta
        return [(read(path, meta, region, plan.radius), region) for _, region in plan.regions()]
    blocks = engine.with_halo(_blocks(state), plan.radius).to_delayed()
    return [(blocks[idx + (0,)], region) for idx, region in plan.regions()]


def post_processing(run, fitted, lowest, highest) -> Post:
    """The shift, slope and clipping forecast of a prediction whose
    per-volume range is ``[lowest, highest]``."""
    shift = intensity_shift(fitted.minima, lowest) if run.shift else None
    if shift is not None:
        lowest, highest = lowest + shift, highest + shift
    if run.clip:
        lowest, highest = np.maximum(lowest, 0), np.maximum(highest, 0)
    if not np.issubdtype(run.out_dtype, np.integer):
        return Post(shift)
    slope = fit_slope(lowest.min(), highest.max(), run.out_dtype) if run.fit_scale else 1.0
    return Post(shift, slope, outside_range(lowest, highest, run.out_dtype, 1 / slope))


# -- predict and output -------------------------------------------------------------

def predict_pass(state: Execution, step: Pass) -> None:
    """Every chunk not yet done, predicted and written by the sink."""
    run = state.run
    # without a minima pass no range is known: an integer output's clipped
    # values are counted as they go
    post = state.post or Post(count_outside=np.issubdtype(run.out_dtype, np.integer))
    state.sink = make_sink(state, post.slope, sample_block(state))
    spec = qc_spec(run, state.plan.radius) if QC_NOISE in run.qc else None
    clipped, parts = predict(state, post, step, spec)
    if spec is not None:
        state.report.qc = qc_results.finish(parts, spec, run.bvals, run.groups)
        # a run with a noise map has a page or reportlets: their figures
        # are drawn while the output pass streams (the page is made last)
        state.report.drawing = draw_in_background(state.report.qc)
    if clipped:
        logger.warning("%d denoised values fell outside the range of %s and were "
                       "clipped to it", clipped, run.out_dtype)
    # the input is let go: the output pass's stream gets the whole budget
    state.values = state.arr = None


def output_pass(state: Execution, step: Pass) -> None:
    """Commit the sink (streaming a NIfTI out of its store or memory), then
    write the noise map of a run with a QC report."""
    run, qc = state.run, state.report.qc
    with _errors("writing the output"):
        if run.out_kind == "nifti":
            # the sidecars first: until the image is renamed into place
            # nothing at OUT looks complete
            write_sidecars(run.out, bvals=run.bvals, bvecs=run.meta.bvecs,
                           metadata=provenance(run, qc),
                           storage_options=run.opts.storage_options)
        state.sink.commit(state.executor)
        if qc is not None:
            write_noise_map(run.qc[QC_NOISE], run.meta, qc.noise, run.opts.storage_options)


def _direct_sink(state, meta, codec):
    return NiftiDirectSink(state.run.out, state.work, meta)


def _memory_sink(state, meta, codec):
    return NiftiMemorySink(state.run.out, meta, state.run.opts.storage_options)


def _zarr_sink(state, meta, codec):
    return ZarrSink(state.run.out, state.work, meta, state.plan.chunks,
                    state.run.opts.storage_options, compressor=codec)


def _via_zarr_sink(state, meta, codec):
    run, work = state.run, state.work
    # the stream at the commit gets the output pass's memory
    stream = Stream(state.plan.pass_named("output").memory, _scratch_dir(run, work),
                    run.opts.progress)
    return NiftiViaZarrSink(run.out, work, meta, state.plan.chunks, run.opts.storage_options,
                            compressor=codec, stream=stream)


# the sink of each output mode
SINKS = {OutputMode.NIFTI_DIRECT: _direct_sink, OutputMode.NIFTI_MEMORY: _memory_sink,
         OutputMode.ZARR: _zarr_sink, OutputMode.NIFTI_VIA_ZARR: _via_zarr_sink}


def make_sink(state: Execution, slope=1.0, sample=None):
    """The sink of the plan's output mode; a store's codec is chosen by how
    well ``sample`` (some input values, see :func:`sample_block`) compresses."""
    run, mode = state.run, state.plan.output_mode
    if mode not in SINKS:
        raise ValueError(f"a file run cannot write a {mode.value} output")
    # a store keeps what made it in its attributes, as a NIfTI's .json does
    out_meta = run.meta.for_values(run.out_dtype, run.shape, slope=slope).with_sidecar(
        provenance(run))
    codec = None if sample is None else compressor_for(sample, run.out_dtype)
    return SINKS[mode](state, out_meta, codec)


def sample_block(state: Execution):
    """The input's middle block (all volumes), for choosing an output codec;
    None for an output without a store, which has none."""
    if not state.plan.output_mode.has_store:
        return None
    _blocks(state)  # opens the input when no pass has yet
    values = state.values
    middle = tuple(len(c) // 2 for c in values.chunks[:3]) + (0,)
    return state.executor.compute(values.blocks[middle], "sample")


def predict(state: Execution, post: Post, step: Pass, spec=None):
    """Every chunk not yet done, predicted and written by the sink.

    Returns
    -------
    (int, QcParts or None)
        How many values the cast to an integer output clipped, and with a
        QC ``spec`` the residual summaries of every block merged (those of
        the chunks an earlier run did are read back from the work store).
    """
    work, sink, executor = state.work, state.sink, state.executor
    done = work.done_regions()
    with _errors("creating the output"):
        resumed = sink.create(resume=bool(done))
    if not resumed:
        if done:
            work.remove("done")
        done = set()
    work.makedirs("done")
    if spec is not None:
        # a chunk done by a run that kept no summary of it is done again
        work.makedirs(QC_FOLDER)
        done &= _saved_summaries(work)
    executor.require_shared_files(_shared_files(sink))
    tasks = _write_tasks(state, post, done, spec)
    if done:
        state.report.resumed.append(f"{len(done)} output chunks")
    try:
        with _errors("writing the output"):
            results = executor.compute(_gathered(tasks, spec), "predict",
                                       state.run.opts.progress,
                                       threads=step.threads) if tasks else []
            sink.finish(executor)
    except BaseException:
        sink.abort(executor)
        raise
    earlier = work.done_counts(done) if (done and post.count_outside) else 0
    if spec is None:
        return int(sum(results)) + earlier, None
    clipped, parts = results if tasks else (0, None)
    return int(clipped) + earlier, _with_saved(parts, work, done)


def _shared_files(sink):
    url = getattr(sink, "url", None)
    if url is None or not is_local(url) or not os.path.isdir(local_path(url)):
        return []
    return [os.path.join(local_path(url), "zarr.json")]


@dataclass
class _Prediction:
    """How every block is predicted: one graph key shared by the tasks."""

    fitted: object
    radius: tuple
    post: Post
    clip: bool
    dtype: object
    qc: object = None  # a QcSpec: the block's residuals are summarised


def _write_chunk(block, region, how: _Prediction, sink, work, key, kept=False):
    # the products the minima pass kept (None: none, or lost: computed)
    products = work.load_array(_kept_name(key)) if kept else None
    if products is None and block is None:
        raise DataError(f"the work store {work.url} lost the kept prediction of the block "
                        f"at {key}; run the same command again to compute it")
    layout = block if products is None else products
    # a volume-major block predicts straight into the writer's layout
    buffer = sink.buffer(region, how.dtype) if rows_order(layout) == "F" else None
    post = how.post
    counter = engine.Outside(how.dtype) if post.count_outside else None
    scale = None if post.slope == 1.0 else 1.0 / post.slope
    cast = engine.Cast(how.dtype, how.clip, scale)
    if products is None:
        out = engine.predict_chunk(block, how.fitted, how.radius, post.shift, cast,
                                   out=buffer, counter=counter)
    else:
        out = engine.finish_chunk(products, how.fitted, post.shift, cast, out=buffer,
                                  counter=counter)
        del products
    clipped = 0 if counter is None else counter.count
    parts = None
    if how.qc is not None:
        # before the write: the writer may own ``out`` from then on
        parts = qc_summaries.block_qc(block, out, [r.start for r in region], how.qc,
                                      post.slope)
    # the marker goes after the data (and the block's summary): a marked
    # chunk is always fully written
    sink.write(region, out, lambda: _mark_done(work, key, clipped, parts, kept))
    delay = float(os.environ.get(CHUNK_DELAY_ENV, 0) or 0)
    if delay:
        time.sleep(delay)
    return clipped if parts is None else (clipped, parts)


def _mark_done(work, key, clipped, parts, kept=False):
    if parts is not None:
        work.save_arrays(f"{QC_FOLDER}/{key}.npz", **qc_summaries.to_arrays(parts))
    work.mark_done(key, clipped)
    if kept:
        # written: its kept products give their disk back
        work.remove(_kept_name(key))


def _write_tasks(state: Execution, post: Post, done, spec=None):
    """One task per chunk of the plan whose region is not done yet."""
    run, plan = state.run, state.plan
    how = dask.delayed(_Prediction(state.fitted, plan.radius, post, run.clip, run.out_dtype,
                                   spec))
    # the blocks whose products the minima pass kept: their tasks read no
    # input, unless the QC report needs their residuals
    kept = _kept_keys(state.work) if _keeps(state) and state.post is not None else set()
    write = dask.delayed(_write_chunk, pure=False)
    tasks = []
    for block, region in _halo_blocks(state):
        key = region_key(region)
        if key in done:
            continue
        if key in kept and spec is None:
            block = None
        tasks.append(write(block, region, how, state.sink, state.work, key, key in kept))
    return tasks


def _kept_keys(work) -> set:
    """The blocks whose products the minima pass kept, by region key."""
    return work.stems(KEPT_FOLDER, ".npy")


# -- the QC report's summaries (see p2s_dask.report) ----------------------------------

# where a run's chunks leave their residual summaries, in the work store
QC_FOLDER = "qc"


def qc_spec(run, radius):
    """What the prediction's tasks summarise of their residuals (the
    interior of blocks with a ``radius`` halo: the plan's)."""
    return qc_summaries.make_spec(run.shape, run.bvals, run.groups, run.opts.b0_threshold,
                                  radius)


def _merge_results(*items):
    """``(clipped, QcParts)`` of some blocks, summed and merged."""
    return (sum(c for c, _ in items), qc_summaries.merge(*(p for _, p in items)))


def _gathered(tasks, spec):
    """The tasks as one value: their results in a tree of merges (fan-in
    8, so that a few blocks' summaries wait at a time) with a QC ``spec``,
    else the list of their clipped counts."""
    if spec is None:
        return tasks
    return _merge_tree(tasks, _merge_results)


def _merge_tree(tasks, merge, fan_in=8):
    """The tasks' results merged by ``merge`` in a tree of ``fan_in``."""
    merge = dask.delayed(merge, pure=True)
    while len(tasks) > 1:
        tasks = [merge(*tasks[i:i + fan_in]) for i in range(0, len(tasks), fan_in)]
    return tasks[0]


def _saved_summaries(work) -> set:
    """The regions whose residual summaries an earlier run saved."""
    return work.stems(QC_FOLDER, ".npz")


def _with_saved(parts, work, done):
    """``parts`` with the saved summaries of the chunks ``done`` before,
    read one at a time."""
    for key in sorted(done):
        saved = qc_summaries.from_arrays(work.load_arrays(f"{QC_FOLDER}/{key}.npz"))
        parts = saved if parts is None else qc_summaries.merge(parts, saved)
    return parts


# each pass of a plan, by name
PASSES = {"input": input_pass, "statistics": statistics_pass, "crossval": crossval_pass,
          "solve": solve_pass, "minima": minima_pass, "predict": predict_pass,
          "output": output_pass}
