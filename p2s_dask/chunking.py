"""The chunk policy: one function, used by the API, the CLI, a cluster and
``convert``, so that what ``convert`` writes is what ``denoise`` reads.

Pure: shapes and numbers in, a chunk shape out. No Dask, no I/O.
"""

from __future__ import annotations

import math

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
# ... as long as a thread's blocks fit its share of what the lanes'
# scatters leave of the budget. Measured (145x174x36x288 float32 .nii, r = 1,
# 2 threads, peak RSS per pass): a thread holds about 5 blocks in either
# pass: summing statistics, the block, its neighbour (read for the halo and
# held until its own turn), the block with its halo and the lag products'
# working copies (about one block); predicting, the block, its neighbour,
# the block with its halo, its prediction, one queued for writing
PATCH_BLOCKS_PER_THREAD = 6
# the lanes' F x F scatters (one per thread, see engine.summarize) take at
# most this share of a worker's budget; fewer lanes where they would not
# fit (at least one: the solve needs the whole scatter anyway)
PATCH_LANES_SHARE = 0.75


def scatter_bytes(shape, radius) -> int:
    """Bytes of the float64 F x F scatter of all ``n`` volumes' patches
    (``F = n P``): a bound for any group's."""
    features = int(shape[3]) * math.prod(2 * int(r) + 1 for r in radius)
    return 8 * features * features


def patch_lanes(shape, radius, memory_per_worker: int, threads_per_worker: int) -> int:
    """Lanes of patch statistics a worker runs at once: one per thread while
    their scatters fit :data:`PATCH_LANES_SHARE` of its budget, at least one.

    Parameters
    ----------
    shape : tuple of 4 ints
        ``(x, y, z, volumes)``.
    radius : tuple of 3 ints
    memory_per_worker, threads_per_worker : int

    Returns
    -------
    int
    """
    threads = max(1, int(threads_per_worker))
    if not any(radius):
        return threads
    fit = int(PATCH_LANES_SHARE * int(memory_per_worker)) // scatter_bytes(shape, radius)
    return max(1, min(threads, fit))


def block_bytes(memory_per_worker: int, threads_per_worker: int) -> int:
    """The target size of one block for a worker's budget and thread count."""
    per_thread = int(memory_per_worker) // (BLOCKS_PER_THREAD * max(1, int(threads_per_worker)))
    # a tiny budget still gets blocks worth a task, but never more than an
    # eighth of the budget
    floor = min(MIN_BLOCK_BYTES, int(memory_per_worker) // BLOCKS_PER_THREAD)
    return int(min(MAX_BLOCK_BYTES, max(floor, per_thread)))


def patch_block_voxels(shape, itemsize: int, memory_per_worker: int,
                       threads_per_worker: int, radius) -> int:
    """The fewest voxels per block worth a patch's halo: :data:`PATCH_PLANES`
    z-planes per unit of the z radius, as long as a thread's blocks fit its
    share of what the lanes' scatters leave (0 without a z halo).

    Parameters
    ----------
    shape : tuple of 4 ints
        ``(x, y, z, volumes)``.
    itemsize, memory_per_worker, threads_per_worker : int
        As :func:`chunk_policy`.
    radius : tuple of 3 ints

    Returns
    -------
    int
    """
    nx, ny, nz, n = (int(s) for s in shape)
    rz = int(radius[2])
    if rz <= 0:
        return 0  # splitting z costs no halo
    memory, threads = int(memory_per_worker), max(1, int(threads_per_worker))
    lanes = patch_lanes(shape, radius, memory, threads)
    summing = memory - lanes * scatter_bytes(shape, radius)
    share = max(0, summing) // (PATCH_BLOCKS_PER_THREAD * threads)
    thick = nx * ny * min(nz, PATCH_PLANES * rz)
    return min(thick, share // (n * int(itemsize)))


def chunk_policy(shape, itemsize: int, memory_per_worker: int, threads_per_worker: int,
                 radius=(0, 0, 0)) -> tuple[int, int, int]:
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

    Returns
    -------
    tuple of 3 ints
    """
    nx, ny, nz, n = (int(s) for s in shape)
    target = block_bytes(memory_per_worker, threads_per_worker)
    voxels = max(1, target // (n * int(itemsize)),
                 patch_block_voxels(shape, itemsize, memory_per_worker, threads_per_worker,
                                    radius))
    sizes = [nx, ny, nz]
    for axis in (2, 1, 0):
        if math.prod(sizes) <= voxels:
            break
        rest = math.prod(sizes) // sizes[axis]
        sizes[axis] = min(sizes[axis], max(1, int(radius[axis]), voxels // rest))
    return tuple(sizes)
