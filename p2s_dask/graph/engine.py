"""The Dask layer: maps the NumPy core over spatial chunks that hold all volumes.

Three passes, each a plain Dask graph over the input:

1. :func:`summarize` — per-block statistics of every group's patch features,
   plus per-volume minima and a NaN/Inf census, merged along a chain (or,
   with a patch and large scatters, summed along one lane of blocks per
   thread in the compact lag form of :mod:`..core.lagparts`, the F x F
   scatter formed once from the merged lanes);
2. :func:`volume_minima` of the (unshifted) prediction, only for
   ``shift_intensity``;
3. :func:`predict` — one matrix product per group and block, then the shift,
   clip and cast.

Halos for ``patch_radius > 0`` come from :func:`dask.array.overlap.overlap`
with a constant-zero boundary, which is exactly the zero padding of DIPY.
This module knows nothing about files.
"""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from dataclasses import dataclass, replace

import dask
import dask.array as da
import numpy as np
from dask.array.core import normalize_chunks, slices_from_chunks
from dask.graph_manipulation import bind

from ..core import LinearModel, block_stats, fit, merge, patch_size, predict_block
from ..core.lagparts import LagParts
from ..core.lagstats import lag_block_stats, lags_pay_off
from ..core.layout import rows_order, voxel_rows
from ..core.postprocess import intensity_shift
from ..core.predict import combine, finish_products, with_intercept
from ..core.predict import prediction_range as block_prediction_range
from ..planning.chunking import chunk_policy, patch_lanes
from ..planning.plan import fold_chunks
from ..errors import InputError
from ..config.groups import Group
from ..run.threads import task_blas
from ..config.validate import describe_nonfinite

TREE_FAN_IN = 8
# statistics whose F x F scatter is larger than this are merged in lanes
# (patches) or a narrow tree; smaller ones along a chain
SMALL_SCATTER_BYTES = 32 << 20

# how the statistics of patches (r > 0) are computed: 'auto' (lagged products
# where they pay off, else the direct scatter), 'lag' or 'direct' (the
# reference); both give the same statistics within rounding
STATS_METHODS = ("auto", "lag", "direct")
_stats_method = contextvars.ContextVar("p2s_dask_stats_method", default="auto")
# lanes each computed in one thread, block after block (see lanes_in_sequence)
_lanes_in_sequence = contextvars.ContextVar("p2s_dask_lanes_in_sequence", default=False)


@contextlib.contextmanager
def statistics_method(method: str):
    """Compute the statistics of every run started in this block with ``method``.

    For benchmarks and tests that compare the algorithms through the whole
    API; :func:`summarize` also takes it as a keyword. The method is read when
    the graph is built, so it holds on any scheduler.

    Parameters
    ----------
    method : {'auto', 'lag', 'direct'}
    """
    token = _stats_method.set(_check_method(method))
    try:
        yield
    finally:
        _stats_method.reset(token)


def _check_method(method):
    if method not in STATS_METHODS:
        raise ValueError(f"unknown statistics method {method!r}: use one of {STATS_METHODS}")
    return method


@dataclass
class Summary:
    """Everything pass 1 learns: statistics per group, minima, bad values."""

    stats: list  # one Stats (or None for pass-through groups) per group
    minima: np.ndarray  # (n,) per-volume minimum of the input
    nonfinite: int = 0
    first_nonfinite: tuple | None = None


@dataclass(eq=False)
class DenoiseSpec:
    """What an in-memory or lazy run computes: the groups, the patch radius
    and every option that changes the result (see :func:`denoise`)."""

    groups: list
    radius: tuple
    model: object = "ols"
    alpha: float = 1.0
    mask: object = None  # (x, y, z) bool: the voxels fitted on
    shift_intensity: bool = True
    clip_negative_vals: bool = False
    calc_dtype: object = np.float64  # arithmetic of the prediction
    # AutoSettings: radius and/or penalty left to the data (radius is then
    # the largest scored, that of the statistics); see p2s_dask.run.auto
    auto: object = None


# An in-memory call's budget: what the call may add to the data and the
# output it holds already (so the process itself is not counted, as a file
# run counts it). A fixed amount, not the share of the machine's memory that
# a file run gets by default: the sizes set the order of the float sums, and
# the API's answer does not change with the RAM. A quarter of it goes to the
# blocks in flight, the rest to the lanes of patch statistics, each its
# compact lag parts and a working copy (0.17 GB for 160 volumes at r = 1; the
# F x F scatter, formed once from the merged lanes, is 0.15 GB): the file
# runs' chunk_policy (with the lanes apart) and patch_lanes
IN_MEMORY_BUDGET = 2 << 30
IN_MEMORY_BLOCKS_SHARE = 4


def local_threads() -> int:
    """Threads of Dask's local scheduler: ``dask.config``'s ``num_workers``,
    else every usable core (``dask.system.CPU_COUNT``)."""
    from dask.system import CPU_COUNT

    count = dask.config.get("num_workers", None)
    if isinstance(count, int) and not isinstance(count, bool) and count > 0:
        return count
    return max(1, int(CPU_COUNT))


def in_memory_sizes(shape, radius=(0, 0, 0), memory_limit=None, threads=None, folds=0):
    """Chunks and lanes of an in-memory run, by the file runs' budget rules.

    Sizes follow from the budget and the local scheduler's threads only,
    never from where the tasks run (a cluster's workers) or the machine's
    memory: chunks and lanes set the order of the float sums, and the API's
    answer is the same bits on any executor.

    Parameters
    ----------
    shape : tuple of 4 ints
        ``(x, y, z, volumes)``.
    radius : tuple of 3 ints, optional
    memory_limit : int, optional
        The call's budget; default :data:`IN_MEMORY_BUDGET`.
    threads : int, optional
        Default :func:`local_threads`.
    folds : int, optional
        Cross-validation folds of whole blocks: blocks thin enough along z
        to deal them (:func:`~p2s_dask.planning.plan.fold_chunks`).

    Returns
    -------
    chunks : tuple of 4 ints
        ``(cx, cy, cz, n)`` of :func:`~p2s_dask.planning.chunking.chunk_policy`
        for a float64 block, a :data:`IN_MEMORY_BLOCKS_SHARE` th of the budget.
    lanes : int
        :func:`~p2s_dask.planning.chunking.patch_lanes` within the rest.
    """
    budget = IN_MEMORY_BUDGET if memory_limit is None else int(memory_limit)
    threads = threads or local_threads()
    blocks = budget // IN_MEMORY_BLOCKS_SHARE
    spatial = chunk_policy(shape, 8, blocks, threads, radius, lanes_apart=True)
    if folds:
        spatial = fold_chunks(shape, spatial, radius, folds)
    lanes = patch_lanes(shape, radius, budget - blocks, threads, process_bytes=0)
    return (*spatial, int(shape[3])), lanes


def _from_numpy(x: np.ndarray, chunks) -> da.Array:
    """A dask array over views of ``x``.

    :func:`dask.array.from_array` copies NumPy input, which would double the
    memory of a call that is meant to add only a chunk's worth.
    """
    chunks = normalize_chunks(chunks, x.shape, dtype=x.dtype)
    name = f"p2s-input-{uuid.uuid4().hex}"
    dsk = {(name,) + tuple(idx): x[slc] for idx, slc in
           zip(np.ndindex(*[len(c) for c in chunks]), slices_from_chunks(chunks))}
    return da.Array(dsk, name, chunks, dtype=x.dtype)


def as_chunked(data, chunks=None, radius=(0, 0, 0)) -> da.Array:
    """A dask array of ``data`` whose chunks span all volumes.

    ``chunks`` may be a spatial chunk shape ``(cx, cy, cz)`` or a 4-tuple; the
    volume axis is always one chunk so each block holds whole feature vectors.
    NumPy input is wrapped without a copy.
    """
    shape = tuple(data.shape)
    spec = (in_memory_sizes(shape, radius)[0] if chunks is None
            else tuple(chunks)[:3] + (shape[3],))
    if isinstance(data, da.Array):
        arr = data if (chunks is None and len(data.chunks[3]) == 1) else data.rechunk(spec)
    else:
        arr = _from_numpy(np.asarray(data), spec)
    if len(arr.chunks[3]) != 1:
        arr = arr.rechunk({3: -1})
    # overlap() needs every chunk to be at least as thick as the halo
    thin = {a: -1 for a in range(3) if min(arr.chunks[a]) < radius[a]}
    if thin:
        arr = arr.rechunk({a: max(radius[a], max(arr.chunks[a])) for a in thin})
        thin = {a: -1 for a in range(3) if min(arr.chunks[a]) < radius[a]}
        if thin:
            arr = arr.rechunk(thin)
    return arr


def with_halo(arr: da.Array, radius) -> da.Array:
    """Blocks with a ``radius`` halo, zero beyond the image border."""
    if not any(radius):
        return arr
    depth = {0: radius[0], 1: radius[1], 2: radius[2], 3: 0}
    return da.overlap.overlap(arr, depth=depth, boundary={0: 0, 1: 0, 2: 0, 3: "none"})


def _interior(block, radius):
    sl = tuple(slice(r, block.shape[i] - r) for i, r in enumerate(radius))
    return block[sl]


def _shared_scatter_is_cheaper(groups, n, radius) -> bool:
    """For r = 0, one scatter of all volumes beats gathering each group's
    columns unless the groups are many and small."""
    if any(radius):
        return False
    fitted = [len(g.indices) for g in groups if g.denoise]
    return bool(fitted) and sum(m * m for m in fitted) >= 0.6 * n * n


def _as_range(indices):
    """``(start, stop)`` when ``indices`` are consecutive, else None."""
    idx = np.asarray(indices)
    if idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
        return int(idx[0]), int(idx[0] + idx.size)
    return None


def _volume_minima(block) -> np.ndarray:
    """Per-volume minimum of a block (a transposing copy only if it is strided)."""
    rows, _ = voxel_rows(block)
    if rows is None:
        rows = block.reshape(-1, block.shape[-1])
    return rows.min(axis=0).astype(np.float64)


@dataclass(frozen=True, eq=False)
class _StatsSpec:
    """What every block of a statistics pass computes (see :func:`summarize`)."""

    groups: tuple
    radius: tuple
    check_finite: bool = True
    method: str = "auto"  # how patch statistics are computed
    # the image's (x, y, z) when the blocks are all of it: lanes then sum
    # the compact cells of core.lagparts (else its windows, e.g. per fold)
    image_shape: tuple | None = None


def aligned(block: np.ndarray) -> np.ndarray:
    """``block``, or its copy in the same layout when its values are not
    aligned to their size.

    ``distributed`` hands a task the arrays that came over the network in
    the buffers they arrived in, at any byte offset. NumPy runs other loops
    over unaligned values, which sum in another order (measured: the
    statistics of a volume-major float64 block changed in the last bits), so
    the same block would give other bits on a cluster than here.
    """
    if block.flags.aligned:
        return block
    return block.copy(order="K")


def _summarize_block(block, mask, origin, spec: _StatsSpec) -> Summary:
    # one BLAS thread wherever the task runs: the thread count may change the
    # order of float sums, and a run must give the same bits on any executor
    with task_blas():
        return _block_summary(block, mask, origin, spec)


def _block_summary(block, mask, origin, spec: _StatsSpec, running=None) -> Summary:
    """One block's :class:`Summary`; with ``running`` (a lane's entries, see
    :func:`_lane_step`) lag statistics are added into its :class:`LagParts`."""
    groups, radius, method = spec.groups, spec.radius, spec.method
    block = aligned(block)
    inner = _interior(block, radius)
    n = block.shape[-1]
    summary = Summary(stats=[], minima=_volume_minima(inner))
    if spec.check_finite and np.issubdtype(block.dtype, np.inexact):
        bad = ~np.isfinite(inner)
        count = int(np.count_nonzero(bad))
        if count:
            local = np.unravel_index(int(np.argmax(bad)), inner.shape)
            summary.nonfinite = count
            summary.first_nonfinite = tuple(int(o + i) for o, i in
                                            zip(tuple(origin) + (0,), local))
            return summary
    ranges = [_as_range(g.indices) for g in groups if g.denoise]
    if block.flags.f_contiguous and not any(radius) and all(r is not None for r in ranges):
        # volume-major block, groups of consecutive volumes: each group's
        # volumes are a contiguous slab of the block, so their statistics
        # come without a copy and without the cross-group scatter
        summary.stats = [block_stats(block[..., slice(*_as_range(g.indices))], radius, mask)
                         if g.denoise else None for g in groups]
    elif _shared_scatter_is_cheaper(groups, n, radius):
        everything = block_stats(block, radius, mask)
        summary.stats = [everything.subset(list(g.indices)) if g.denoise else None
                         for g in groups]
    else:
        running = running or [None] * len(groups)
        summary.stats = [_group_stats(block, g.indices, radius, mask, method, into, origin)
                         if g.denoise else None for g, into in zip(groups, running)]
    return summary


def _uses_lag(m, radius, masked, method) -> bool:
    """Whether a group of ``m`` volumes gets lag statistics."""
    if not any(radius):
        return False
    return method == "lag" or (method == "auto" and lags_pay_off(m, radius, masked))


def _group_stats(block, indices, radius, mask, method="auto", into=None, origin=None):
    """One group's statistics: from lagged products where they pay off
    (patch radius > 0: ~63 m^2 products per voxel instead of 364 m^2), else
    the direct scatter; ``method`` 'lag' or 'direct' forces one. Lag
    statistics go into the :class:`LagParts` ``into`` when one is given
    (with the block's ``origin``; ``into`` is returned)."""
    rng = _as_range(indices)  # consecutive volumes: a view, no copy
    part = block[..., slice(*rng)] if rng is not None else block[..., list(indices)]
    if _uses_lag(part.shape[-1], radius, mask is not None, method):
        if into is not None:
            into.add(part, mask, origin)
            return into
        return lag_block_stats(part, radius, mask)
    return block_stats(part, radius, mask)


def _merge_summaries(*items: Summary) -> Summary:
    """The summaries' union, accumulated in the first one's scatters.

    In place: every summary is a task's result that feeds exactly one merge
    and is released once that merge has run, so nothing else sees it (and a
    merge holds two F x F scatters at once, not three).
    """
    with task_blas():  # a task of its own: the merges' rank-1 updates
        return _merged_in_first(items)


def _merged_in_first(items) -> Summary:
    out = items[0]
    for s in items[1:]:
        first = out.first_nonfinite
        if first is None or (s.first_nonfinite is not None and s.first_nonfinite < first):
            first = s.first_nonfinite
        if out.nonfinite or s.nonfinite:
            stats = []  # the run stops with an error; statistics are moot
        else:
            stats = [_merged_stats(a, b) for a, b in zip(out.stats, s.stats)]
        out = Summary(stats, np.minimum(out.minima, s.minima),
                      out.nonfinite + s.nonfinite, first)
    return out


def _merged_stats(a, b):
    """``a`` with ``b`` merged in (in place): statistics, or two lanes'
    :class:`LagParts`; a lane's own parts have had the block added already."""
    if a is None or a is b:
        return a
    if isinstance(a, LagParts):
        return a.merge(b)
    return merge(a, b, overwrite_a=True)


def _tree(items, fan_in=TREE_FAN_IN):
    """Merge delayed summaries in a tree of the given fan-in.

    Every summary waiting for its merge holds its F x F scatter, so large
    feature counts (patch_radius > 0) use a narrow tree.
    """
    merge_delayed = dask.delayed(_merge_summaries, pure=True)
    while len(items) > 1:
        items = [merge_delayed(*items[i:i + fan_in])
                 for i in range(0, len(items), fan_in)]
    return items[0]


def _chain(items, step=TREE_FAN_IN):
    """Merge delayed summaries along a chain, ``step`` new blocks per link.

    Dask then works through the blocks in order (a tree lets it take the
    groups in any order), so reading ahead of the current block pays off.
    """
    merge_delayed = dask.delayed(_merge_summaries, pure=True)
    total = merge_delayed(*items[:step])
    for i in range(step, len(items), step):
        total = merge_delayed(total, *items[i:i + step])
    return total


def _lane_step(lane, block, mask, origin, spec: _StatsSpec) -> Summary:
    """A lane's summary with one more block (``lane`` None: its first).

    Lag statistics are summed into the lane's :class:`LagParts` of each
    group (compact: no F x F matrix, however many blocks), other statistics
    are merged in place; ``lane`` is spent (see :func:`_merge_summaries`).
    """
    with task_blas():
        if lane is not None and lane.nonfinite:
            # the run stops with an error: only the census goes on
            census = _block_summary(block, mask, origin, replace(spec, groups=()))
            return _merge_summaries(lane, census)
        if lane is None:
            shape = spec.image_shape if mask is None else None
            running = [LagParts(len(g.indices), spec.radius, shape)
                       if g.denoise and _uses_lag(len(g.indices), spec.radius,
                                                  mask is not None, spec.method)
                       else None for g in spec.groups]
        else:
            running = lane.stats
        here = _block_summary(block, mask, origin, spec, running)
        return here if lane is None else _merge_summaries(lane, here)


def _lane_finish(lane: Summary) -> Summary:
    """The lanes' merged summary with its lag parts turned into
    :class:`Stats` (each F x F scatter formed here, once)."""
    with task_blas():  # each scatter is formed by matrix products
        lane.stats = [s.stats() if isinstance(s, LagParts) else s for s in lane.stats]
    return lane


def _lane_runs(sizes, lanes: int):
    """Split blocks, in order, into at most ``lanes`` runs of consecutive
    blocks holding about equal numbers of voxels."""
    ends = np.cumsum(sizes)
    cuts = {0, len(sizes)}
    for k in range(1, lanes):
        cuts.add(int(np.argmin(np.abs(ends - ends[-1] * k / lanes))) + 1)
    cuts = sorted(cuts)
    return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


@contextlib.contextmanager
def lanes_in_sequence(on: bool = True):
    """Build statistics graphs whose lanes each run as one task, reading and
    summing their blocks in turn (for schedulers in this process).

    In one graph every block read is ready from the start, and Dask's local
    scheduler gives a thread between two steps of its lane the highest
    priority read, often one of another lane's far blocks: the threads read
    blocks ahead and hold them (measured on the HCP-sized run at radius 1,
    73 blocks on two lanes: 4.6 GB under a 2 GiB budget). A lane run as one
    task by Dask's synchronous scheduler reads each block when it needs it.
    A cluster's scheduler weighs memory itself: its graphs stay as they are.
    """
    token = _lanes_in_sequence.set(bool(on))
    try:
        yield
    finally:
        _lanes_in_sequence.reset(token)


class _Opaque:
    """A lane's graph handed to a task as a value (Dask computes the
    collections it finds in a task's arguments before the task runs)."""

    def __init__(self, value):
        self.value = value


def _run_lane(lane: _Opaque) -> Summary:
    return dask.compute(lane.value, scheduler="sync")[0]


def _lanes(tasks, sizes, spec: _StatsSpec, lanes: int):
    """Statistics summed along ``lanes`` chains of blocks, then merged.

    With a patch a block's statistics are an F x F matrix of hundreds of
    MB; a lane holds instead the compact lag parts of its blocks
    (:class:`LagParts`), the lanes' parts merge, and the F x F scatter is
    formed once from the merged parts.
    """
    step = dask.delayed(_lane_step, pure=True)
    ends = []
    for run in _lane_runs(sizes, lanes):
        lane = None
        for i in run:
            block, mblock, origin = tasks[i]
            lane = step(lane, block, mblock, origin, spec)
        if _lanes_in_sequence.get():
            lane = dask.delayed(_run_lane, pure=True)(_Opaque(lane))
        ends.append(lane)
    return dask.delayed(_lane_finish, pure=True)(_tree(ends, 2))


def chunk_origins(chunks):
    """Start index of every chunk along each spatial axis."""
    return [np.cumsum((0,) + c[:-1]) for c in chunks[:3]]


def summarize(arr: da.Array, groups: list[Group], radius, mask=None,
              check_finite=True, method=None, lanes=None):
    """Pass 1: a delayed :class:`Summary` of the whole array.

    Parameters
    ----------
    arr : dask.array.Array (x, y, z, n), one chunk along the volumes
    groups : list of Group
    radius : tuple of int
    mask : dask.array.Array or ndarray (x, y, z) of bool, optional
        Voxels to fit on.
    check_finite : bool
        Count NaN/Inf values (skip when the caller has checked already).
    method : {'auto', 'lag', 'direct'}, optional
        How patch statistics are computed (default: the one set by
        :func:`statistics_method`, else 'auto').
    lanes : int, optional
        With a patch and large scatters (over :data:`SMALL_SCATTER_BYTES`), blocks are summed
        along this many chains, which bounds the F x F matrices held at once
        (default: an in-memory run's, see :func:`in_memory_sizes`).
    """
    method = _stats_method.get() if method is None else _check_method(method)
    spec = _StatsSpec(tuple(groups), tuple(radius), check_finite, method,
                      tuple(int(s) for s in arr.shape[:3]))
    tasks, sizes = _block_tasks(arr, radius, mask)
    return _merged(tasks, sizes, spec, lanes, arr.shape)


def fold_summaries(arr: da.Array, groups: list[Group], radius, mask, folds,
                   check_finite=True, lanes=None) -> list:
    """Pass 1 per fold: a delayed :class:`Summary` of each fold's blocks.

    The blocks, and each block's statistics, are those of
    :func:`summarize`, merged per fold instead of into one total (a fold is
    a set of whole blocks, e.g.
    :func:`~p2s_dask.core.crossval.block_folds` of the chunk grid). Compute
    them one at a time and each holds what :func:`summarize` holds.

    Parameters
    ----------
    arr, groups, radius, mask, check_finite, lanes
        As :func:`summarize` (the statistics method is the one set by
        :func:`statistics_method`).
    folds : ndarray of int, shape ``numblocks`` of ``arr``'s spatial axes
        Fold of every block, ``0 .. K-1``; every fold has a block.

    Returns
    -------
    list of Delayed
        One :class:`Summary` per fold.
    """
    spec = _StatsSpec(tuple(groups), tuple(radius), check_finite, _stats_method.get())
    tasks, sizes = _block_tasks(arr, radius, mask)
    labels = np.asarray(folds).reshape(-1)  # C order, as the tasks
    if labels.size != len(tasks):
        raise ValueError(f"{labels.size} fold labels for {len(tasks)} blocks")
    out = []
    for k in range(int(labels.max()) + 1):
        pick = np.flatnonzero(labels == k)
        out.append(_merged([tasks[i] for i in pick], [sizes[i] for i in pick], spec, lanes,
                           arr.shape))
    return out


def _merged(tasks, sizes, spec: _StatsSpec, lanes, shape):
    """The blocks' summaries merged into one (delayed): along lanes with a
    patch and large scatters, else a chain (small) or a narrow tree."""
    radius = spec.radius
    p = patch_size(radius)
    widest = max([len(g.indices) * p for g in spec.groups if g.denoise] or [1])
    if widest * widest * 8 > SMALL_SCATTER_BYTES and any(radius):
        if lanes is None:
            lanes = in_memory_sizes(shape, radius)[1]
        return _lanes(tasks, sizes, spec, lanes)
    fn = dask.delayed(_summarize_block, pure=True)
    parts = [fn(block, mblock, origin, spec) for block, mblock, origin in tasks]
    if widest * widest * 8 <= SMALL_SCATTER_BYTES:
        return _chain(parts)
    return _tree(parts, 2)


def _block_tasks(arr, radius, mask):
    """``(halo block, mask block, origin)`` of every block in C order, and
    the blocks' voxel counts."""
    halo = with_halo(arr, radius)
    blocks = halo.to_delayed()
    if mask is not None:
        mask = da.asarray(mask).astype(bool).rechunk(arr.chunks[:3])
        mask_blocks = mask.to_delayed()
    starts = chunk_origins(arr.chunks)
    tasks, sizes = [], []
    for idx in np.ndindex(*blocks.shape[:3]):
        origin = tuple(int(starts[a][idx[a]]) for a in range(3))
        mblock = None if mask is None else mask_blocks[idx]
        tasks.append((blocks[idx + (0,)], mblock, origin))
        sizes.append(int(np.prod([arr.chunks[a][idx[a]] for a in range(3)])))
    return tasks, sizes


@dataclass(frozen=True)
class FittedModels:
    """The regressors of every group and their combination over all volumes."""

    groups: tuple
    models: tuple  # LinearModel or None per group
    plan: LinearModel  # all volumes at once, pass-through volumes copied
    minima: np.ndarray  # per-volume minimum of the input
    calc_dtype: np.dtype = np.dtype(np.float64)  # arithmetic of the prediction


def fit_models(summary: Summary, groups: list[Group], radius, model: str,
               alpha: float, calc_dtype=np.float64, spend: bool = False) -> FittedModels:
    """Solve every group's regressions from a :class:`Summary`.

    ``calc_dtype`` is the arithmetic of the prediction passes (the fit is
    always float64). With ``spend`` the summary's scatters are overwritten
    (each becomes its inverse: with a patch that saves an F x F copy of
    hundreds of MB); only for a summary nobody reads again, never one a
    Dask scheduler holds (a retried task would see it spent).
    """
    if summary.nonfinite:
        raise InputError(describe_nonfinite(summary.nonfinite, summary.first_nonfinite))
    p = patch_size(radius)
    models = []
    for g, st in zip(groups, summary.stats):
        if st is None:
            models.append(None)
            continue
        if st.count < 2:
            raise InputError(
                f"the mask selects {st.count} voxel(s): too few to fit the {g.name} group"
            )
        models.append(fit(st, p, model, alpha, overwrite=spend))
    n = summary.minima.shape[0]
    plan = combine(models, [g.indices for g in groups], n, p)
    return FittedModels(tuple(groups), tuple(models), plan, summary.minima,
                        np.dtype(calc_dtype))


class _RunningMin:
    """Per-volume minimum of the float64 pieces passing through."""

    def __init__(self, n):
        self.value = np.full(n, np.inf)

    def __call__(self, piece):
        np.minimum(self.value, piece.min(axis=0), out=self.value)
        return piece


def _clip_negatives(piece):
    return np.maximum(piece, 0.0, out=piece)


def block_range(block, fitted: FittedModels, radius, highest=True) -> np.ndarray:
    """Per-volume ``(minimum, maximum)``, shape ``(2, n)``, of the unshifted
    prediction of one block with its halo (the maximum only when
    ``highest``, else -inf): one task of a minima pass."""
    block = aligned(block)  # as every task's block: see aligned()
    with task_blas():
        return block_prediction_range(block, radius, fitted.plan, dtype=fitted.calc_dtype,
                                      highest=highest)


def _predict_min_chunk(block, fitted: FittedModels, radius):
    return block_range(block, fitted, radius, highest=False)[0].reshape(1, 1, 1, -1)


class Outside:
    """Counts values that an integer ``dtype`` cannot hold (they are clipped
    by the cast), piece by piece; cheap when none are: a piece whose minimum
    and maximum fit is not counted."""

    def __init__(self, dtype):
        info = np.iinfo(dtype)
        # values that round into the range are fine
        self.lo, self.hi = info.min - 0.5, info.max + 0.5
        self.count = 0

    def __call__(self, piece):
        if piece.min() < self.lo or piece.max() > self.hi:
            self.count += int(np.count_nonzero(piece < self.lo))
            self.count += int(np.count_nonzero(piece > self.hi))
        return piece


def _post(clip, scale, counter):
    """The transform of each predicted piece: clip, scale, count."""
    if not clip and scale is None and counter is None:
        return None

    def transform(piece):
        if clip:
            np.maximum(piece, 0.0, out=piece)
        if scale is not None:
            piece *= piece.dtype.type(scale)
        return counter(piece) if counter is not None else piece
    return transform


@dataclass(frozen=True)
class Cast:
    """How predicted values become the output's: clipped at 0 (``clip``),
    multiplied by ``scale`` (1 / scl_slope of a scaled integer output),
    cast to ``dtype``."""

    dtype: object
    clip: bool = False
    scale: float | None = None


def predict_chunk(block, fitted: FittedModels, radius, shift, cast: Cast, out=None,
                  counter=None):
    """Denoised, shifted, clipped and cast values of one block's interior
    (into ``out`` when given: an array of the interior's shape and the
    cast's dtype, in the block's layout); ``counter`` (an :class:`Outside`)
    counts values the cast clips."""
    block = aligned(block)  # see aligned()
    if out is None:
        out = np.empty(_interior(block, radius).shape[:3] + (block.shape[-1],),
                       dtype=cast.dtype, order=rows_order(block))
    # the shift rides along with the intercept; the cast happens as values
    # are stored
    with task_blas():
        return predict_block(block, radius, fitted.plan.shifted(shift),
                             dtype=fitted.calc_dtype,
                             transform=_post(cast.clip, cast.scale, counter), out=out)


def kept_prediction_range(block, fitted: FittedModels, radius, keep) -> np.ndarray:
    """Per-volume ``(minimum, maximum)``, shape ``(2, n)``, of the unshifted
    prediction of one block, as the minima pass computes them, from one
    prediction whose products (before the intercept) go to ``keep`` for
    :func:`finish_chunk` (the prediction pass then computes none)."""
    block = aligned(block)
    with task_blas():
        products = predict_block(block, radius, fitted.plan.products_only(),
                                 dtype=fitted.calc_dtype)
    keep(products)
    return with_intercept(products.min(axis=(0, 1, 2)), products.max(axis=(0, 1, 2)),
                          fitted.plan)


def finish_chunk(products, fitted: FittedModels, shift, cast: Cast, out=None, counter=None):
    """What :func:`predict_chunk` gives for a block, from the products that
    :func:`kept_prediction_range` kept of it: the same bits."""
    if out is None:
        out = np.empty(products.shape, dtype=cast.dtype, order=rows_order(products))
    return finish_products(products, fitted.plan.shifted(shift), out=out,
                           transform=_post(cast.clip, cast.scale, counter))


def _one_key(obj):
    """``obj`` as one graph key: a plain argument of ``map_blocks`` is copied
    into every task, and so serialised once per task for a distributed
    scheduler (the fitted weights are megabytes)."""
    if obj is None or dask.is_dask_collection(obj):
        return obj
    return dask.delayed(obj, pure=True)


def prediction_minima(arr: da.Array, fitted, radius) -> da.Array:
    """Pass 2: per-volume minimum ``(n,)`` of the unshifted prediction."""
    halo = with_halo(arr, radius)
    n = arr.shape[3]
    chunks = tuple((1,) * len(c) for c in arr.chunks[:3]) + ((n,),)
    mins = da.map_blocks(_predict_min_chunk, halo, _one_key(fitted), radius, dtype=np.float64,
                         chunks=chunks, meta=np.empty((0, 0, 0, 0)))
    return mins.min(axis=(0, 1, 2))


def predict(arr: da.Array, fitted, radius, shift=None, clip=False,
            out_dtype=np.float64) -> da.Array:
    """Pass 3: the denoised array (shifted, clipped and cast per chunk).

    ``fitted`` and ``shift`` may be concrete or Delayed.
    """
    halo = with_halo(arr, radius)
    dtype = np.dtype(out_dtype)
    return da.map_blocks(predict_chunk, halo, _one_key(fitted), radius, _one_key(shift),
                         Cast(dtype, clip),
                         dtype=dtype, chunks=arr.chunks,
                         meta=np.empty((0, 0, 0, 0), dtype=dtype))


def _shifts(fitted: FittedModels, pred_minima):
    return intensity_shift(fitted.minima, pred_minima)


def denoise(arr: da.Array, spec: DenoiseSpec, out_dtype=np.float32) -> da.Array:
    """The whole method as one lazy graph with bounded memory.

    Each pass re-reads the input (:func:`dask.graph_manipulation.bind` makes a
    copy of the input graph that waits for the previous pass), so no pass holds
    the data in memory waiting for a global result.

    Parameters
    ----------
    arr : dask.array.Array (x, y, z, n), one chunk along the volumes
    spec : DenoiseSpec
    out_dtype : dtype, optional

    Returns
    -------
    dask.array.Array
    """
    radius = spec.radius
    summary = summarize(arr, spec.groups, radius, spec.mask)
    fitted = dask.delayed(fit_models, pure=True)(summary, spec.groups, radius, spec.model,
                                                 spec.alpha, spec.calc_dtype)
    shift = None
    after = fitted
    if spec.shift_intensity:
        pred_min = prediction_minima(bind(arr, fitted), fitted, radius)
        shift = dask.delayed(_shifts, pure=True)(fitted, pred_min)
        after = shift
    return predict(bind(arr, after), fitted, radius, shift, spec.clip_negative_vals,
                   out_dtype)
