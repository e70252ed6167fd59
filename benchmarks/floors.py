"""Floors of a denoising run, measured on this machine in the same run.

A run cannot be faster than its own arithmetic done at this machine's BLAS
speed (the *compute floor*), nor than reading its input once and writing its
output once (the *I/O floor*; for ``.nii.gz`` the *gzip floor*: decompressing
the input and compressing an output of the same size). The benchmarks report
a run against both::

    whole / (compute + I/O)       (the passes done one after the other)
    whole / max(compute, I/O)     (perfect overlap of the two)

Compute floor: the BLAS calls a run makes, on float64 (statistics) and
``calc_dtype`` (prediction) operands of the real sizes, cut into the pieces
the engine cuts a block into, timed with as many threads as the run's Dask
threads, each with one BLAS thread (as the engine runs). Only the BLAS calls
are timed: centring, copies, reductions and I/O are the run's overhead.

- radius 0, statistics: per group and block, ``b.T @ b`` of the
  ``(voxels, m)`` pieces of the fitting voxels (a rank-k update, dsyrk; one
  more column, of ones, for integer data of up to 16 bits: the exact path);
- radius 0, prediction: per group and piece, ``W_g^T @ X_g^T``, a GEMM
  ``(m x m) @ (m x voxels)`` over every voxel;
- radius > 0, statistics: per group and block, one ``(m x K) @ (K x m)``
  lag product per lag of half the lags (63 for r = 1) and per plane of the
  block (see ``p2s_dask/core/lagstats.py``); where the engine takes the
  direct scatter instead (a mask and few volumes) the rank-k updates of the
  ``(voxels, 27 m)`` patch features;
- radius > 0, prediction: per group and sub-box, one GEMM
  ``(voxels x m) @ (m x m)`` per patch offset: the ``27 (m - 1)`` features
  of each of the ``m`` volumes (the engine's weights also hold the zeros of
  a volume's own features and of the other group, which this floor leaves
  out).

The statistics pass runs once; the prediction once per pass that predicts
(twice with the intensity shift: the minima pass and the output pass). The
fit between them (solving from the statistics: ``m^3`` for radius 0, about
``(27 m)^3`` for radius 1, a few percent of that run's statistics at HCP
size) is left out.

The calls are spread over all the threads even when the run has fewer
blocks than threads: the floor is what the machine can do. When they would
take longer than ``max_seconds``, a random sample of them is timed and the
time scaled by the floating point operations left (the calls of a run cost
the same per operation, so the sample stands for the whole).
"""

from __future__ import annotations

import collections
import inspect
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from p2s_dask.core.lagstats import lags_pay_off
from p2s_dask.core.layout import piece_rows
from p2s_dask.core.patches import patch_size, sub_boxes
from p2s_dask.core.predict import predict_block
from p2s_dask.core.stats import block_stats
from p2s_dask.config.groups import make_groups

# bytes per read or write of the I/O floors
CHUNK = 16 << 20


def _default(function, name):
    """The default of one keyword of an engine function: the floor follows
    the engine's piece sizes if they change."""
    return inspect.signature(function).parameters[name].default


# the engine's piece sizes (bytes of one piece of a block)
STATS_PIECE = _default(block_stats, "max_bytes")
STATS_MIN_ROWS = _default(block_stats, "min_rows")
PREDICT_PIECE = _default(predict_block, "max_bytes")


# ----------------------------------------------------------------------------
# I/O floors


def drop_caches() -> bool:
    """Write dirty pages and drop the page cache, so that reads come from
    the disk (root only). Returns whether the cache was dropped."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _fill(path: Path, size: int, pieces) -> None:
    """Write ``size`` bytes cycling through ``pieces`` and fsync them."""
    with open(path, "wb", buffering=0) as fh:
        for piece in itertools.cycle(pieces):
            if size <= 0:
                break
            size -= fh.write(piece[:min(len(piece), size)])
        os.fsync(fh.fileno())


def io_floor(src: Path, scratch: Path) -> dict:
    """Seconds to read ``src`` once and to write (and fsync) as many bytes.

    Parameters
    ----------
    src : Path
        The run's input.
    scratch : Path
        A file to write (on the output's disk); removed afterwards.

    Returns
    -------
    dict
        ``bytes``, ``read_s``, ``write_s``, ``floor_s`` (their sum) and
        ``cache_dropped``.
    """
    dropped = drop_caches()
    t0 = time.perf_counter()
    size = 0
    with open(src, "rb", buffering=0) as fh:
        buf = bytearray(CHUNK)
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            size += n
    read_s = time.perf_counter() - t0
    # random bytes: nothing on the way (a compressing file system) shortens them
    block = np.random.default_rng(1).integers(0, 255, CHUNK, dtype=np.uint8).tobytes()
    t0 = time.perf_counter()
    _fill(scratch, size, [block])
    write_s = time.perf_counter() - t0
    scratch.unlink()
    return dict(bytes=size, read_s=read_s, write_s=write_s, floor_s=read_s + write_s,
                cache_dropped=dropped)


def _gzip_settings(level: int):
    """``(backend, isal level, threads, block bytes)`` of the project's
    ``.nii.gz`` writer, so that the floor compresses as a run does."""
    from p2s_dask.io import nifti_stream

    backend = nifti_stream.resolve_gzip_backend()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else (os.cpu_count() or 1)
    threads = max(1, min(nifti_stream._ISAL_MAX_THREADS, cores))
    return backend, nifti_stream._isal_level(level), threads, nifti_stream._ISAL_BLOCK


def _gunzip_stream(fh, backend):
    if backend == "isal":
        from isal import igzip
        return igzip.IGzipFile(fileobj=fh, mode="rb")
    import gzip
    return gzip.GzipFile(fileobj=fh, mode="rb")


def gzip_floor(src: Path, scratch: Path, level: int = 1, keep: int = 4) -> dict:
    """Seconds to gunzip ``src`` once and to gzip (and fsync) an output of
    the same size, as the project's reader and writer do (ISA-L when
    installed: its single-threaded reader, its threaded writer).

    The output's bytes are ``keep`` pieces of the decompressed input taken
    at exponentially spaced places, repeated: deflate looks back 32 KiB
    only, so repeats of 16 MiB pieces compress as the data itself does.

    Parameters
    ----------
    src : Path
        The ``.nii.gz`` input.
    scratch : Path
        The ``.gz`` file to write; removed afterwards.
    level : int
        The gzip level of the run's writer (1 by default).
    keep : int
        Pieces of the input kept for the output.

    Returns
    -------
    dict
        ``bytes`` (decompressed), ``compressed_bytes`` (of ``src``),
        ``written_bytes`` (of the output), ``read_s``, ``write_s``,
        ``floor_s``, ``backend``, ``threads``, ``cache_dropped``.
    """
    backend, isal_level, threads, block = _gzip_settings(level)
    dropped = drop_caches()
    kept = collections.deque(maxlen=keep)
    t0 = time.perf_counter()
    size = 0
    with open(src, "rb") as raw, _gunzip_stream(raw, backend) as stream:
        buf = bytearray(CHUNK)
        for i in itertools.count():
            n = stream.readinto(buf)
            if not n:
                break
            size += n
            if i & (i - 1) == 0:  # pieces 0, 1, 2, 4, 8, ...
                kept.append(bytes(buf[:n]))
    read_s = time.perf_counter() - t0
    pieces = list(kept) or [b"\0"]
    t0 = time.perf_counter()
    with open(scratch, "wb") as fh:
        if backend == "isal":
            from isal import igzip_threaded
            out = igzip_threaded.open(fh, "wb", compresslevel=isal_level,
                                      threads=threads, block_size=block)
        else:
            import gzip
            out = gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=level)
            threads = 1
        left = size
        for piece in itertools.cycle(pieces):
            if left <= 0:
                break
            left -= out.write(piece[:min(len(piece), left)])
        out.close()
        fh.flush()
        os.fsync(fh.fileno())
    write_s = time.perf_counter() - t0
    written = scratch.stat().st_size
    scratch.unlink()
    return dict(bytes=size, compressed_bytes=src.stat().st_size, written_bytes=written,
                read_s=read_s, write_s=write_s, floor_s=read_s + write_s, backend=backend,
                threads=threads, cache_dropped=dropped)


# ----------------------------------------------------------------------------
# the BLAS calls of a run


@dataclass(frozen=True)
class Syrk:
    """``b.T @ b`` of a ``(rows, cols)`` float64 piece ``b``: NumPy runs it as
    a rank-k update (dsyrk), as the engine's statistics do."""

    rows: int
    cols: int
    order: str = "F"

    @property
    def flops(self) -> float:
        return float(self.rows) * self.cols * (self.cols + 1)

    def buffers(self):
        return {("syrk", self.order): (self.rows, self.cols)}

    def run(self, bufs):
        b = bufs[("syrk", self.order)][:self.rows, :self.cols]
        return b.T @ b


@dataclass(frozen=True)
class Gemm:
    """``a @ b`` of ``(p, q)`` and ``(q, r)`` operands of ``dtype`` into a
    buffer (slices of larger buffers, as the engine's pieces are), through
    NumPy's matmul as the engine calls it (dgemm or sgemm); ``trans_b``: ``b``
    is the transpose of a row-major ``(r, q)`` array (the lag products'
    ``A B^T``)."""

    p: int
    q: int
    r: int
    dtype: str = "float64"
    trans_b: bool = False

    @property
    def flops(self) -> float:
        return 2.0 * self.p * self.q * self.r

    def buffers(self):
        b = ("bt", self.dtype, (self.r, self.q)) if self.trans_b else \
            ("b", self.dtype, (self.q, self.r))
        return {("a", self.dtype): (self.p, self.q), b[:2]: b[2],
                ("c", self.dtype): (self.p, self.r)}

    def run(self, bufs):
        a = bufs[("a", self.dtype)][:self.p, :self.q]
        if self.trans_b:
            b = bufs[("bt", self.dtype)][:self.r, :self.q].T
        else:
            b = bufs[("b", self.dtype)][:self.q, :self.r]
        return np.matmul(a, b, out=bufs[("c", self.dtype)][:self.p, :self.r])


@dataclass(frozen=True)
class Task:
    """The BLAS calls of one engine task (one block) for one group."""

    calls: tuple

    @property
    def flops(self) -> float:
        return sum(c.flops for c in self.calls)

    def run(self, bufs):
        for call in self.calls:
            call.run(bufs)


def split_tasks(tasks, pieces: int):
    """Cut the tasks into about ``pieces`` runs of consecutive calls.

    The floor is the arithmetic on all the run's threads: a run of few
    large blocks (one block, one thread busy) must not raise it, and a
    sample timed within ``max_seconds`` needs more than a few tasks.
    """
    target = sum(t.flops for t in tasks) / max(1, pieces)
    out = []
    for task in tasks:
        run, flops = [], 0.0
        for call in task.calls:
            run.append(call)
            flops += call.flops
            if flops >= target:
                out.append(Task(tuple(run)))
                run, flops = [], 0.0
        if run:
            out.append(Task(tuple(run)))
    return out


def _buffer_shapes(tasks) -> dict:
    """The largest operand of every kind: one buffer each, sliced per call."""
    shapes = {}
    for task in tasks:
        for call in dict.fromkeys(task.calls):
            for key, shape in call.buffers().items():
                old = shapes.get(key, (0, 0))
                shapes[key] = (max(old[0], shape[0]), max(old[1], shape[1]))
    return shapes


def _allocate(shapes, seed) -> dict:
    """Operands filled with noise (no zeros or denormals to speed BLAS up);
    'F' for the volume-major blocks of a NIfTI input, else C order."""
    rng = np.random.default_rng(seed)
    bufs = {}
    for key, shape in shapes.items():
        dtype = np.float64 if key[0] == "syrk" else np.dtype(key[1])
        order = key[1] if key[0] == "syrk" else "C"
        buf = np.empty(shape, dtype=dtype, order=order)
        rng.standard_normal(out=buf.reshape(-1, order="A"), dtype=dtype)
        bufs[key] = buf
    return bufs


def time_tasks(tasks, threads: int, max_seconds: float | None = None, seed: int = 0) -> dict:
    """Run ``tasks`` on ``threads`` threads with one BLAS thread each.

    Tasks are cut into runs of calls (:func:`split_tasks`) and taken in a
    random order; past ``max_seconds`` no new one is started and the time is
    scaled up by the operations left.

    Returns
    -------
    dict
        ``seconds`` (all tasks, scaled when sampled), ``measured_s``,
        ``gflop`` (all tasks), ``fraction`` (of the operations timed),
        ``gflop_per_s``, ``tasks``, ``threads``.
    """
    tasks = split_tasks([t for t in tasks if t.calls], 64 * threads)
    total = sum(t.flops for t in tasks)
    if not tasks or total == 0:
        return dict(seconds=0.0, measured_s=0.0, gflop=0.0, fraction=1.0,
                    gflop_per_s=None, tasks=0, threads=threads)
    order = np.random.default_rng(seed).permutation(len(tasks)).tolist()
    shapes = _buffer_shapes(tasks)
    start = [0.0]
    ready = threading.Barrier(threads + 1, action=lambda: start.__setitem__(0, time.perf_counter()))
    lock = threading.Lock()
    state = dict(next=0, flops=0.0, done=0)
    errors = []

    def worker(k):
        try:
            bufs = _allocate(shapes, seed + k)
            # untimed: the first call of a BLAS thread sets up its buffers
            tasks[order[k % len(order)]].calls[0].run(bufs)
        except BaseException as exc:  # never leave the others at the barrier
            errors.append(exc)
            ready.abort()
            return
        ready.wait()
        while True:
            with lock:
                i = state["next"]
                late = max_seconds is not None and i > 0 and \
                    time.perf_counter() - start[0] > max_seconds
                if i >= len(order) or late:
                    return
                state["next"] = i + 1
            task = tasks[order[i]]
            task.run(bufs)
            with lock:
                state["flops"] += task.flops
                state["done"] += 1

    with threadpool_limits(limits=1, user_api="blas"):
        pool = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(threads)]
        for t in pool:
            t.start()
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            pass
        for t in pool:
            t.join()
    if errors:
        raise errors[0]
    measured = time.perf_counter() - start[0]
    fraction = state["flops"] / total
    return dict(seconds=measured / fraction, measured_s=measured, gflop=total / 1e9,
                fraction=fraction, gflop_per_s=state["flops"] / measured / 1e9,
                tasks=len(tasks), threads=threads)


# ----------------------------------------------------------------------------
# which calls: blocks, pieces, lags


def blocks(shape, chunks):
    """Interior shapes of the engine's blocks (a list, one per block)."""
    per_axis = []
    for n, c in zip(shape[:3], chunks[:3]):
        c = max(1, int(c))
        per_axis.append([c] * (int(n) // c) + ([int(n) % c] if int(n) % c else []))
    return [tuple(b) for b in itertools.product(*per_axis)]


def _fitting_rows(voxels: int, mask_fraction: float) -> int:
    return int(round(voxels * mask_fraction))


def _syrk_pieces(rows: int, cols: int, max_bytes: int, order: str):
    """The rank-k updates of ``rows`` rows, cut as the engine cuts them."""
    step = piece_rows(cols, 8, max_bytes)
    return [Syrk(min(step, rows - j), cols, order) for j in range(0, rows, step)]


def half_lags(radius):
    """The lags of half the lag products (the rest are their transposes)."""
    ranges = [range(-2 * r, 2 * r + 1) for r in radius]
    return [d for d in itertools.product(*ranges) if d >= (0, 0, 0)]


def _lag_calls(interior, radius, m, mask_fraction):
    """The lag products of one group on one block (``lagstats.py``).

    Axes sorted from thinnest (slow: one product per plane) to widest; a lag
    ``e`` covers ``n + 2 r - |e|`` voxels along each axis, lines padded by
    ``2 r`` along the fast one. With a mask, one product per lag over the
    block's fitting voxels (gathered by classes).
    """
    with_halo = [n + 2 * r for n, r in zip(interior, radius)]
    perm = np.argsort(with_halo, kind="stable")
    n = [int(interior[a]) for a in perm]
    r = [int(radius[a]) for a in perm]
    line = n[2] + 4 * r[2]
    calls = []
    for lag in half_lags(r):
        zero = not any(lag)
        if mask_fraction < 1:
            planes, cols = 1, _fitting_rows(math.prod(n), mask_fraction)
        else:
            planes = n[0] + 2 * r[0] - abs(lag[0])
            cols = (n[1] + 2 * r[1] - abs(lag[1])) * line
        if cols <= 0:
            continue
        # lag 0 carries a row of ones (the sums) and is symmetric
        call = Syrk(cols, m + 1, "F") if zero else Gemm(m, cols, m, trans_b=True)
        calls += [call] * planes
    return calls


def statistics_tasks(shape, chunks, group_sizes, radius=(0, 0, 0), mask_fraction=1.0,
                     integer=False):
    """The BLAS calls of the statistics pass, one :class:`Task` per group and block.

    Parameters
    ----------
    shape : sequence of int
        ``(x, y, z, ...)``: the spatial shape is used.
    chunks : sequence of 3 int
        The run's spatial chunks.
    group_sizes : list of int
        Volumes of each denoised group.
    radius : tuple of 3 int
    mask_fraction : float
        Fitting voxels over all voxels.
    integer : bool
        Integer input of up to 16 bits (radius 0: the exact path, one more column).
    """
    radius = tuple(int(r) for r in radius)
    tasks = []
    for interior in blocks(shape, chunks):
        voxels = math.prod(interior)
        for m in group_sizes:
            if not any(radius):
                cols = m + 1 if integer else m
                calls = _syrk_pieces(_fitting_rows(voxels, mask_fraction), cols,
                                     STATS_PIECE, "F")
            elif lags_pay_off(m, radius, mask_fraction < 1):
                calls = _lag_calls(interior, radius, m, mask_fraction)
            else:
                f = m * patch_size(radius)
                budget = max(STATS_PIECE, STATS_MIN_ROWS * f * 8)
                calls = []
                for box in sub_boxes(interior, f, budget):
                    rows = _fitting_rows(math.prod(b - a for a, b in box), mask_fraction)
                    calls += [Syrk(rows, f, "C")] if rows else []
            tasks.append(Task(tuple(calls)))
    return tasks


def prediction_tasks(shape, chunks, group_sizes, n_volumes, radius=(0, 0, 0),
                     dtype="float64"):
    """The BLAS calls of one prediction pass (every voxel), per group and block.

    Pieces are cut for all ``n_volumes`` of a block, as the engine cuts them.
    """
    radius = tuple(int(r) for r in radius)
    dtype = np.dtype(dtype)
    tasks = []
    for interior in blocks(shape, chunks):
        voxels = math.prod(interior)
        for m in group_sizes:
            if not any(radius):
                step = piece_rows(n_volumes, dtype.itemsize, PREDICT_PIECE)
                calls = [Gemm(m, m, min(step, voxels - j), dtype.name)
                         for j in range(0, voxels, step)]
            else:
                calls = []
                for box in sub_boxes(interior, n_volumes, PREDICT_PIECE):
                    nvox = math.prod(b - a for a, b in box)
                    calls += [Gemm(nvox, m, m, dtype.name)] * patch_size(radius)
            tasks.append(Task(tuple(calls)))
    return tasks


def group_sizes(bvals, b0_threshold=50, b0_denoising=True):
    """Volumes of each group that is denoised (the b0 / DWI split)."""
    bvals = np.asarray(bvals, dtype=float).ravel()
    return [len(g.indices) for g in make_groups(bvals, bvals.size, b0_threshold=b0_threshold,
                                                 b0_denoising=b0_denoising) if g.denoise]


def compute_floor(shape, bvals, chunks, *, radius=(0, 0, 0), mask_voxels=None,
                  threads=None, predict_dtype="float64", prediction_passes=1,
                  integer=False, max_seconds=20.0, b0_threshold=50, b0_denoising=True,
                  seed=0) -> dict:
    """The run's arithmetic timed at this machine's BLAS speed.

    Parameters
    ----------
    shape : sequence of 4 int
        ``(x, y, z, volumes)``.
    bvals : array-like
        Gives the groups (b0 and diffusion-weighted, as the run splits them).
    chunks : sequence of 3 int
        The run's spatial chunks (its report's ``plan.chunks``).
    radius : int or tuple of 3 int
    mask_voxels : int, optional
        Fitting voxels (default all).
    threads : int, optional
        The run's Dask threads (default: the usable cores).
    predict_dtype : str
        Arithmetic of the prediction (the statistics are float64).
    prediction_passes : int
        Passes that predict (2 with the intensity shift).
    integer : bool
        Integer input of up to 16 bits.
    max_seconds : float or None
        Time budget of each of the two parts (None: time every call).
    b0_threshold, b0_denoising
        As the run's options.
    seed : int
        Order of the blocks and values of the operands.

    Returns
    -------
    dict
        ``statistics`` and ``prediction`` (one pass) as :func:`time_tasks`
        returns them, ``seconds`` (statistics + passes x prediction) and
        the parameters.
    """
    if np.isscalar(radius):
        radius = (int(radius),) * 3
    radius = tuple(int(r) for r in radius)
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    total = math.prod(shape[:3])
    fraction = 1.0 if mask_voxels is None else mask_voxels / total
    sizes = group_sizes(bvals, b0_threshold, b0_denoising)
    stats = time_tasks(statistics_tasks(shape, chunks, sizes, radius, fraction, integer),
                       threads, max_seconds, seed)
    pred = time_tasks(prediction_tasks(shape, chunks, sizes, int(shape[3]), radius,
                                       predict_dtype), threads, max_seconds, seed)
    return dict(seconds=stats["seconds"] + prediction_passes * pred["seconds"],
                statistics=stats, prediction=pred, prediction_passes=prediction_passes,
                group_sizes=sizes, radius=list(radius), chunks=list(chunks),
                mask_voxels=mask_voxels, threads=threads, predict_dtype=str(predict_dtype),
                integer=integer, max_seconds=max_seconds)


def run_options(out) -> dict:
    """The options a CLI run wrote into its output's ``.json`` sidecar
    (``P2SDask.Options``: the radius, the mask, the shift, ``calc_dtype``)."""
    name = str(out)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return json.loads(Path(name + ".json").read_text())["P2SDask"]["Options"]


def floor_of_run(report: dict, out, bvals, *, integer: bool,
                 max_seconds: float | None = 20.0, radius=None) -> dict:
    """The compute floor of the CLI run that wrote ``out`` and ``report``
    (its ``--report-json``): its shape, chunks, threads, radius, mask,
    groups and prediction arithmetic, timed on this machine now. ``radius``
    overrides the run's (e.g. a run that chose it: the floor of the largest
    radius it scored)."""
    opts = run_options(out)
    if opts.get("groups"):
        raise ValueError("the compute floor knows the b0 / DWI groups only")
    if radius is None:
        radius = list(opts["patch_radius"])
        radius = tuple(radius * 3 if len(radius) == 1 else radius)
    mask_voxels = None
    if opts.get("mask"):
        import nibabel as nib
        mask_voxels = int(np.count_nonzero(np.asanyarray(nib.load(opts["mask"]).dataobj)))
    plan = report["plan"]
    # the prediction runs once more for the intensity shift (the minima
    # pass), unless the minima pass kept its predictions for the last one
    kept = bool(plan.get("keep_predictions")) and any(radius)
    passes = 1 + bool(opts["shift_intensity"] and not kept)
    return compute_floor(report["shape"], bvals, plan["chunks"], radius=radius,
                         mask_voxels=mask_voxels, threads=plan["threads_per_worker"],
                         predict_dtype=opts["calc_dtype"], prediction_passes=passes,
                         integer=integer, max_seconds=max_seconds,
                         b0_threshold=opts["b0_threshold"],
                         b0_denoising=opts["b0_denoising"])


# ----------------------------------------------------------------------------
# the run


def run_cli(src, out, memory_limit: str, extra=()) -> dict:
    """Run ``p2s-dask denoise SRC OUT`` in a fresh process, page cache
    dropped, sampling the RSS of its whole process tree.

    Returns
    -------
    dict
        ``wall_s`` (process start included), ``peak_rss_tree``,
        ``command`` and the fields of the run's ``--report-json`` (``stages``,
        ``plan``, ``shape``, ``resumed``, ...).
    """
    from p2s_dask.run.memory import PeakMemory

    report = Path(str(out) + ".report.json")
    cmd = [sys.executable, "-m", "p2s_dask.fronts.cli", "denoise", str(src), str(out),
           "--memory-limit", memory_limit, "--report-json", str(report), "--quiet",
           "--overwrite", *extra]
    drop_caches()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    with PeakMemory(proc.pid) as peak:
        rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"p2s-dask failed with exit code {rc}")
    stages = json.loads(report.read_text())
    report.unlink()
    return dict(wall_s=wall, peak_rss_tree=peak.peak, command=" ".join(cmd[1:]), **stages)


# ----------------------------------------------------------------------------
# ratios and targets

# the targets of issue 12
TARGET_SUM = 1.25
TARGET_MAX = 1.6
TARGET_RSS = 2.5 * 2**30


def ratios(wall_s: float, compute_s: float, io_s: float, peak_rss: int | None = None) -> dict:
    """The run against its floors, and whether each target is met."""
    out = dict(to_sum=wall_s / (compute_s + io_s), to_max=wall_s / max(compute_s, io_s),
               target_sum=TARGET_SUM, target_max=TARGET_MAX)
    out["sum_ok"] = out["to_sum"] <= TARGET_SUM
    out["max_ok"] = out["to_max"] <= TARGET_MAX
    if peak_rss is not None:
        out.update(peak_rss=peak_rss, target_rss=TARGET_RSS, rss_ok=peak_rss < TARGET_RSS)
    return out


def ratio_rows(r: dict, io_name: str = "I/O") -> list:
    """Table rows ``(name, value)`` of :func:`ratios`."""
    def mark(ok):
        return "ok" if ok else "MISSED"

    rows = [(f"whole / (compute + {io_name} floor)",
             f"{r['to_sum']:.2f}  (target <= {r['target_sum']}: {mark(r['sum_ok'])})"),
            (f"whole / max(compute, {io_name} floor)",
             f"{r['to_max']:.2f}  (target <= {r['target_max']}: {mark(r['max_ok'])})")]
    if "peak_rss" in r:
        rows.append(("peak RSS, process tree",
                     f"{r['peak_rss'] / 2**30:.2f} GiB  (target < "
                     f"{r['target_rss'] / 2**30:g} GiB: {mark(r['rss_ok'])})"))
    return rows


def floor_rows(floor: dict) -> list:
    """Table rows ``(name, value)`` of a :func:`compute_floor` result."""
    def part(p):
        sampled = "" if p["fraction"] >= 0.999 else \
            f", {100 * p['fraction']:.0f}% timed and scaled"
        rate = "" if p["gflop_per_s"] is None else f", {p['gflop_per_s']:.0f} GFLOP/s"
        return f"{seconds(p['seconds'])}  ({p['gflop']:.4g} GFLOP{rate}{sampled})"

    return [("compute floor: statistics", part(floor["statistics"])),
            (f"compute floor: prediction, one pass ({floor['predict_dtype']})",
             part(floor["prediction"])),
            (f"compute floor (statistics + {floor['prediction_passes']} x prediction)",
             f"{seconds(floor['seconds'])}  ({floor['threads']} threads, 1 BLAS thread each)")]


def seconds(s: float) -> str:
    """Seconds with the digits that matter for both short and long runs."""
    return f"{s:.1f}" if s >= 10 else f"{s:.2f}"


def print_rows(rows) -> None:
    """Print ``(name, value)`` rows as two aligned columns."""
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
