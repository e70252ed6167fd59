"""Sinks: each owns one output's whole life.

``create`` reserves it (or reopens it to resume), ``write`` stores one chunk
and is safe from any worker (a chunk is written whole, by one task),
``commit`` makes it complete atomically and ``abort`` leaves nothing that
looks complete. The pipeline calls them; it does no sink's work itself.

* :class:`NiftiDirectSink`: a plain local ``.nii``, blocks written in place
  into a reserved file next to OUT (``OUT.p2s.partial``: the same file
  system, so the commit is one rename), renamed onto OUT at commit.
* :class:`ZarrSink`: a Zarr store; local stores are built next to OUT the
  same way and renamed onto it at commit, object-store ones are written in
  place and marked complete last, after every chunk is known to be there.
* :class:`NiftiViaZarrSink`: a ``.nii.gz`` or remote ``.nii``: a Zarr store in
  the work store, streamed into OUT at commit (under a temporary name).
* :class:`NiftiMemorySink`: the same, when the image fits the budget and the
  tasks run in this process: blocks go into an array here, written into OUT
  (under a temporary name) at commit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass

import numpy as np

from ..core.layout import volume_columns
from ..io import zarr_to_nifti
from ..io.budget import DEFAULT_MEMORY_LIMIT
from ..io.nifti_memory import write_whole
from ..io.nifti_direct import block_buffer, create_nifti, finish_writes, submit_block
from ..io.urls import exists, is_local, local_path, remove
from ..io.zarr_store import (create_dwi_store, finish_region_writes, mark_complete,
                            open_dwi_array, store_state, submit_region)


class NiftiDirectSink:
    """A local uncompressed ``.nii`` written block by block in place."""

    def __init__(self, out, work, meta):
        self.out, self.meta = out, meta
        self.path = partial_path(out)

    def create(self, resume: bool) -> bool:
        """Reserve the file (or keep it to resume); True when resumed."""
        if resume and os.path.exists(self.path):
            return True
        create_nifti(self.path, self.meta)
        return False

    def buffer(self, region, dtype):
        """A block laid out for direct writes (or None: the default layout)."""
        return block_buffer(self.meta, region, dtype)

    def write(self, region, values, then):
        submit_block(self.path, self.meta, region, values, then)

    def finish(self, executor):
        """Wait for the workers' background writers (and fsync)."""
        executor.run(finish_writes, self.path)

    def commit(self, executor, storage_options=None):
        self.finish(executor)
        os.replace(self.path, local_path(self.out))

    def abort(self, executor):
        # the blocks queued in this process's writer; the file stays in the
        # work store for a rerun
        with contextlib.suppress(Exception):
            executor.run(finish_writes, self.path)


class ZarrSink:
    """A Zarr output store, chunk by chunk."""

    def __init__(self, out, work, meta, chunks, storage_options=None, compressor=None):
        self.out, self.meta, self.chunks = out, meta, tuple(chunks)
        self.so, self.compressor = storage_options, compressor
        # a local store is built aside and renamed into place: OUT is either
        # the old output or the complete new one, never half of each
        self.in_place = not is_local(out)
        self.url = str(out) if self.in_place else partial_path(out)
        self.array = None

    def create(self, resume: bool) -> bool:
        if resume and store_state(self.url, self.so) in ("incomplete", "complete"):
            self.array, _ = open_dwi_array(self.url, self.so, require_complete=False,
                                           mode="r+")
            return True
        if exists(self.url, self.so):
            remove(self.url, self.so)
        self.array = create_dwi_store(self.url, self.meta.shape, self.meta.raw_dtype,
                                      self.chunks, self.meta, overwrite=True,
                                      storage_options=self.so, compressor=self.compressor)
        return False

    def buffer(self, region, dtype):
        return None

    def write(self, region, values, then):
        """Encode the chunk now; this process's background writer stores it
        and then runs ``then`` (see :func:`.io.zarr_store.submit_region`)."""
        submit_region(self.array, region, values, self.url, then)

    def finish(self, executor):
        """Wait for the workers' background writers, then mark the store
        complete (which verifies every chunk first)."""
        executor.run(finish_region_writes, self.url)
        mark_complete(self.url, self.so)

    def commit(self, executor, storage_options=None):
        # finish() (the verified completion mark) ran at the end of the pass
        if self.in_place:
            return
        _replace_dir(self.url, local_path(self.out))

    def abort(self, executor):
        # the chunks queued in the background writers; never marked
        # complete, a rerun resumes it
        with contextlib.suppress(Exception):
            executor.run(finish_region_writes, self.url)


@dataclass(frozen=True)
class Stream:
    """How a store is streamed into a NIfTI at commit: within
    ``memory_limit`` bytes (the plan's output pass), scratch files under
    ``tmp_dir``, with or without progress lines."""

    memory_limit: int = DEFAULT_MEMORY_LIMIT
    tmp_dir: str | None = None
    progress: bool = False


class NiftiViaZarrSink(ZarrSink):
    """A ``.nii.gz`` (or remote ``.nii``): a Zarr store in the work store,
    streamed into OUT at commit (see :class:`Stream`)."""

    def __init__(self, out, work, meta, chunks, storage_options=None, compressor=None,
                 stream: Stream | None = None):
        super().__init__(out, work, meta, chunks, storage_options, compressor)
        self.in_place = False
        self.url = work.file("output.zarr")
        self.stream = stream or Stream()

    def commit(self, executor, storage_options=None):
        if store_state(self.url, self.so) != "complete":
            self.finish(executor)
        stream = self.stream
        zarr_to_nifti(self.url, self.out, memory_limit=stream.memory_limit, overwrite=True,
                      storage_options=self.so, tmp_dir=stream.tmp_dir,
                      progress=stream.progress)


class NiftiMemorySink:
    """A ``.nii.gz`` (or remote ``.nii``) that fits the budget, filled in
    memory by this process's threads and written whole at commit.

    Nothing of it outlives the process, so it is never resumed and marks no
    chunk done (a mark would claim a chunk that a rerun cannot find).
    """

    def __init__(self, out, meta, storage_options=None):
        self.out, self.meta, self.so = out, meta, storage_options
        self.values = None

    def create(self, resume: bool) -> bool:
        self.values = np.empty(tuple(self.meta.shape), dtype=self.meta.raw_dtype, order="F")
        return False

    def buffer(self, region, dtype):
        """The region of the image itself, when the prediction can fill it
        in place (each volume's part one Fortran-ordered run)."""
        if np.dtype(dtype) != self.values.dtype:
            return None
        view = self.values[region]
        return view if volume_columns(view) is not None else None

    def write(self, region, values, then):
        # a task of this process's threaded scheduler (the plan chose this
        # sink only for those), so the image is this process's own
        if not np.may_share_memory(values, self.values):
            self.values[region] = values

    def finish(self, executor):
        pass

    def commit(self, executor, storage_options=None):
        write_whole(self.out, self.meta, self.values, self.so)
        self.values = None

    def abort(self, executor):
        self.values = None


def partial_path(out) -> str:
    """Where a local output is built before its commit: next to OUT (one
    file system, so the commit is a rename) under a name no reader takes for
    a finished image."""
    return local_path(out) + ".p2s.partial"


def _replace_dir(new, out):
    """Put the directory ``new`` at ``out``, replacing what is there.

    Two renames (the old output moves aside, the new one moves in), then
    the old one is deleted.
    """
    old = None
    if os.path.lexists(out):
        old = f"{new}.replaced"
        os.replace(out, old)
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
