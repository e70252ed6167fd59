"""The chunk policy: one function, used by the API, the CLI, a cluster and
``convert``, so that what ``convert`` writes is what ``denoise`` reads.

Pure: shapes and numbers in, a chunk shape out. No Dask, no I/O.
"""

from __future__ import annotations

import math

from ..core.lagparts import lane_pieces

# the largest block worth having: big enough for efficient GEMMs, few tasks
# and efficient object-store requests; larger blocks only cost memory
MAX_BLOCK_BYTES = 64 << 20
# the smallest block worth a task (Dask's per-task cost is ~1 ms)
MIN_BLOCK_BYTES = 1 << 20
# blocks alive per thread at once: the block, its float64 pieces, its
# prediction, the next block read ahead, blocks queued for writing
BLOCKS_PER_THREAD = 8
# With a patch (r > 0) every block carries a halo of r planes on each side
# and its statistics end in an F x F scatter (F = P n features): blocks of
# at least this many planes per unit of radius keep the halo within a sixth
# of the work (measured, r = 1, 160 volumes: lag statistics 0.84 s a plane
# in 3-plane blocks, 0.71 in 12) ...
PATCH_PLANES = 12
# ... as long as a thread's blocks fit its share of what the lanes leave of
# the budget. Measured (r = 1, 2 threads, peak RSS per pass; 145x174x36x288
# and 96x96x60x300 float32): beside its lane, a thread summing statistics
# holds about 4 blocks (the block, the neighbour read for its halo, the
# block with its halo); predicting, up to BLOCKS_PER_THREAD with the blocks
# queued for writing
PATCH_BLOCKS_PER_THREAD = 4
# the lanes (one per thread, see engine.summarize) each hold the compact lag
# statistics of core.lagparts (at most lane_pieces(radius) pieces of
# (n + 1)^2 float64: 185 at r = 1, 134 MB for 300 volumes, where an F x F
# scatter is 583 MB) and one block's float64 working copy with small
# transients: measured (tracemalloc, tests/test_lagstats.py) 1.04 working
# copies beside the pieces; two leave room for the allocator. As many lanes
# as fit the budget beside the process itself and the threads' thinnest
# blocks, at least one. The F x F scatter is formed once, from the merged
# lanes, for the solve (scatter_bytes)
LANE_WORKING_COPIES = 2
# the lag products' working copy holds about this much, but never fewer than
# 1 + 2 r planes of all volumes (see core.lagstats._Geometry.chunks)
LAG_SLAB_BYTES = 64 << 20
# what the process holds before any work (the interpreter, NumPy, Dask,
# Zarr, nibabel: 0.14-0.16 GiB RSS measured), counted against the budget
# with a patch, where the budget is tight
PROCESS_BYTES = 160 << 20


def scatter_bytes(shape, radius) -> int:
    """Bytes of the float64 F x F scatter of all ``n`` volumes' patches
    (``F = n P``): a bound for any group's."""
    features = int(shape[3]) * math.prod(2 * int(r) + 1 for r in radius)
    return 8 * features * features


def lag_working_bytes(shape, radius, halo_voxels=None) -> int:
    """Bytes of the float64 working copy of a lane's lag products, for
    blocks of whole xy-planes (the chunk policy's); never more than the
    whole block's copy when its voxels (with the halo) are known."""
    nx, ny, _, n = (int(s) for s in shape)
    rx, ry, rz = (int(r) for r in radius)
    plane = (nx + 2 * rx) * (ny + 2 * ry) * (n + 1) * 8
    slab = max(LAG_SLAB_BYTES, (1 + 2 * rz) * plane)
    if halo_voxels is None:
        return slab
    # a block smaller than the slab is copied whole (with a volume of ones)
    return min(slab, int(halo_voxels) * (n + 1) * 8)


def lane_parts_bytes(shape, radius) -> int:
    """Bytes of the compact lag statistics one lane holds at most (all
    ``n`` volumes' pieces, :func:`p2s_dask.core.lagparts.lane_pieces`): a
    bound for any group's, without a mask (the file runs')."""
    n = int(shape[3])
    return lane_pieces(radius) * (n + 1) * (n + 1) * 8


def lane_bytes(shape, radius, halo_voxels=None) -> int:
    """What one lane of patch statistics holds besides its blocks (for
    blocks of ``halo_voxels`` voxels with their halo, when known: the plan's
    estimate; the chunk policy, which picks the blocks, counts the most)."""
    return lane_parts_bytes(shape, radius) \
        + LANE_WORKING_COPIES * lag_working_bytes(shape, radius, halo_voxels)


def patch_lanes(shape, radius, memory_per_worker: int, threads_per_worker: int,
                process_bytes: int = PROCESS_BYTES) -> int:
    """Lanes of patch statistics a worker runs at once: one per thread while
    they fit its budget beside the process itself and each thread's
    :data:`PATCH_BLOCKS_PER_THREAD` thinnest blocks, at least one.

    Parameters
    ----------
    shape : tuple of 4 ints
        ``(x, y, z, volumes)``.
    radius : tuple of 3 ints
    memory_per_worker, threads_per_worker : int
    process_bytes : int, optional
        What the process holds anyway (0 for memory that is all the lanes').

    Returns
    -------
    int
    """
    threads = max(1, int(threads_per_worker))
    if not any(radius):
        return threads
    room = int(memory_per_worker) - int(process_bytes) \
        - threads * PATCH_BLOCKS_PER_THREAD * thinnest_block_bytes(shape, radius)
    return max(1, min(threads, room // lane_bytes(shape, radius)))


def thinnest_block_bytes(shape, radius) -> int:
    """A block of ``1 + 2 r`` whole planes (float32): the least worth a task."""
    nx, ny, _, n = (int(s) for s in shape)
    return nx * ny * (1 + 2 * int(radius[2])) * n * 4


def block_bytes(memory_per_worker: int, threads_per_worker: int) -> int:
    """The target size of one block for a worker's budget and thread count."""
    per_thread = int(memory_per_worker) // (BLOCKS_PER_THREAD * max(1, int(threads_per_worker)))
    # a tiny budget still gets blocks worth a task, but never more than an
    # eighth of the budget
    floor = min(MIN_BLOCK_BYTES, int(memory_per_worker) // BLOCKS_PER_THREAD)
    return int(min(MAX_BLOCK_BYTES, max(floor, per_thread)))


def patch_block_voxels(shape, itemsize: int, memory_per_worker: int,
                       threads_per_worker: int, radius, lanes_apart: bool = False,
                       lanes: int | None = None) -> int:
    """The fewest voxels per block worth a patch's halo: :data:`PATCH_PLANES`
    z-planes per unit of the z radius, as long as a thread's blocks fit its
    share of what the lanes leave while summing statistics, and of the
    budget while predicting (0 without a z halo).

    Parameters
    ----------
    shape : tuple of 4 ints
        ``(x, y, z, volumes)``.
    itemsize, memory_per_worker, threads_per_worker : int
        As :func:`chunk_policy`.
    radius : tuple of 3 ints
    lanes_apart : bool, optional
        As :func:`chunk_policy`.
    lanes : int, optional
        As :func:`chunk_policy`.

    Returns
    -------
    int
    """
    nx, ny, nz, n = (int(s) for s in shape)
    rz = int(radius[2])
    if rz <= 0:
        return 0  # splitting z costs no halo
    memory, threads = int(memory_per_worker), max(1, int(threads_per_worker))
    if lanes_apart:
        share = memory // (PATCH_BLOCKS_PER_THREAD * threads)
    else:
        if lanes is None:
            lanes = patch_lanes(shape, radius, memory, threads)
        work = max(0, memory - PROCESS_BYTES)
        summing = max(0, work - lanes * lane_bytes(shape, radius))
        # the threads without a lane only read while summing
        share = min(summing // (PATCH_BLOCKS_PER_THREAD * lanes),
                    work // (BLOCKS_PER_THREAD * threads))
    thick = nx * ny * min(nz, PATCH_PLANES * rz)
    return min(thick, _interior_voxels(max(MIN_BLOCK_BYTES, share) // (n * int(itemsize)),
                                       nx * ny, rz))


def _interior_voxels(voxels: int, plane: int, rz: int) -> int:
    """The interior of a block of ``voxels`` voxels with its halo of ``rz``
    planes on each side: the share a thread's blocks get is of blocks as
    held, halo included (the plan's estimate counts it; measured at r = 1
    on the HCP-sized run, 4-plane blocks sized without it took the process
    to 2.48 GiB under a 2 GiB budget)."""
    if voxels >= plane * (1 + 2 * rz):
        return (voxels // plane - 2 * rz) * plane  # whole planes
    # less than one plane: split along y, each piece still with 2 rz planes
    return max(1, voxels // (1 + 2 * rz))


def chunk_policy(shape, itemsize: int, memory_per_worker: int, threads_per_worker: int,
                 radius=(0, 0, 0), lanes_apart: bool = False,
                 lanes: int | None = None) -> tuple[int, int, int]:
    """Spatial chunk shape ``(cx, cy, cz)`` for blocks holding all volumes.

    Splits z first, then y, then x: whole xy-planes keep a NIfTI's
    volume-major reads long and a Zarr's shards few. Chunks stay at least as
    thick as the patch radius, so each halo comes from the next chunk only;
    with a patch, blocks are made thicker where the budget allows
    (:func:`patch_block_voxels`).

    Parameters
    ----------
    shape : tuple of 4 ints
        ``(x, y, z, volumes)``.
    itemsize : int
        Bytes per value as a block is held while working on it (8 for data
        decoded to float64, the stored size where it is read as stored).
    memory_per_worker : int
        The budget of one worker, bytes.
    threads_per_worker : int
    radius : tuple of 3 ints, optional
    lanes_apart : bool, optional
        The lanes of patch statistics have memory of their own (the
        in-memory API's); by default they come out of ``memory_per_worker``
        and the blocks get what they leave.
    lanes : int, optional
        The lanes of one worker when the caller has decided them (a plan
        computes them once, :func:`patch_lanes`); by default computed here.

    Returns
    -------
    tuple of 3 ints
    """
    nx, ny, nz, n = (int(s) for s in shape)
    if int(radius[2]) > 0:
        # the patch rule alone: the budget left beside the lanes
        voxels = max(1, patch_block_voxels(shape, itemsize, memory_per_worker,
                                           threads_per_worker, radius, lanes_apart, lanes))
    else:
        target = block_bytes(memory_per_worker, threads_per_worker)
        voxels = max(1, target // (n * int(itemsize)))
    sizes = [nx, ny, nz]
    for axis in (2, 1, 0):
        if math.prod(sizes) <= voxels:
            break
        rest = math.prod(sizes) // sizes[axis]
        sizes[axis] = min(sizes[axis], max(1, int(radius[axis]), voxels // rest))
    return tuple(sizes)
