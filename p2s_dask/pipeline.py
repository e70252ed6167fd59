"""File to file denoising: NIfTI or Zarr in, NIfTI or Zarr out, bounded memory.

Stages, each resumable from what it leaves in the work store (next to the
output, or under ``tmp_dir``):

1. ``input``: a NIfTI input is streamed once into ``input.zarr``;
2. ``statistics``: one pass over the data, saved as ``summary.pkl``;
3. ``minima``: the prediction's per-volume minima (for ``shift_intensity``),
   saved as ``minima.npy``;
4. ``predict``: every output chunk written once, with a marker per chunk so a
   rerun skips finished chunks;
5. ``output``: a NIfTI output is streamed from ``output.zarr``.

The output appears complete only at the end: a NIfTI is renamed into place, a
Zarr store is marked complete. The work store is removed after success.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import pickle
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field

import dask
import numpy as np

from . import engine
from .cluster import LocalThreads, dask_client, require_shared_files, scheduler_address
from .core.layout import rows_order
from .core.postprocess import intensity_shift, resolve_postprocess
from .errors import InputError
from .groups import make_groups
from .io import (
    fs_and_path, fsl_siblings, is_complete, kind_of, nifti_to_zarr, open_dwi,
    read_bvals, read_bvecs, user_errors, zarr_to_nifti,
)
from .io import mark_complete, open_dwi_array
from .io.budget import parse_memory_limit
from .io.malloc import reuse_freed_memory
from .io.nifti_direct import (block_buffer, create_nifti, finish_writes, is_plain_nifti,
                               open_nifti, submit_block)
from .io.urls import exists, is_local, join, local_path, remove
from .io.zarr_store import create_dwi_store
from .memory import PeakMemory
from .threads import single_threaded_blas
from .validate import check_bvals, check_options, check_precision, check_shape

WORK_SUFFIX = ".p2s-work"


@dataclass
class DenoiseOptions:
    """The Python API's options plus the pipeline's own."""

    patch_radius: object = 0
    model: str = "ols"
    b0_threshold: float = 50
    out_dtype: object = None
    alpha: float = 1.0
    b0_denoising: bool = True
    clip_negative_vals: bool = False
    shift_intensity: bool = True
    version: int = 3
    groups: list | None = None
    mask: str | None = None
    chunks: tuple | None = None
    precision: str | None = None

    def identity(self) -> dict:
        d = asdict(self)
        d["out_dtype"] = None if self.out_dtype is None else str(np.dtype(self.out_dtype))
        d["patch_radius"] = list(np.atleast_1d(self.patch_radius).tolist())
        d["chunks"] = None if self.chunks is None else list(self.chunks)
        return d


@dataclass
class Report:
    """What a run did: seconds per stage, voxel rate, peak memory."""

    output: str
    shape: tuple
    stages: dict = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss: int = 0
    resumed: list = field(default_factory=list)

    @property
    def voxels_per_second(self) -> float:
        return float(np.prod(self.shape[:3])) / max(self.seconds, 1e-9)

    def as_dict(self) -> dict:
        return dict(output=self.output, shape=list(self.shape), stages=self.stages,
                    seconds=self.seconds, peak_rss=self.peak_rss, resumed=self.resumed,
                    voxels_per_second=self.voxels_per_second)

    def summary_line(self) -> str:
        from dask.utils import format_bytes
        return (f"p2s-dask: denoised {'x'.join(map(str, self.shape))} in "
                f"{self.seconds:.1f} s ({self.voxels_per_second:,.0f} voxels/s), "
                f"peak memory {format_bytes(self.peak_rss)} -> {self.output}")


class _Work:
    """The run's scratch store: small files via fsspec, stores as URLs.

    Every access is wrapped in ``user_errors``, so a missing bucket or
    denied access while writing the work store is one line, not a traceback.
    """

    def __init__(self, url, storage_options):
        self.url = str(url).rstrip("/")
        self.so = storage_options
        self.fs, self.path = fs_and_path(self.url, storage_options)

    def file(self, name):
        return join(self.url, name)

    def makedirs(self, name=""):
        # object stores have no folders, and s3fs's makedirs would create a
        # missing bucket: a typo in OUT must be an error, not a new bucket
        if is_local(self.url):
            with user_errors(self.url, "writing"):
                self.fs.makedirs(f"{self.path}/{name}".rstrip("/"), exist_ok=True)

    def has(self, name) -> bool:
        with user_errors(self.url, "reading"):
            return self.fs.exists(f"{self.path}/{name}")

    def write_bytes(self, name, data: bytes):
        # write then rename, so a crash never leaves a half-written file
        tmp = f"{self.path}/{name}.tmp"
        with user_errors(self.url, "writing"):
            with self.fs.open(tmp, "wb") as fh:
                fh.write(data)
            self.fs.mv(tmp, f"{self.path}/{name}")

    def read_bytes(self, name) -> bytes:
        with user_errors(self.url, "reading"), self.fs.open(f"{self.path}/{name}", "rb") as fh:
            return fh.read()

    def done_chunks(self) -> set:
        with user_errors(self.url, "reading"):
            # another process (a worker) wrote the markers: no cached listing
            self.fs.invalidate_cache(self.path)
            if not self.fs.exists(f"{self.path}/done"):
                return set()
            return {os.path.basename(p.rstrip("/"))
                    for p in self.fs.ls(f"{self.path}/done", detail=False)}

    def mark_done(self, key: str):
        with user_errors(self.url, "writing"):
            self.fs.pipe(f"{self.path}/done/{key}", b"")

    def remove(self):
        with user_errors(self.url, "writing"):
            self.fs.invalidate_cache(self.path)
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)


def _discard(out, work: _Work, storage_options):
    """Delete the output that ``--overwrite`` replaces.

    Freeing a large file's blocks takes seconds, so a local output is moved
    into the work store (a rename: instant) and deleted by a background
    thread, which the run joins before it removes the work store. Returns
    that thread, or None when the output was deleted here.
    """
    if is_local(out) and is_local(work.url):
        work.makedirs()
        target = local_path(work.file("replaced"))
        try:
            os.replace(local_path(out), target)
        except OSError:  # another file system (--tmp-dir): delete in place
            pass
        else:
            thread = threading.Thread(target=_delete_local, args=(target,),
                                      name="p2s-discard", daemon=True)
            thread.start()
            return thread
    remove(out, storage_options)
    return None


def _delete_local(path):
    # best effort: whatever is left goes with the work store
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _bucket_note(url, storage_options) -> str:
    """Why an object-store ``url`` is missing, when it is its bucket."""
    if is_local(url):
        return ""
    fs, path = fs_and_path(url, storage_options)
    bucket = path.split("/", 1)[0]
    try:
        # s3fs probes a bucket with HEAD: a refusal reads as absence too
        missing = bool(bucket) and not fs.exists(bucket)
    except Exception:
        return ""
    return f" (the bucket {bucket} does not exist or is not accessible)" if missing else ""


def _work_url(out, tmp_dir):
    base = str(out).rstrip("/")
    if tmp_dir:
        name = base.rsplit("/", 1)[-1]
        digest = hashlib.sha1(base.encode()).hexdigest()[:8]
        return join(str(tmp_dir), f"{name}.{digest}{WORK_SUFFIX}")
    return base + WORK_SUFFIX


def _gradients(inp, kind, bvals, bvecs, storage_options):
    """bvals/bvecs: given, else stored in a Zarr input, else FSL siblings."""
    if bvals is not None:
        bvals = read_bvals(bvals, storage_options) if isinstance(bvals, (str, os.PathLike)) \
            else np.asarray(bvals, float)
    if bvecs is not None and isinstance(bvecs, (str, os.PathLike)):
        bvecs = read_bvecs(bvecs, storage_options)
    if bvals is None and kind == "nifti":
        sib_bval, sib_bvec = fsl_siblings(inp, storage_options)
        if sib_bval is None:
            raise InputError(f"no bvals given and none found next to {inp} "
                             "(expected a .bval file with the same name); pass --bvals")
        bvals = read_bvals(sib_bval, storage_options)
        if bvecs is None and sib_bvec is not None:
            bvecs = read_bvecs(sib_bvec, storage_options)
    return bvals, bvecs


def _engine_chunks(shape, memory_limit, threads, chunks, itemsize=8):
    """Spatial chunks for the budget.

    Per thread a few blocks are alive at once (the block, its prediction,
    the next block read ahead, blocks queued for writing): an eighth of the
    budget per thread, counted in ``itemsize`` bytes per value (8 where a
    block is decoded to float64, the raw size where it is read as stored).
    """
    if chunks is not None:
        return tuple(int(c) for c in chunks)[:3]
    target = int(min(64 << 20, max(1 << 20, memory_limit // (8 * max(threads, 1)))))
    return engine.auto_chunks(shape, target_bytes=target, itemsize=itemsize)[:3]


def denoise_file(inp, out, *, bvals=None, bvecs=None, options: DenoiseOptions | None = None,
                 memory_limit="2GiB", workers=None, threads=None, scheduler=None,
                 overwrite=False, tmp_dir=None, storage_options=None,
                 progress=True) -> Report:
    """Denoise a NIfTI or Zarr dataset into a NIfTI or Zarr file.

    Parameters
    ----------
    inp, out : str
        Paths or fsspec URLs ending in ``.nii``, ``.nii.gz`` or ``.zarr``.
    bvals, bvecs : str or array-like, optional
        FSL files (or arrays). By default those stored in a Zarr input, or
        ``IN``'s FSL-named siblings (``dwi.bval`` / ``dwi.bvec``).
    options : DenoiseOptions, optional
    memory_limit : int or str
        Budget for the whole run (all workers of the local cluster).
    workers, threads : int, optional
        Local cluster shape (default: one worker, one thread per core).
    scheduler : str, optional
        Address of an existing Dask scheduler.
    overwrite : bool
        Replace an existing output (and discard unfinished work).
    tmp_dir : str, optional
        Where the work store goes (default: next to the output).
    storage_options : dict, optional
        fsspec options (endpoint, credentials) for every URL.
    progress : bool
        Progress bars on stderr/stdout.

    Returns
    -------
    Report
    """
    start = time.perf_counter()
    options = options or DenoiseOptions()
    budget = parse_memory_limit(memory_limit)
    in_kind, out_kind = kind_of(inp), kind_of(out)
    radius, model, out_dtype = check_options(
        patch_radius=options.patch_radius, model=options.model, alpha=options.alpha,
        version=options.version, out_dtype=options.out_dtype)
    check_precision(options.precision, None, None)
    with user_errors(inp, "reading"):
        if not exists(inp, storage_options):
            raise InputError(f"input not found: {inp}{_bucket_note(inp, storage_options)}")
    work = _Work(_work_url(out, tmp_dir), storage_options)
    out_done = exists(out, storage_options) and (
        out_kind == "nifti" or is_complete(out, storage_options))
    if out_done and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite to replace it")
    discarding = None
    if overwrite:
        work.remove()
        if exists(out, storage_options):
            discarding = _discard(out, work, storage_options)
    elif exists(out, storage_options) and not work.has("params.json"):
        raise InputError(f"{out} exists (an unfinished store not made by this run); "
                         "pass --overwrite to replace it")
    # everything that can be wrong with the input is checked before any work
    shape, stored, header = _probe(inp, in_kind, storage_options)
    check_shape(shape)
    bvals, bvecs = _gradients(inp, in_kind, bvals, bvecs, storage_options)
    if bvals is None and stored is not None:
        bvals, bvecs = stored.bvals, stored.bvecs if bvecs is None else bvecs
    if bvals is None:
        raise InputError(f"{inp} stores no bvals; pass --bvals")
    bvals = check_bvals(bvals, shape[3])
    if bvecs is not None and np.asarray(bvecs).size != 3 * shape[3]:
        raise InputError(f"bvecs has {np.asarray(bvecs).size // 3} vectors but the data "
                         f"has {shape[3]} volumes")
    groups = make_groups(bvals, shape[3], b0_threshold=options.b0_threshold,
                         b0_denoising=options.b0_denoising, groups=options.groups)
    mask = _load_mask(options.mask, shape, storage_options)
    identity = {"input": str(inp), "output": str(out), "options": options.identity(),
                "bvals": bvals.tolist()}
    resumed = []
    if work.has("params.json"):
        if json.loads(work.read_bytes("params.json")) != identity:
            raise InputError(f"{work.url} holds unfinished work of a run with other inputs "
                             "or options; pass --overwrite to discard it")
        resumed.append("work store")
    else:
        work.makedirs()
        work.write_bytes("params.json", json.dumps(identity).encode())

    report = Report(output=str(out), shape=())
    shift, clip = resolve_postprocess(options.shift_intensity, options.clip_negative_vals)
    with PeakMemory() as peak, dask_client(scheduler, workers=workers, threads=threads,
                                           memory_limit=budget) as client, \
            single_threaded_blas():
        from .cluster import worker_threads
        n_threads = worker_threads(client)

        local_cluster = scheduler_address(scheduler) is None
        if not local_cluster:
            # the user's workers must see our local files (work store, a Zarr
            # input) where we do; a Zarr output is checked once created
            shared = [local_path(work.file("params.json"))] if is_local(work.url) else []
            if in_kind == "zarr" and is_local(inp):
                shared.append(join(local_path(inp), "zarr.json"))
            if shared:
                require_shared_files(client, shared)

        # -- stage 1: the input as a Zarr store with chunks holding all volumes
        t0 = time.perf_counter()
        if in_kind == "nifti" and local_cluster and is_plain_nifti(inp):
            # random access: read the .nii in place, no conversion
            src = None
            direct_chunks = _engine_chunks(
                shape, budget, n_threads, options.chunks,
                itemsize=8 if header.scaled else header.raw_dtype.itemsize)
            values, meta = open_nifti(inp, direct_chunks, meta=header)
            # every task allocates a block and its prediction of the same size:
            # let the allocator hand freed ones back instead of fresh pages
            reuse_freed_memory(int(np.prod(direct_chunks)) * shape[3] * 8)
        elif in_kind == "nifti":
            src = work.file("input.zarr")
            if not (exists(src, storage_options) and is_complete(src, storage_options)):
                chunks = _engine_chunks(shape, budget, n_threads, options.chunks)
                nifti_to_zarr(inp, src, chunks=chunks, memory_limit=budget, bvals=bvals,
                              bvecs=bvecs, overwrite=True, storage_options=storage_options,
                              progress=progress)
            else:
                resumed.append("input")
        else:
            src = inp
        if src is not None:
            values, meta = open_dwi(src, storage_options)
        report.stages["input"] = time.perf_counter() - t0
        report.shape = shape
        chunks = direct_chunks if src is None else \
            _engine_chunks(shape, budget, n_threads, options.chunks)
        arr = engine.as_chunked(values, chunks, radius)

        # -- stage 2: statistics
        t0 = time.perf_counter()
        if work.has("summary.pkl"):
            summary = pickle.loads(work.read_bytes("summary.pkl"))
            resumed.append("statistics")
        else:
            summary = _compute(client, engine.summarize(arr, groups, radius, mask),
                               "statistics", progress)
            work.write_bytes("summary.pkl", pickle.dumps(summary))
        if out_dtype is None:
            out_dtype = _default_out_dtype(meta)
        calc_dtype = check_precision(options.precision, meta.value_dtype, out_dtype)
        fitted = engine.fit_models(summary, groups, radius, model, options.alpha, calc_dtype)
        report.stages["statistics"] = time.perf_counter() - t0

        # -- stage 3: minima of the prediction, for the intensity shift
        t0 = time.perf_counter()
        shift_values = None
        if shift:
            if work.has("minima.npy"):
                pred_min = np.frombuffer(work.read_bytes("minima.npy"), dtype=np.float64)
                resumed.append("minima")
            else:
                pred_min = _compute(client, engine.prediction_minima(arr, fitted, radius),
                                    "minima", progress)
                work.write_bytes("minima.npy", np.asarray(pred_min, np.float64).tobytes())
            shift_values = intensity_shift(fitted.minima, pred_min)
        report.stages["minima"] = time.perf_counter() - t0

        # -- stage 4: prediction, chunk by chunk into a store
        t0 = time.perf_counter()
        out_meta = meta.for_values(np.dtype(out_dtype), shape)
        direct_out = out_kind == "nifti" and local_cluster and str(out).endswith(".nii") \
            and is_local(out)
        done = work.done_chunks()
        work.makedirs("done")
        if direct_out:
            target_url = work.file("output.nii")
            if not (done and exists(target_url)):
                done = set()
                create_nifti(local_path(target_url), out_meta)
            sink = NiftiSink(local_path(target_url), out_meta)
        else:
            target_url = work.file("output.zarr") if out_kind == "nifti" else str(out)
            if done and exists(target_url, storage_options):
                target, _ = open_dwi_array(target_url, storage_options,
                                           require_complete=False, mode="r+")
            else:
                done = set()
                target = create_dwi_store(target_url, shape, out_dtype, chunks, out_meta,
                                          overwrite=True, storage_options=storage_options)
            sink = ZarrSink(target)
            if not local_cluster and out_kind == "zarr" and is_local(target_url):
                require_shared_files(client, [join(local_path(target_url), "zarr.json")])
        if done:
            resumed.append(f"{len(done)} output chunks")
        tasks = _write_tasks(arr, fitted, radius, shift_values, clip, np.dtype(out_dtype),
                             sink, work, done)
        if tasks:
            _compute(client, tasks, "predict", progress)
        if direct_out:
            # the blocks still queued in the workers' writers, then fsync
            client.run(finish_writes, sink.path)
        if not direct_out:
            mark_complete(target_url, storage_options)
        report.stages["predict"] = time.perf_counter() - t0

        # -- stage 5: the NIfTI output
        t0 = time.perf_counter()
        if direct_out:
            os.replace(local_path(target_url), local_path(out))
        elif out_kind == "nifti":
            zarr_to_nifti(target_url, out, memory_limit=budget, overwrite=True,
                          storage_options=storage_options, progress=progress)
        report.stages["output"] = time.perf_counter() - t0
    if discarding is not None:
        discarding.join()
    work.remove()
    report.seconds = time.perf_counter() - start
    report.peak_rss = peak.peak
    report.resumed = resumed
    return report


def _probe(url, kind, storage_options):
    """Shape of the input from its header, the stored meta of a Zarr input
    and the header meta of a NIfTI input (read once, used again later)."""
    if kind == "zarr":
        from .io import open_dwi_array
        array, meta = open_dwi_array(url, storage_options)
        return tuple(array.shape), meta, None
    from .io.nifti_stream import NiftiReader
    reader = NiftiReader(url, storage_options=storage_options)
    try:
        return tuple(reader.meta.shape), None, reader.meta
    finally:
        reader.close()


def _default_out_dtype(meta):
    """The input's dtype; float32 when the input is scaled (its integers are
    not the values) or float."""
    if meta.scaled or np.issubdtype(meta.raw_dtype, np.floating):
        return np.dtype(np.float32) if meta.raw_dtype.itemsize <= 4 else np.dtype(np.float64)
    return meta.raw_dtype


def _load_mask(mask, shape, storage_options):
    if mask is None:
        return None
    import nibabel as nib
    fs, path = fs_and_path(mask, storage_options)
    with user_errors(mask, "reading"), fs.open(path, "rb") as fh:
        data = fh.read()
    if data[:2] == b"\x1f\x8b":  # a mask is small: gunzip it whole
        data = gzip.decompress(data)
    try:
        img = nib.Nifti1Image.from_bytes(data)
    except Exception as exc:
        raise InputError(f"mask {mask} is not a readable NIfTI file ({exc})") from None
    arr = np.asanyarray(img.dataobj)
    if arr.shape[:3] != shape[:3] or (arr.ndim == 4 and arr.shape[3] != 1) or arr.ndim > 4:
        raise InputError(f"mask has shape {arr.shape} but the data's spatial shape is "
                         f"{shape[:3]}")
    return arr.reshape(shape[:3]) > 0


# seconds to wait after each output chunk: lets tests interrupt a run mid-way
CHUNK_DELAY_ENV = "P2S_DASK_CHUNK_DELAY"


class ZarrSink:
    """Output chunks into a Zarr array (whole chunks, so no locking)."""

    def __init__(self, array):
        self.array = array

    def buffer(self, region, dtype):
        return None

    def write(self, region, values, then):
        self.array[region] = values
        then()


class NiftiSink:
    """Output chunks written in place into an uncompressed ``.nii``, by a
    background writer in the worker (see :func:`finish_writes`)."""

    def __init__(self, path, meta):
        self.path, self.meta = path, meta

    def buffer(self, region, dtype):
        """A block laid out for direct writes (or None: the default layout)."""
        return block_buffer(self.meta, region, dtype)

    def write(self, region, values, then):
        submit_block(self.path, self.meta, region, values, then)


def _write_chunk(block, region, fitted, radius, shift, clip, dtype, sink, work, key):
    # a volume-major block predicts straight into the writer's layout
    buffer = sink.buffer(region, dtype) if rows_order(block) == "F" else None
    out = engine.predict_chunk(block, fitted, radius, shift, clip, dtype, out=buffer)
    # the marker goes after the data: a marked chunk is always fully written
    sink.write(region, out, lambda: work.mark_done(key))
    delay = float(os.environ.get(CHUNK_DELAY_ENV, 0) or 0)
    if delay:
        time.sleep(delay)
    return key


def _write_tasks(arr, fitted, radius, shift, clip, dtype, sink, work, done):
    halo = engine.with_halo(arr, radius)
    blocks = halo.to_delayed()
    starts = engine.chunk_origins(arr.chunks)
    fitted_d = dask.delayed(fitted)
    write = dask.delayed(_write_chunk, pure=False)
    tasks = []
    for idx in np.ndindex(*blocks.shape[:3]):
        key = ".".join(map(str, idx))
        if key in done:
            continue
        region = tuple(slice(int(starts[a][idx[a]]), int(starts[a][idx[a]] + arr.chunks[a][idx[a]]))
                       for a in range(3))
        tasks.append(write(blocks[idx + (0,)], region, fitted_d, radius, shift, clip, dtype,
                           sink, work, key))
    return tasks


def _compute(client, collection, desc, progress):
    if isinstance(client, LocalThreads):
        return client.compute(collection, desc, progress)
    futures = client.compute(collection)
    if progress:
        from distributed import progress as show
        print(f"[{desc}]", flush=True)
        show(futures, notebook=False)
        print(flush=True)
    return client.gather(futures)
