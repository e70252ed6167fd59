"""NumPy in, NumPy out: the in-memory API's run, on an executor of
:mod:`.executors` (by default the scheduler ``dask.compute`` would use:
threads, or the current ``distributed`` Client; see
:func:`~.executors.current_executor`).

A task never writes into the caller's array: it may run in another process
(a distributed worker), where a write would land in a copy and leave the
caller's memory uninitialised. Tasks return their chunk's values (and
minima); the executor hands each result to this process as it arrives
(:meth:`~.executors.Executor.stream`), which places it, so the call holds the
output plus a few chunks.

Bit-for-bit the same answer locally and on a cluster: the chunks and lanes
come from the budget alone (:func:`~p2s_dask.graph.engine.in_memory_sizes`),
and the core picks its code path (and so its order of float sums) from a
block's memory layout, so every task, wherever it runs, is given the same
block: a contiguous array in the data's own layout, cut from the same chunks
and aligned (a scattered block is realigned on its worker), see
:meth:`~.executors.Executor.blocks_of`. BLAS runs on one thread in every
task (its thread count may change the order of sums).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import dask
import dask.array as da
import numpy as np

from ..core import predict_block
from ..core.layout import rows_order, volume_columns
from ..core.predict import prediction_minima as block_prediction_minima
from ..core.postprocess import intensity_shift
from ..graph.engine import (DenoiseSpec, FittedModels, Summary, _clip_negatives, _interior,
                            _one_key, _RunningMin, as_chunked, fit_models, in_memory_sizes,
                            local_threads, summarize, with_halo)
from .auto import choice_line, choose_in_memory, chosen_stats, fitted_setting
from .executors import chunk_grid, contiguous, current_executor
from .threads import solving_blas, task_blas
from ..planning.plan import solve_threads

__all__ = ["DenoiseSpec", "block_order", "denoise_into", "prediction_chunks"]

logger = logging.getLogger("p2s_dask")

# float64 bytes of one prediction task's block: the statistics keep the
# engine's (large) chunks; prediction needs no merge, and small pieces keep
# the blocks and results in flight a small fraction of the output
PIECE_BYTES = 8 * 2**20


@dataclass
class _Piece:
    """What a prediction task returns: its chunk's values and/or minima."""

    values: np.ndarray | None
    minima: np.ndarray | None


@dataclass(eq=False)
class _Pass:
    """What one prediction pass computes for every piece."""

    radius: tuple
    shift: np.ndarray | None = None  # added to the prediction (with the intercept)
    clip: bool = False  # negative values clipped to 0
    dtype: object = None  # the values' dtype (None: minima only)
    minima: bool = False  # also the per-volume minimum of the unshifted values


def block_order(data: np.ndarray) -> str:
    """The layout every block of ``data`` is given.

    Parameters
    ----------
    data : ndarray (x, y, z, n)

    Returns
    -------
    {'C', 'F'}
        'F' when ``data`` is volume-major (each volume one Fortran-ordered
        run: NIfTI's layout, and nibabel's ``get_fdata``), else 'C'. Blocks
        keep the data's own layout, so cutting them is a plain copy.
    """
    if data.flags.c_contiguous:
        return "C"
    return "F" if volume_columns(data) is not None else "C"


def prediction_chunks(chunks, radius, order="C", target_bytes=None):
    """Chunks for the prediction tasks, cut from the statistics chunks.

    Parameters
    ----------
    chunks : tuple of 4 tuples
        The chunks of the statistics pass (one chunk along the volumes).
    radius : tuple of int
        No piece is thinner than the patch radius (``overlap`` needs it).
    order : {'C', 'F'}
        The blocks' layout (:func:`block_order`): its slowest axes are cut
        first.
    target_bytes : int, optional
        About this many float64 bytes per piece; default :data:`PIECE_BYTES`.

    Returns
    -------
    tuple of 4 tuples
        Every piece lies inside one chunk of ``chunks``, so a worker holding
        that chunk cuts its pieces without fetching anything.
    """
    n = int(chunks[3][0])
    budget = max(1, (target_bytes or PIECE_BYTES) // (8 * n))
    sizes = [max(c) for c in chunks[:3]]
    for axis in ((0, 1, 2) if order == "C" else (2, 1, 0)):
        total = int(np.prod(sizes))
        if total <= budget:
            break
        sizes[axis] = min(sizes[axis],
                          max(1, radius[axis], budget // (total // sizes[axis])))
    out = []
    for axis in range(3):
        pieces = []
        for c in chunks[axis]:
            # c // size pieces (not ceil): each at least `size`, so none is
            # thinner than the radius that overlap() needs
            k = max(1, c // sizes[axis])
            pieces += [c // k + (i < c % k) for i in range(k)]
        out.append(tuple(pieces))
    return tuple(out) + (tuple(chunks[3]),)


def _predict_piece(block, fitted: FittedModels, spec: _Pass) -> _Piece:
    """One prediction task: its block's values (shifted, clipped, cast to
    ``spec.dtype``) and/or the per-volume minima of the unshifted
    prediction."""
    with task_blas():
        block = contiguous(block, rows_order(block))
        if spec.dtype is None:
            lowest = block_prediction_minima(block, spec.radius, fitted.plan,
                                             dtype=fitted.calc_dtype)
            return _Piece(None, lowest)
        running = _RunningMin(block.shape[-1]) if spec.minima else None
        steps = [f for f in (running, _clip_negatives if spec.clip else None)
                 if f is not None]

        def transform(piece):
            for step in steps:
                piece = step(piece)
            return piece

        out = np.empty(_interior(block, spec.radius).shape[:3] + (block.shape[-1],),
                       dtype=spec.dtype, order=rows_order(block))
        predict_block(block, spec.radius, fitted.plan.shifted(spec.shift), out=out,
                      dtype=fitted.calc_dtype, transform=transform if steps else None)
        return _Piece(out, None if running is None else running.value)


def _predict_pass(executor, pieces: da.Array, target, fitted, spec: _Pass):
    """Run one prediction pass over ``pieces``; write each piece's values
    into ``target`` (in this process) and return the per-volume minimum of
    the prediction (when ``spec.minima``, or for a minima-only pass)."""
    halo = with_halo(pieces, spec.radius).to_delayed().reshape(-1)
    task = dask.delayed(_predict_piece, pure=True)
    fitted_key = _one_key(fitted)
    tasks = [task(b, fitted_key, spec) for b in halo]
    regions = [slc[:3] for _, slc in chunk_grid(pieces.chunks)]
    lowest = np.full(pieces.shape[3], np.inf)

    def place(i, piece):
        if piece.values is not None:
            target[regions[i]] = piece.values
            piece.values = None  # written: not held until the pass ends
        if piece.minima is not None:
            np.minimum(lowest, piece.minima, out=lowest)

    executor.stream(tasks, place)
    return lowest


def _fit(executor, arr: da.Array, spec: DenoiseSpec, check_finite: bool):
    """Pass 1 on ``executor``, then the solve (here); with a radius or
    penalty left to the data, the choice between them (see :mod:`.auto`).

    Returns
    -------
    (FittedModels, DenoiseSpec)
        The models and the spec they were fitted with (the chosen radius,
        model and alpha).
    """
    radius = spec.radius
    lanes = in_memory_sizes(arr.shape, radius)[1]
    if spec.auto is not None:
        total, record = choose_in_memory(executor, arr, spec, check_finite, lanes)
        logger.info("%s", choice_line(record))
        chosen, model, alpha = fitted_setting(record, spec.alpha)
        summary = Summary(chosen_stats(total.stats, radius, chosen), total.minima)
        spec = replace(spec, radius=chosen, model=model, alpha=alpha, auto=None)
    else:
        graph = summarize(arr, spec.groups, radius, spec.mask, check_finite, lanes=lanes)
        # with a patch, no more threads than lanes (see run.passes.statistics)
        summary = executor.compute(graph, threads=lanes if any(radius) else None)
    # the summary came back to this process and is read by nothing else; the
    # solve runs alone here, on the cores a file run's solve gets
    with solving_blas(solve_threads(spec.radius, local_threads())):
        return fit_models(summary, spec.groups, spec.radius, spec.model, spec.alpha,
                          spec.calc_dtype, spend=True), spec


def _predict(executor, pieces: da.Array, target, fitted, spec: DenoiseSpec):
    """The prediction passes into ``target``; the minima of the unshifted
    prediction when a float target is still to be shifted, else None."""
    floating = np.issubdtype(target.dtype, np.floating)
    shift = None
    if spec.shift_intensity and not floating:
        # an integer target needs the shift before the cast
        lowest = _predict_pass(executor, pieces, target, fitted, _Pass(spec.radius))
        shift = intensity_shift(fitted.minima, lowest)
    later = spec.shift_intensity and floating
    lowest = _predict_pass(executor, pieces, target, fitted,
                           _Pass(spec.radius, shift, spec.clip_negative_vals,
                                 target.dtype, minima=later))
    return lowest if later else None


def denoise_into(data: np.ndarray, target: np.ndarray, spec: DenoiseSpec, *, chunks=None,
                 check_finite=True, executor=None):
    """The whole method for a NumPy array, into the NumPy array ``target``.

    Tasks return values; only this process writes into ``target``. The result
    is the same bit for bit on every executor.

    Parameters
    ----------
    data : ndarray (x, y, z, n)
    target : ndarray, shape of ``data``, any dtype
        The output (integers are rounded and clipped to their range).
    spec : DenoiseSpec
        Groups, radius and the options that change the result.
    chunks : tuple of int, optional
        Spatial chunk shape of the statistics pass (see :func:`as_chunked`);
        default :func:`~p2s_dask.graph.engine.in_memory_sizes`.
    check_finite : bool
        Count NaN/Inf values (skip when the caller has checked already).
    executor : Executor, optional
        Where the tasks run (left open); default
        :func:`~.executors.current_executor`.

    Returns
    -------
    ndarray
        ``target``.

    Notes
    -----
    Float targets take one prediction pass: unshifted values and their
    minima, then the shift added in place (one extra rounding in float32).
    Integer targets need the shift before the cast: minima, then values.
    """
    if isinstance(data, da.Array) or target.shape != data.shape:
        raise TypeError("denoise_into takes a NumPy array and a target of its shape")
    if chunks is None and spec.auto is not None:
        # blocks thin enough along z to deal into folds
        chunks = in_memory_sizes(data.shape, spec.radius, folds=spec.auto.n_folds)[0][:3]
    stats_chunks = as_chunked(data, chunks, spec.radius).chunks
    order = block_order(data)
    executor = executor or current_executor()
    with executor.blocks_of(data, stats_chunks, order) as blocks:
        fitted, spec = _fit(executor, blocks.array(stats_chunks), spec, check_finite)
        pieces = blocks.array(prediction_chunks(stats_chunks, spec.radius, order))
        lowest = _predict(executor, pieces, target, fitted, spec)
    if lowest is not None:
        target += intensity_shift(fitted.minima, lowest).astype(target.dtype)
    return target
