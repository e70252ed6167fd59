"""The run as plain data: which passes, over which chunks, holding how much.

A :class:`Plan` is computed by :func:`make_plan`, a pure function of plain
facts: the data's shape and dtypes (:class:`Data`), where the input and the
output are (:class:`Endpoint`), the workers that run the tasks
(:class:`Workers`) and what the options settle (:class:`Settings`). It is
the one place a run's decisions are made: the input and output modes, the
chunk grid, the lanes and thread caps of each pass, each pass's memory and
which passes run in what order. It knows no Dask and does no I/O; executors
run it (:func:`p2s_dask.run.passes.execute` iterates its passes), a test or
``--dry-run`` can build and inspect it (:meth:`Plan.describe`). The
algorithm is kept apart from its executors as pangeo-data/rechunker does.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np

from .chunking import PATCH_BLOCKS_PER_THREAD, chunk_policy, lane_bytes, patch_lanes, \
    scatter_bytes

# the passes of a file run in the order they may run; a plan holds those its
# run needs (see :func:`make_plan`)
PASS_NAMES = ("input", "statistics", "crossval", "solve", "minima", "predict", "output")

# an input read whole into memory and an output filled there take at most
# this share of a worker's budget together; the blocks get the rest
MEMORY_IMAGE_SHARE = 0.5

# blocks a thread holds while predicting: its block, the halo, the
# prediction and the blocks queued for writing (statistics and minima hold
# PATCH_BLOCKS_PER_THREAD, see .chunking)
PREDICT_BLOCKS_PER_THREAD = 5

# F x F scatters the cross-validation holds at once (see
# core.crossval.fold_errors): the total, the fold being scored and the
# training statistics that its solve inverts in place; scoring a grid of
# penalties adds the eigenvectors that serve them (crossval_scatters)
CROSSVAL_SCATTERS = 3


def crossval_scatters(penalty_grid: bool) -> int:
    """F x F scatters the cross-validation holds at once: with a grid of
    penalties (``alpha='auto'``) one more."""
    return CROSSVAL_SCATTERS + bool(penalty_grid)


class InputMode(str, enum.Enum):
    """Where the blocks of the input come from.

    The values are those recorded in a work store's fingerprint: never
    change them, or existing work stores stop resuming.
    """

    IN_PLACE = "in-place"  # a plain local .nii, read where it is
    MEMORY = "memory"      # a .nii.gz or remote .nii read whole into memory
    STAGE = "stage"        # a NIfTI converted into the work store first
    STORE = "store"        # a Zarr store, read as it is
    ARRAY = "array"        # a NumPy array the caller holds

    @property
    def read_first(self) -> bool:
        """Whether the input pass must run before any block is read."""
        return self in (InputMode.MEMORY, InputMode.STAGE)


class OutputMode(str, enum.Enum):
    """Where the predicted blocks go (values as :class:`InputMode`'s)."""

    NIFTI_DIRECT = "nifti-direct"      # blocks written into a reserved local .nii
    ZARR = "zarr"                      # chunks into a Zarr store
    NIFTI_VIA_ZARR = "nifti-via-zarr"  # a store in the work store, streamed at the end
    NIFTI_MEMORY = "nifti-memory"      # the image held in memory, written at the end
    ARRAY = "array"                    # blocks placed into the caller's array

    @property
    def has_store(self) -> bool:
        """Whether the blocks go into a Zarr store (whose codec is chosen)."""
        return self in (OutputMode.ZARR, OutputMode.NIFTI_VIA_ZARR)


# -- the facts a plan is made from ---------------------------------------------

@dataclass(frozen=True)
class Endpoint:
    """Where an input or output is.

    Attributes
    ----------
    kind : str
        'nifti', 'zarr' or 'array' (a NumPy array in this process).
    name : str
        Its path or URL; the suffix tells a plain ``.nii`` from a ``.nii.gz``.
    local : bool
        On this machine's file system (not an object store).
    """

    kind: str
    name: str = ""
    local: bool = True

    @property
    def plain_nifti(self) -> bool:
        """An uncompressed ``.nii``: random access to every block."""
        return self.kind == "nifti" and str(self.name).endswith(".nii")


@dataclass(frozen=True)
class Workers:
    """The workers that run the tasks.

    Attributes
    ----------
    count : int
    memory : int
        Bytes of one worker (the smallest of a cluster's).
    threads : int
        Threads sharing ``memory`` in each worker.
    in_process : bool
        The tasks run in this process's threads, so they may read and fill
        arrays this process holds.
    local : bool
        The tasks see this machine's files.
    """

    count: int = 1
    memory: int = 2 << 30
    threads: int = 1
    in_process: bool = True
    local: bool = True


@dataclass(frozen=True)
class Data:
    """The image: shape and dtypes from its header or store.

    Attributes
    ----------
    shape : tuple of 4 ints
        ``(x, y, z, volumes)``.
    raw_dtype, out_dtype : numpy dtype
        As stored in the input; of the output.
    scaled : bool
        The input has a scale or offset (decoded to float64).
    stored_chunks : tuple, optional
        A Zarr input's chunks when it is volume-major (one of ours).
    calc_itemsize : int, optional
        Bytes per value of the prediction's arithmetic (4 or 8).
    """

    shape: tuple
    raw_dtype: object = np.dtype(np.float32)
    out_dtype: object = np.dtype(np.float32)
    scaled: bool = False
    stored_chunks: tuple | None = None
    calc_itemsize: int = 8


@dataclass(frozen=True)
class Settings:
    """What the options and the run's places settle beside the data.

    Attributes
    ----------
    radius : tuple of 3 ints
    minima : bool
        The prediction's per-volume range is needed before predicting (the
        intensity shift, or the fitted slope of a scaled integer output).
    chunks : tuple, optional
        The user's spatial chunks.
    work_local : bool
        The work store is on this machine's file system.
    client_memory : int, optional
        The budget of this process, for the passes it runs itself (staging,
        solving, streaming); default: a worker's.
    folds : int
        Cross-validation folds of whole blocks (``patch_radius`` or
        ``alpha`` 'auto'); 0: none.
    penalty_grid : bool
        The cross-validation scores a grid of ridge penalties (``alpha``
        'auto').
    client_threads : int
        Cores this process may use for the passes it runs alone (the solve,
        the cross-validation): the user's threads, else every core. The same
        whatever the executor, so that the solve gives the same bits on
        threads and on a cluster.
    scratch_free : int, optional
        Bytes free on the work store's disk (None: unknown, or not a disk
        of this machine).
    """

    radius: tuple = (0, 0, 0)
    minima: bool = True
    chunks: tuple | None = None
    work_local: bool = True
    client_memory: int | None = None
    folds: int = 0
    scratch_free: int | None = None
    penalty_grid: bool = False
    client_threads: int = 1


# -- the plan ---------------------------------------------------------------------

@dataclass(frozen=True)
class Pass:
    """One pass of the run.

    Attributes
    ----------
    name : str
        One of :data:`PASS_NAMES`.
    tasks : int
        Tasks (one per block) the pass gives the executor; 0 for a pass
        this process does itself.
    memory : int
        Estimated peak bytes during the pass: of one worker (besides what
        the process holds anyway), or for a pass of this process the budget
        it is given.
    threads : int
        Threads per worker the pass may use; for a pass of this process
        (``where='client'``) the BLAS threads of its solves (0: none given).
    lanes : int
        Chains the statistics are summed along, over all workers.
    where : str
        'workers' or 'client' (this process).
    """

    name: str
    tasks: int
    memory: int
    threads: int = 0
    lanes: int = 0
    where: str = "workers"


@dataclass(frozen=True)
class Plan:
    """How a run goes, decided before any work.

    Attributes
    ----------
    shape : tuple of 4 ints
    itemsize : int
        Bytes per value while a block is worked on.
    radius : tuple of 3 ints
    chunks : tuple of 3 ints
        Spatial chunk shape; every chunk holds all volumes.
    input_mode : InputMode
    output_mode : OutputMode
    passes : tuple of Pass
        In the order they run.
    memory_per_worker, threads_per_worker, workers : int
        The smallest worker's budget, its threads, the number of workers.
    client_memory : int
        This process's budget.
    held_input, held_output : int
        Bytes of an input read into memory and of an output filled there.
    folds : int
        Cross-validation folds (0: none): the statistics are merged per fold
        of whole blocks (z-slabs of blocks dealt in turn,
        :func:`~p2s_dask.core.crossval.block_folds` of :attr:`grid`) and the
        crossval pass chooses the radius and penalty of the passes after it.
    penalty_grid : bool
        The crossval pass scores a grid of penalties (:class:`Settings`).
    client_threads : int
        BLAS threads of the solves this process runs alone (:class:`Settings`).
    keep_predictions : bool
        With a patch, the minima pass keeps its predictions (before the
        intercept) in the work store and the prediction pass shifts and
        casts them instead of computing them again (see
        :func:`keeps_predictions`).
    """

    shape: tuple
    itemsize: int
    radius: tuple
    chunks: tuple
    input_mode: InputMode
    output_mode: OutputMode
    passes: tuple
    memory_per_worker: int
    threads_per_worker: int
    workers: int = 1
    client_memory: int = 0
    held_input: int = 0
    held_output: int = 0
    folds: int = 0
    keep_predictions: bool = False
    penalty_grid: bool = False
    client_threads: int = 1

    @property
    def grid(self) -> tuple:
        """Chunk sizes along each spatial axis, Dask style."""
        return tuple(tuple(_sizes(s, c)) for s, c in zip(self.shape[:3], self.chunks))

    def regions(self):
        """``(index, region)`` of every chunk, C order; region as slices."""
        grid = self.grid
        starts = [np.cumsum((0,) + g[:-1]) for g in grid]
        for idx in np.ndindex(*[len(g) for g in grid]):
            yield idx, tuple(slice(int(starts[a][i]), int(starts[a][i] + grid[a][i]))
                             for a, i in enumerate(idx))

    @property
    def n_blocks(self) -> int:
        """Chunks of the grid (the tasks of each pass over the blocks)."""
        return math.prod(len(g) for g in self.grid)

    @property
    def held(self) -> int:
        """Bytes of the images held in memory."""
        return self.held_input + self.held_output

    def pass_named(self, name) -> Pass | None:
        """The pass called ``name``, or None when the run has none."""
        return next((p for p in self.passes if p.name == name), None)

    def over_budget(self) -> list:
        """The passes whose memory exceeds the budget of where they run."""
        return [p for p in self.passes
                if p.memory > (self.client_memory if p.where == "client"
                               else self.memory_per_worker)]

    def identity(self) -> dict:
        """What of the plan a resumed run must share: the chunk grid (float
        rounding follows the blocks), the radius and the modes (the values
        a work store records)."""
        out = {"chunks": list(self.chunks), "radius": list(self.radius),
               "input": self.input_mode.value, "output": self.output_mode.value}
        # only where there are folds: earlier work stores keep resuming
        return {**out, "folds": self.folds} if self.folds else out

    def as_dict(self) -> dict:
        """The plan as JSON-ready data (for a run's report)."""
        return {"chunks": list(self.chunks), "input": self.input_mode.value,
                "output": self.output_mode.value,
                "memory_per_worker": self.memory_per_worker,
                "threads_per_worker": self.threads_per_worker, "workers": self.workers,
                "held": self.held, "folds": self.folds,
                "keep_predictions": self.keep_predictions,
                "passes": [asdict(p) for p in self.passes]}

    def describe(self) -> list:
        """Human-readable lines for ``--dry-run``; see :func:`describe`."""
        return describe(self)


def _sizes(size, chunk):
    full, rest = divmod(int(size), int(chunk))
    return [int(chunk)] * full + ([rest] if rest else [])


def region_key(region) -> str:
    """A name for a region that does not depend on any grid: its bounds."""
    return "_".join(f"{s.start}-{s.stop}" for s in region)


# -- the decisions ------------------------------------------------------------------

class Modes(NamedTuple):
    """The input and output modes and the bytes each holds in memory."""

    input: InputMode
    output: OutputMode
    held_input: int = 0
    held_output: int = 0


def choose_modes(inp: Endpoint, out: Endpoint, workers: Workers,
                 work_local: bool = True) -> Modes:
    """Where the blocks come from and go to, before any is held in memory.

    A plain local ``.nii`` is read (and written) in place when the tasks see
    this machine's files; any other NIfTI input is staged into a Zarr store
    in the work store and any other NIfTI output goes through one (see
    :func:`hold_in_memory` for those that fit the budget).

    Parameters
    ----------
    inp, out : Endpoint
    workers : Workers
    work_local : bool
        The work store is local (a reserved ``.nii`` keeps its markers there).

    Returns
    -------
    Modes
    """
    if inp.kind == "array":
        input_mode = InputMode.ARRAY
    elif inp.plain_nifti and inp.local and workers.local:
        input_mode = InputMode.IN_PLACE
    else:
        input_mode = InputMode.STAGE if inp.kind == "nifti" else InputMode.STORE
    if out.kind in ("array", "zarr"):
        output_mode = OutputMode.ARRAY if out.kind == "array" else OutputMode.ZARR
    elif workers.local and out.plain_nifti and out.local and work_local:
        output_mode = OutputMode.NIFTI_DIRECT
    else:
        output_mode = OutputMode.NIFTI_VIA_ZARR
    return Modes(input_mode, output_mode)


def hold_in_memory(modes: Modes, data: Data, workers: Workers) -> Modes:
    """A NIfTI that is read (or written) from start to end, gzip or remote,
    is held in memory instead of a Zarr store in the work store when the
    tasks run in this process and it fits :data:`MEMORY_IMAGE_SHARE` of a
    worker's budget (the input first).

    Parameters
    ----------
    modes : Modes
        From :func:`choose_modes`.
    data : Data
    workers : Workers

    Returns
    -------
    Modes
    """
    if not workers.in_process:
        return modes
    voxels = math.prod(int(s) for s in data.shape)
    room = int(MEMORY_IMAGE_SHARE * int(workers.memory))
    held_input = held_output = 0
    input_mode, output_mode = modes.input, modes.output
    size = voxels * np.dtype(data.raw_dtype).itemsize
    if input_mode is InputMode.STAGE and size <= room:
        input_mode, held_input = InputMode.MEMORY, size
    size = voxels * np.dtype(data.out_dtype).itemsize
    if output_mode is OutputMode.NIFTI_VIA_ZARR and size <= room - held_input:
        output_mode, held_output = OutputMode.NIFTI_MEMORY, size
    return Modes(input_mode, output_mode, held_input, held_output)


def working_itemsize(data: Data, input_mode: InputMode) -> int:
    """Bytes per value the chunk policy counts for a block.

    Counted as stored (the core works on them without a float64 copy, and
    bigger blocks mean longer per-volume runs and fewer tasks): a ``.nii``
    read in place or into memory, and the volume-major float blocks of our
    NIfTI-Zarr stores (a staged input among them). Scaled data (decoded to
    float64), integer blocks of a store (pieces of which go through float64),
    blocks Dask assembles from another layout and a caller's array count 8.
    ``convert`` follows the same rule (:func:`p2s_dask.io.budget.store_itemsize`).
    """
    raw = np.dtype(data.raw_dtype)
    if data.scaled or input_mode is InputMode.ARRAY:
        return 8
    if input_mode in (InputMode.IN_PLACE, InputMode.MEMORY):
        return raw.itemsize
    volume_major = input_mode is InputMode.STAGE or data.stored_chunks is not None
    return raw.itemsize if (volume_major and raw.kind == "f") else 8


class Budget(NamedTuple):
    """What the blocks of one worker may hold: bytes, threads, lanes."""

    memory: int
    threads: int
    lanes: int


def choose_chunks(shape, itemsize, radius, budget: Budget, requested=None,
                  stored=None) -> tuple:
    """The spatial chunks of a run.

    The user's ``requested`` chunks win; else a Zarr input's ``stored``
    chunks when they hold all volumes, fit the budget and are at least as
    thick as the radius (so the store is read without a rechunk); else the
    chunk policy.
    """
    if requested is not None:
        return tuple(min(int(c), int(s)) for c, s in zip(requested, shape[:3]))
    policy = chunk_policy(shape, itemsize, budget.memory, budget.threads, radius,
                          lanes=budget.lanes)
    if stored is not None and _stored_fits(stored, shape, policy, radius):
        return tuple(int(c) for c in stored[:3])
    return policy


def _stored_fits(stored, shape, policy, radius) -> bool:
    if len(stored) == 4 and int(stored[3]) != int(shape[3]):
        return False
    thick = all(int(c) >= int(r) for c, r in zip(stored[:3], radius))
    # a stored chunk up to twice the policy's size still fits the budget's
    # margin (the policy keeps 8 blocks per thread)
    small = math.prod(int(c) for c in stored[:3]) <= 2 * math.prod(policy)
    return thick and small


def fold_chunks(shape, chunks, radius, folds: int) -> tuple:
    """Chunks thin enough along z to deal whole blocks into ``folds`` folds.

    Aims at two z-slabs of blocks per fold (interleaved, so each fold spans
    the field of view twice), never thinner than the radius: ``cz`` at most
    ``ceil(z / (2 folds))``. Thinner blocks only cost their halos.

    Parameters
    ----------
    shape : tuple of 3 or 4 ints
    chunks : tuple of 3 ints
    radius : tuple of 3 ints
    folds : int

    Returns
    -------
    tuple of 3 ints
    """
    z = int(shape[2])
    thin = max(1, int(radius[2]), math.ceil(z / (2 * int(folds))))
    return (int(chunks[0]), int(chunks[1]), min(int(chunks[2]), thin))


def make_plan(data: Data, inp: Endpoint, out: Endpoint, workers: Workers,
              settings: Settings | None = None) -> Plan:
    """Build the :class:`Plan` of a run from plain facts.

    Parameters
    ----------
    data : Data
    inp, out : Endpoint
    workers : Workers
    settings : Settings, optional

    Returns
    -------
    Plan
    """
    settings = settings or Settings()
    shape = tuple(int(s) for s in data.shape)
    radius = tuple(int(r) for r in settings.radius)
    modes = hold_in_memory(choose_modes(inp, out, workers, settings.work_local),
                           data, workers)
    itemsize = working_itemsize(data, modes.input)
    # the images held in memory come out of the blocks' budget
    memory = int(workers.memory) - modes.held_input - modes.held_output
    threads = max(1, int(workers.threads))
    budget = Budget(memory, threads, patch_lanes(shape, radius, memory, threads))
    stored = data.stored_chunks if modes.input is InputMode.STORE else None
    chunks = choose_chunks(shape, itemsize, radius, budget, settings.chunks, stored)
    if settings.folds and settings.chunks is None:
        chunks = fold_chunks(shape, chunks, radius, settings.folds)
    client = int(settings.client_memory or workers.memory)
    plan = Plan(shape, int(itemsize), radius, tuple(chunks), modes.input, modes.output,
                (), int(workers.memory), threads, int(workers.count), client,
                modes.held_input, modes.held_output,
                client_threads=max(1, int(settings.client_threads)))
    if settings.folds:
        # no more folds than blocks (the user's chunks may be few)
        plan = replace(plan, folds=min(int(settings.folds), plan.n_blocks),
                       penalty_grid=bool(settings.penalty_grid))
    keep = keeps_predictions(shape, radius, data.calc_itemsize, workers, settings)
    plan = replace(plan, keep_predictions=keep)
    return replace(plan, passes=plan_passes(plan, budget.lanes, settings.minima))


# the kept predictions may take at most this share of the free disk
KEEP_DISK_SHARE = 0.5


def keeps_predictions(shape, radius, calc_itemsize: int, workers: Workers,
                      settings: Settings) -> bool:
    """Whether the minima pass keeps its predictions for the prediction pass.

    With a patch a prediction costs 27 (radius 1) or more GEMMs per block:
    measured on the HCP-sized run at radius 1, one prediction pass is 77 s
    of compute where writing and reading back its values is a few seconds
    (the page cache holds most of them). Without a patch the prediction is
    one GEMM, cheaper than the disk. Kept only where every task sees the
    work store's disk (a local work store, workers on this machine) and the
    values take at most :data:`KEEP_DISK_SHARE` of its free space; a radius
    that the cross-validation may still choose counts as the largest.
    """
    if not (settings.minima and any(radius) and settings.work_local and workers.local):
        return False
    need = math.prod(int(s) for s in shape) * int(calc_itemsize)
    free = settings.scratch_free
    return free is not None and need <= KEEP_DISK_SHARE * int(free)


def solve_threads(radius, threads: int) -> int:
    """BLAS threads of the solves this process runs alone: ``threads`` with
    a patch (F in the thousands: 1.35 s on one thread, 0.86 s on two at
    F = 4000), one without (F is the volumes: milliseconds, and starting
    BLAS's threads took the radius-0 HCP-sized run from 1.10 to 1.49 GiB)."""
    return max(1, int(threads)) if any(radius) else 1


def plan_passes(plan: Plan, lanes: int, minima: bool) -> tuple:
    """The passes of ``plan`` in the order they run: the input pass when the
    input is read or staged first, the statistics, with folds the
    cross-validation (which chooses the radius and penalty of the passes
    after it), the solve, the minima when the prediction's range is needed,
    the prediction and the output pass (the commit, which streams a NIfTI
    out of a store or memory).

    ``lanes`` are those of one worker (:func:`.chunking.patch_lanes`): with
    a patch each lane holds a scatter, and no more threads than lanes run
    the statistics (a thread without a lane would only read blocks ahead and
    hold them).
    """
    blocks, threads = plan.n_blocks, plan.threads_per_worker
    work = _work_memory(plan, lanes)
    solving = solve_threads(plan.radius, plan.client_threads)
    cap = lanes if any(plan.radius) else threads
    passes = []
    if plan.input_mode.read_first:
        staged = plan.input_mode is InputMode.STAGE
        passes.append(Pass("input", 0, plan.client_memory if staged else plan.held_input,
                           where="client"))
    passes.append(Pass("statistics", blocks, plan.held_input + work["statistics"], cap,
                       plan.workers * lanes))
    if plan.folds:
        passes.append(Pass("crossval", 0, plan.held_input + work["crossval"],
                           solving, where="client"))
    passes.append(Pass("solve", 0, plan.held_input + work["solve"], solving,
                       where="client"))
    if minima:
        passes.append(Pass("minima", blocks, plan.held_input + work["minima"], threads))
    passes.append(Pass("predict", blocks, plan.held + work["predict"], threads))
    # the input is let go before the output pass: a stream gets the budget
    streamed = plan.output_mode is OutputMode.NIFTI_VIA_ZARR
    passes.append(Pass("output", 0, plan.client_memory if streamed else plan.held_output,
                       where="client"))
    return tuple(passes)


def _work_memory(plan: Plan, lanes: int) -> dict:
    """Estimated bytes per worker of each pass besides the images held: the
    blocks each thread holds (as measured, see :mod:`.chunking`), the lanes'
    scatters and working copies while summing statistics, the one scatter
    the solve inverts in place."""
    n = int(plan.shape[3])
    halo = math.prod(c + 2 * r for c, r in zip(plan.chunks, plan.radius))
    block = halo * n * plan.itemsize
    threads = plan.threads_per_worker
    summing = threads * PATCH_BLOCKS_PER_THREAD * block
    if any(plan.radius):
        # as many threads as lanes sum, each beside its lane's scatter and
        # working copies
        summing = lanes * (PATCH_BLOCKS_PER_THREAD * block
                           + lane_bytes(plan.shape, plan.radius, halo_voxels=halo))
    scatter = scatter_bytes(plan.shape, plan.radius)
    if plan.folds:
        # this process merges each fold's statistics into the total
        summing += scatter
    # a minima pass that keeps its predictions holds one, as the prediction
    # pass does
    minima = PREDICT_BLOCKS_PER_THREAD if plan.keep_predictions else PATCH_BLOCKS_PER_THREAD
    return {"statistics": summing,
            "minima": threads * minima * block,
            "predict": threads * PREDICT_BLOCKS_PER_THREAD * block,
            "solve": scatter, "crossval": crossval_scatters(plan.penalty_grid) * scatter}


# -- for people ---------------------------------------------------------------------

_MODE_NOTES = {
    InputMode.IN_PLACE: "a plain .nii read where it is",
    InputMode.MEMORY: "read whole into memory",
    InputMode.STAGE: "converted into a Zarr store in the work store first",
    InputMode.STORE: "a Zarr store read as it is",
    InputMode.ARRAY: "the caller's array",
    OutputMode.NIFTI_DIRECT: "blocks written into a reserved .nii, renamed at the end",
    OutputMode.ZARR: "chunks written into a Zarr store",
    OutputMode.NIFTI_VIA_ZARR: "a Zarr store in the work store, streamed into the NIfTI "
                               "at the end",
    OutputMode.NIFTI_MEMORY: "filled in memory, written at the end",
    OutputMode.ARRAY: "placed into the caller's array",
}


def human_bytes(n) -> str:
    """``n`` bytes in binary units, e.g. ``'1.5 GiB'``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop returns


def describe(plan: Plan) -> list:
    """Human-readable lines of ``plan`` (for ``--dry-run``): its modes,
    chunk grid, workers and each pass with its tasks, memory and threads.

    Parameters
    ----------
    plan : Plan

    Returns
    -------
    list of str
    """
    shape = "x".join(map(str, plan.shape))
    grid = "x".join(str(len(g)) for g in plan.grid)
    lines = [f"image {shape}, patch radius {','.join(map(str, plan.radius))}, "
             f"{plan.itemsize} bytes per value while working",
             f"input: {plan.input_mode.value} ({_MODE_NOTES[plan.input_mode]})",
             f"output: {plan.output_mode.value} ({_MODE_NOTES[plan.output_mode]})",
             f"chunks: {'x'.join(map(str, plan.chunks))} (all volumes each), grid {grid}, "
             f"{plan.n_blocks} blocks",
             f"workers: {plan.workers} x {plan.threads_per_worker} threads, "
             f"{human_bytes(plan.memory_per_worker)} each; this process "
             f"{human_bytes(plan.client_memory)}"
             + (f", images held in memory {human_bytes(plan.held)}" if plan.held else ""),
             "passes:"]
    for i, p in enumerate(plan.passes, 1):
        folds = f", {plan.folds} folds of whole blocks (z-slabs dealt in turn): " \
            "chooses the radius and penalty" if p.name == "crossval" else ""
        if plan.keep_predictions and p.name in ("minima", "predict"):
            folds = (", keeps its predictions in the work store" if p.name == "minima"
                     else ", shifts and casts the kept predictions")
        lines.append(f"  {i}. {_describe_pass(p)}{folds}")
    for p in plan.over_budget():
        lines.append(f"warning: the {p.name} pass needs about {human_bytes(p.memory)}, "
                     "more than the budget")
    return lines


def _describe_pass(p: Pass) -> str:
    if p.where == "client":
        solves = f", {p.threads} BLAS thread{'s' * (p.threads > 1)}" if p.threads else ""
        return f"{p.name}: in this process, {human_bytes(p.memory)}{solves}"
    text = f"{p.name}: {p.tasks} tasks, {human_bytes(p.memory)} per worker, " \
           f"{p.threads} threads per worker"
    return text + (f", {p.lanes} lanes" if p.name == "statistics" else "")
