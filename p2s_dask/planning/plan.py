"""The run as plain data: which passes, over which chunks, holding how much.

A :class:`Plan` is computed by pure functions from the data's shape and
dtype, the options and the budget of one worker; it knows no Dask and does
no I/O. Executors run it; a test can build and inspect it. (The algorithm
is kept apart from its executors as pangeo-data/rechunker does.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .chunking import chunk_policy, lane_bytes, patch_lanes, scatter_bytes
from ..core.patches import patch_size

# the passes of a file run, in order
PASS_NAMES = ("input", "statistics", "solve", "minima", "predict", "output")


@dataclass(frozen=True)
class Pass:
    """One pass of the run.

    Attributes
    ----------
    name : str
        One of :data:`PASS_NAMES`.
    tasks : int
        Blocks (tasks) the pass runs; 0 for passes done by the client.
    memory : int
        Estimated peak bytes of one worker during the pass.
    """

    name: str
    tasks: int
    memory: int


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
    input_mode : str
        'in-place' (a plain .nii read where it is), 'memory' (a .nii.gz or
        remote .nii that fits the budget, read whole into memory), 'stage'
        (converted into the work store first) or 'store' (a Zarr store read
        as it is).
    output_mode : str
        'nifti-direct' (blocks written into a reserved .nii), 'zarr' (chunks
        into a Zarr store), 'nifti-via-zarr' (a Zarr store in the work
        store, streamed into a .nii.gz or remote .nii at the end) or
        'nifti-memory' (the same, held in memory when it fits the budget).
    passes : tuple of Pass
    memory_per_worker, threads_per_worker : int
    """

    shape: tuple
    itemsize: int
    radius: tuple
    chunks: tuple
    input_mode: str
    output_mode: str
    passes: tuple
    memory_per_worker: int
    threads_per_worker: int

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
        return math.prod(len(g) for g in self.grid)

    def pass_named(self, name) -> Pass | None:
        return next((p for p in self.passes if p.name == name), None)

    def identity(self) -> dict:
        """What of the plan decides the numbers: the chunk grid (float
        rounding follows the blocks) and the radius."""
        return {"chunks": list(self.chunks), "radius": list(self.radius)}


def _sizes(size, chunk):
    full, rest = divmod(int(size), int(chunk))
    return [int(chunk)] * full + ([rest] if rest else [])


def region_key(region) -> str:
    """A name for a region that does not depend on any grid: its bounds."""
    return "_".join(f"{s.start}-{s.stop}" for s in region)


def choose_chunks(shape, itemsize, memory_per_worker, threads_per_worker, radius,
                  requested=None, stored=None) -> tuple:
    """The spatial chunks of a run.

    The user's ``requested`` chunks win; else a Zarr input's ``stored``
    chunks when they hold all volumes, fit the budget and are at least as
    thick as the radius (so the store is read without a rechunk); else the
    chunk policy.
    """
    if requested is not None:
        return tuple(min(int(c), int(s)) for c, s in zip(requested, shape[:3]))
    policy = chunk_policy(shape, itemsize, memory_per_worker, threads_per_worker, radius)
    if stored is not None and _stored_fits(stored, shape, itemsize, policy, radius):
        return tuple(int(c) for c in stored[:3])
    return policy


def _stored_fits(stored, shape, itemsize, policy, radius) -> bool:
    if len(stored) == 4 and int(stored[3]) != int(shape[3]):
        return False
    thick = all(int(c) >= int(r) for c, r in zip(stored[:3], radius))
    # a stored chunk up to twice the policy's size still fits the budget's
    # margin (the policy keeps 8 blocks per thread)
    small = math.prod(int(c) for c in stored[:3]) <= 2 * math.prod(policy)
    return thick and small


def _block_memory(plan_shape, chunks, itemsize, radius, memory, threads) -> dict:
    """Estimated bytes per worker of each pass: the blocks each thread holds
    (as measured, see :mod:`.chunking`), the lanes' scatters while summing
    statistics, the one scatter the solve inverts in place."""
    n = int(plan_shape[3])
    halo = math.prod(c + 2 * r for c, r in zip(chunks, radius))
    block = halo * n * itemsize
    scatter = scatter_bytes(plan_shape, radius)
    lanes = patch_lanes(plan_shape, radius, memory, threads) if any(radius) else 0
    return {"statistics": threads * 4 * block + lanes * lane_bytes(plan_shape, radius),
            "minima": threads * 4 * block,
            "predict": threads * 5 * block,
            "solve": scatter}


def make_plan(shape, itemsize, radius, *, input_mode, output_mode, memory_per_worker,
              threads_per_worker, shift_intensity=True, requested_chunks=None,
              stored_chunks=None) -> Plan:
    """Build the :class:`Plan` of a run.

    Parameters
    ----------
    shape : tuple of 4 ints
    itemsize : int
        Bytes per value of a block as worked on (8 for float64 values).
    radius : tuple of 3 ints
    input_mode, output_mode : str
        See :class:`Plan`.
    memory_per_worker, threads_per_worker : int
        The smallest worker's budget and its threads.
    shift_intensity : bool
        Whether the minima pass runs.
    requested_chunks, stored_chunks : tuple, optional
        The user's chunks; a Zarr input's chunks.

    Returns
    -------
    Plan
    """
    shape = tuple(int(s) for s in shape)
    radius = tuple(int(r) for r in radius)
    chunks = choose_chunks(shape, itemsize, memory_per_worker, threads_per_worker, radius,
                           requested_chunks, stored_chunks)
    blocks = math.prod(-(-s // c) for s, c in zip(shape[:3], chunks))
    mem = _block_memory(shape, chunks, itemsize, radius, memory_per_worker,
                        threads_per_worker)
    passes = [Pass("input", blocks if input_mode == "stage" else 0, 0),
              Pass("statistics", blocks, mem["statistics"]),
              Pass("solve", 0, mem["solve"])]
    if shift_intensity:
        passes.append(Pass("minima", blocks, mem["minima"]))
    passes += [Pass("predict", blocks, mem["predict"]),
               Pass("output", 0 if output_mode != "nifti-via-zarr" else blocks, 0)]
    return Plan(shape, int(itemsize), radius, tuple(chunks), input_mode, output_mode,
                tuple(passes), int(memory_per_worker), int(threads_per_worker))
