"""NumPy in, NumPy out: the in-memory API's run, on whichever scheduler Dask
would use (threads by default, or the current ``distributed`` Client).

A task never writes into the caller's array: it may run in another process
(a distributed worker), where a write would land in a copy and leave the
caller's memory uninitialised. Tasks return their chunk's values (and
minima); the calling process places each result as it arrives, so the call
holds the output plus a few chunks.

Bit-for-bit the same answer locally and on a cluster: the core picks its
code path (and so its order of float sums) from a block's memory layout, so
every task, wherever it runs, is given the same block: a contiguous array in
the data's own layout, cut from the same chunks. BLAS runs on one thread in
every task (its thread count may change the order of sums).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask.array.core import slices_from_chunks
from dask.callbacks import Callback

from ..core import predict_block
from ..core.layout import rows_order, volume_columns
from ..core.predict import prediction_minima as block_prediction_minima
from ..core.postprocess import intensity_shift
from ..graph.engine import (FittedModels, _clip_negatives, _interior, _one_key, _RunningMin,
                     api_lanes, as_chunked, fit_models, summarize, with_halo)
from ..config.groups import Group
from .threads import OneBlasThread

# float64 bytes of one prediction task's block: the statistics keep the
# engine's (large) chunks; prediction needs no merge, and small pieces keep
# the blocks and results in flight a small fraction of the output
PIECE_BYTES = 8 * 2**20


@dataclass
class _Piece:
    """What a prediction task returns: its chunk's values and/or minima."""

    values: np.ndarray | None
    minima: np.ndarray | None
    placed: bool = False  # set in the calling process once it is written


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


def _canonical(view: np.ndarray, order: str) -> np.ndarray:
    """``view`` as a contiguous array in ``order`` (itself when it is one)."""
    return np.require(view, requirements=order)


def _sub_block(parent: np.ndarray, index, order: str) -> np.ndarray:
    return _canonical(parent[index], order)


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


def _grid(chunks):
    """``(block index, 4D slices)`` of every chunk, in C order."""
    return zip(np.ndindex(*[len(c) for c in chunks]), slices_from_chunks(chunks))


def _task_array(tasks: dict, chunks, dtype) -> da.Array:
    """A dask array from ``{block index: task or value}``."""
    name = f"p2s-block-{uuid.uuid4().hex}"
    return da.Array({(name,) + idx: t for idx, t in tasks.items()}, name, chunks,
                    dtype=dtype)


class _LocalRun:
    """Dask's local schedulers (threads by default, or what ``dask.config``
    names). Blocks are cut from the caller's array (copied only when
    strided); results come back in this process and are placed as each
    task ends."""

    def __init__(self, data, order, compute_kwargs):
        self.data, self.order, self.kwargs = data, order, compute_kwargs

    def array(self, chunks) -> da.Array:
        tasks = {idx: (_canonical, self.data[slc], self.order)
                 for idx, slc in _grid(chunks)}
        return _task_array(tasks, chunks, self.data.dtype)

    def compute(self, obj, threads=None):
        """``obj``'s value; ``threads`` caps the local scheduler's threads."""
        kwargs = dict(self.kwargs)
        if threads is not None:
            kwargs["num_workers"] = threads
        return dask.compute(obj, **kwargs)[0]

    def stream(self, tasks, place):
        """Compute ``tasks`` (Delayed) and ``place(i, piece)`` each result.

        The local schedulers keep every requested result until the end: a
        callback places each piece as its task finishes (in this thread) and
        drops its values, so only a few are held at once. Schedulers without
        callbacks get their pieces placed at the end.
        """
        order = {t.key: i for i, t in enumerate(tasks)}

        def posttask(key, result, dsk, state, worker_id):
            i = order.get(key)
            if i is not None and isinstance(result, _Piece) and not result.placed:
                place(i, result)
                result.values, result.placed = None, True

        with Callback(posttask=posttask):
            results = dask.compute(*tasks, **self.kwargs)
        for i, piece in enumerate(results):
            if not piece.placed:
                place(i, piece)

    def close(self):
        pass


class _DistributedRun:
    """A ``distributed`` Client. Each block of the caller's array is
    scattered once (the statistics and every prediction pass use it, each
    task gets only its own block); prediction pieces are cut from it on the
    worker that holds it. Results are gathered as they complete."""

    def __init__(self, client, data, order, chunks):
        self.client, self.order, self.chunks = client, order, chunks
        # one block at a time: the client holds at most one block's copy
        self.blocks = {idx: client.scatter(_canonical(data[slc], order), hash=False)
                       for idx, slc in _grid(chunks)}
        self.dtype = data.dtype

    def array(self, chunks) -> da.Array:
        if chunks == self.chunks:
            return _task_array(dict(self.blocks), chunks, self.dtype)
        ends = [np.cumsum(c) for c in self.chunks[:3]]
        tasks = {}
        for idx, slc in _grid(chunks):
            parent, local = [], []
            for a in range(3):
                j = int(np.searchsorted(ends[a], slc[a].start, side="right"))
                start = int(ends[a][j] - self.chunks[a][j])
                parent.append(j)
                local.append(slice(slc[a].start - start, slc[a].stop - start))
            tasks[idx] = (_sub_block, self.blocks[tuple(parent) + (0,)], tuple(local),
                          self.order)
        return _task_array(tasks, chunks, self.dtype)

    def compute(self, obj, threads=None):
        return self.client.compute(obj).result()  # the workers keep their threads

    def stream(self, tasks, place):
        """Compute ``tasks`` (Delayed) and ``place(i, piece)`` each result as
        it completes, releasing it on the cluster."""
        from distributed import as_completed

        futures = self.client.compute(list(tasks))
        order = {f.key: i for i, f in enumerate(futures)}
        for future in as_completed(futures):
            place(order[future.key], future.result())
            future.release()

    def close(self):
        self.client.cancel(list(self.blocks.values()))
        self.blocks = {}


def _runner(data, order, chunks):
    """The run for the scheduler ``dask.compute`` would use now: a current
    ``distributed`` Client, else the local scheduler ``dask.config`` names,
    else the threaded scheduler on all cores (``dask.system.CPU_COUNT``)."""
    from distributed import Client

    get = dask.base.get_scheduler()
    # a Client is Dask's scheduler as its bound `get`
    client = getattr(get, "__self__", None)
    if isinstance(client, Client):
        return _DistributedRun(client, data, order, chunks)
    return _LocalRun(data, order, {} if get is not None else {"scheduler": "threads"})


def _predict_piece(block, fitted: FittedModels, radius, shift, clip, dtype,
                   values=True, minima=False) -> _Piece:
    """One prediction task: its block's values (shifted by ``shift``,
    clipped, cast to ``dtype``) and/or the per-volume minima of the
    unshifted prediction."""
    with OneBlasThread():
        block = _canonical(block, rows_order(block))
        if not values:
            lowest = block_prediction_minima(block, radius, fitted.plan,
                                             dtype=fitted.calc_dtype)
            return _Piece(None, lowest)
        running = _RunningMin(block.shape[-1]) if minima else None
        steps = [f for f in (running, _clip_negatives if clip else None) if f is not None]

        def transform(piece):
            for step in steps:
                piece = step(piece)
            return piece

        out = np.empty(_interior(block, radius).shape[:3] + (block.shape[-1],),
                       dtype=dtype, order=rows_order(block))
        predict_block(block, radius, fitted.plan, out=out, dtype=fitted.calc_dtype,
                      offset=shift, transform=transform if steps else None)
        return _Piece(out, None if running is None else running.value)


def _predict_pass(run, pieces: da.Array, target, fitted, radius, *, shift=None,
                  clip=False, values=True, minima=False):
    """Run one prediction pass over ``pieces``; write each piece's values
    into ``target`` (in this process) and return the per-volume minimum of
    the prediction (when ``minima``, or for a minima-only pass)."""
    halo = with_halo(pieces, radius).to_delayed().reshape(-1)
    task = dask.delayed(_predict_piece, pure=True)
    fitted_key = _one_key(fitted)
    tasks = [task(b, fitted_key, radius, shift, clip, target.dtype, values, minima)
             for b in halo]
    regions = [slc[:3] for _, slc in _grid(pieces.chunks)]
    lowest = np.full(pieces.shape[3], np.inf)

    def place(i, piece):
        if piece.values is not None:
            target[regions[i]] = piece.values
        if piece.minima is not None:
            np.minimum(lowest, piece.minima, out=lowest)

    run.stream(tasks, place)
    return lowest


def denoise_into(data: np.ndarray, target: np.ndarray, groups: list[Group], radius, *,
                 chunks=None, model="ols", alpha=1.0, mask=None, shift_intensity=True,
                 clip_negative_vals=False, check_finite=True, calc_dtype=np.float64):
    """The whole method for a NumPy array, into the NumPy array ``target``.

    Runs on the scheduler ``dask.compute`` would use (a current
    ``distributed`` Client, ``dask.config``'s scheduler, else threads on all
    cores), with the same result bit for bit. Tasks return values; only this
    process writes into ``target``.

    Parameters
    ----------
    data : ndarray (x, y, z, n)
    target : ndarray, shape of ``data``, any dtype
        The output (integers are rounded and clipped to their range).
    groups : list of Group
    radius : tuple of int
    chunks : tuple of int, optional
        Spatial chunk shape of the statistics pass (see :func:`as_chunked`).
    model, alpha, mask, shift_intensity, clip_negative_vals, calc_dtype
        As :func:`denoise`.
    check_finite : bool
        Count NaN/Inf values (skip when the caller has checked already).

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
    stats_chunks = as_chunked(data, chunks, radius).chunks
    order = block_order(data)
    run = _runner(data, order, stats_chunks)
    try:
        # with a patch, no more threads than lanes (see run.passes.statistics)
        lanes = api_lanes(data.shape, radius)
        summary = run.compute(summarize(run.array(stats_chunks), groups, radius, mask,
                                        check_finite, lanes=lanes),
                              threads=lanes if any(radius) else None)
        # the summary came back to this process and is read by nothing else
        fitted = fit_models(summary, groups, radius, model, alpha, calc_dtype, spend=True)
        pieces = run.array(prediction_chunks(stats_chunks, radius, order))
        floating = np.issubdtype(target.dtype, np.floating)
        shift = None
        if shift_intensity and not floating:
            lowest = _predict_pass(run, pieces, target, fitted, radius, values=False)
            shift = intensity_shift(fitted.minima, lowest)
        lowest = _predict_pass(run, pieces, target, fitted, radius, shift=shift,
                               clip=clip_negative_vals,
                               minima=shift_intensity and floating)
    finally:
        run.close()
    if shift_intensity and floating:
        target += intensity_shift(fitted.minima, lowest).astype(target.dtype)
    return target
