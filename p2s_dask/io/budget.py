"""Chunk shapes and how much to hold in memory at once, from a memory limit.

Where the bytes go while converting (S: slab, T: one store chunk with all
volumes, B: the memory limit):

* streaming a NIfTI: two slabs alive (one being read, one being written),
  the transposed copy of the one being written and the pieces cut from it:
  at most about 4 S, so S = B / 5;
* moving blocks between the scratch file and the store: each worker holds a
  block as read, as reassembled, and compressed: about 3 T per worker, so
  auto chunks are at most B / 8 (two workers fit) and chunks of more than
  B / 3 are refused.

Fixed costs come on top: a few MiB for threads and gzip blocks in flight.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from dask.utils import format_bytes

# the one parser and default of the budget live with the options; imported
# here under their old names for the conversions and earlier callers
from ..config.budget import DEFAULT_MEMORY_LIMIT, parse_memory_limit
from ..config.options import spell
from ..errors import InputError

__all__ = ["DEFAULT_MEMORY_LIMIT", "Plan", "plan", "parse_memory_limit"]


def normalize_chunks(chunks, shape) -> tuple:
    """``(cx, cy, cz)`` from 3 spatial chunk sizes or 4 with the volume count last.

    ``-1`` or None for an axis means the whole axis.
    """
    chunks = tuple(chunks)
    if len(chunks) == 4:
        if chunks[3] not in (-1, None, shape[3]):
            raise InputError(
                f"chunks {chunks}: every chunk holds all {shape[3]} volumes; give 3 "
                "spatial chunk sizes (or the volume count last)"
            )
        chunks = chunks[:3]
    if len(chunks) != 3:
        raise InputError(f"chunks must be 3 spatial sizes (x, y, z); got {chunks}")
    out = []
    for c, s in zip(chunks, shape[:3]):
        c = s if c in (-1, None) else c
        if not isinstance(c, int) or isinstance(c, bool) or c < 1:
            raise InputError(f"chunks must be positive integers; got {chunks}")
        out.append(min(c, s))
    return tuple(out)


@dataclass(frozen=True)
class Plan:
    """How a conversion holds data in memory.

    Attributes
    ----------
    shape : tuple of 4 ints
    chunks : tuple of 3 ints
        Spatial chunk shape of the store (every chunk holds all volumes).
    volumes_per_slab : int
        k: volumes read or written together.
    planes_per_slab : int
        z-planes per slab; less than the z size only when one volume does not
        fit the slab budget (then ``volumes_per_slab`` is 1).
    workers : int
        Threads that rechunk in parallel.
    slab_bytes, chunk_bytes : int
    """

    shape: tuple
    chunks: tuple
    volumes_per_slab: int
    planes_per_slab: int
    workers: int
    slab_bytes: int
    chunk_bytes: int

    def slabs(self):
        """``(v0, v1, z0, z1)`` of each slab, in file order."""
        z, n = self.shape[2:]
        k, p = self.volumes_per_slab, self.planes_per_slab
        for v0 in range(0, n, k):
            for z0 in range(0, z, p):
                yield v0, min(v0 + k, n), z0, min(z0 + p, z)

    @property
    def single_slab(self) -> bool:
        """Whether all the data fits in one slab."""
        return self.volumes_per_slab >= self.shape[3]

    @property
    def slab_chunks(self) -> tuple:
        """Chunks of a scratch store that each slab fills with whole chunks."""
        return (*self.chunks, self.volumes_per_slab)


def store_itemsize(raw_dtype, scaled: bool) -> int:
    """Bytes per value the chunk policy counts for the blocks of our store:
    unscaled float data is worked on as stored (volume-major blocks need no
    float64 copy); integers and scaled data go through float64."""
    raw_dtype = np.dtype(raw_dtype)
    return raw_dtype.itemsize if (raw_dtype.kind == "f" and not scaled) else 8


def plan(shape, itemsize, memory_limit, chunks=None, chunk_itemsize=None) -> Plan:
    """Chunks, slab size and worker count that fit ``memory_limit``.

    Parameters
    ----------
    shape : tuple of 4 ints
    itemsize : int
        Bytes per value.
    memory_limit : int
        Bytes.
    chunks : sequence of ints, optional
        Spatial chunk shape; by default the chunk policy's
        (:func:`p2s_dask.planning.chunking.chunk_policy`), which ``denoise`` uses too,
        so a converted store is denoised without a rechunk.
    chunk_itemsize : int, optional
        Bytes per value the chunk policy counts (default ``itemsize``; 8 for
        scaled data, which the denoising passes hold as float64).

    Returns
    -------
    Plan
    """
    x, y, z, n = shape
    slab_budget = memory_limit // 5
    plane = x * y * itemsize
    volume = plane * z
    if volume <= slab_budget:
        max_z = z
    else:
        # a slab is then a run of z-planes of one volume, made of whole
        # chunks: the chunks' z size must fit
        max_z = slab_budget // plane
        if max_z < 1:
            raise InputError(
                f"{spell('memory_limit')} {format_bytes(memory_limit)} is too small: one z-plane "
                f"of a volume is {format_bytes(plane)}; use at least "
                f"{format_bytes(5 * plane)}"
            )
    if chunks is None:
        from dask.system import CPU_COUNT

        from ..planning.chunking import chunk_policy
        chunks = chunk_policy(shape, chunk_itemsize or itemsize, memory_limit, CPU_COUNT)
        chunks = (*chunks[:2], min(chunks[2], max_z))
    else:
        chunks = normalize_chunks(chunks, shape)
        if chunks[2] > max_z:
            raise InputError(
                f"chunks {chunks}: with {spell('memory_limit')} {format_bytes(memory_limit)} a "
                f"volume is streamed {max_z} z-planes at a time, fewer than the z chunk; "
                f"use a larger {spell('memory_limit')} or a smaller z chunk"
            )
    chunk_bytes = math.prod(chunks) * n * itemsize
    if chunk_bytes > memory_limit // 3:
        raise InputError(
            f"chunks {chunks} hold {format_bytes(chunk_bytes)} each (all {n} volumes), "
            f"more than a third of {spell('memory_limit')} {format_bytes(memory_limit)}; "
            f"use a larger {spell('memory_limit')} or smaller chunks"
        )
    workers = max(1, min(os.cpu_count() or 1, memory_limit // (3 * chunk_bytes)))
    if volume * n <= slab_budget:
        k, p = n, z
    elif volume <= slab_budget:
        k, p = slab_budget // volume, z
    else:
        k, p = 1, (slab_budget // plane) // chunks[2] * chunks[2]
    return Plan(
        shape=tuple(shape),
        chunks=chunks,
        volumes_per_slab=k,
        planes_per_slab=p,
        workers=workers,
        slab_bytes=slab_budget,
        chunk_bytes=chunk_bytes,
    )
