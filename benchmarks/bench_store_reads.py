"""What a reader pays for one volume, and for one spatial block, of a store.

Writes the same synthetic int16 acquisition (``--shape X Y Z --nvols N``,
default 256 x 256 x 128 x 300, 5 GB raw) into two local stores:

* before: our format 1 (array ``dwi``, axes x, y, z, n, one chunk = all
  volumes of a spatial block, no sharding);
* after: the NIfTI-Zarr layout (array ``0``, axes t, z, y, x, one shard =
  all volumes of a spatial block, one inner chunk per volume),

with the same spatial blocks (the chunk policy's for the default budget)
and the same Blosc codec. Then, page cache dropped before each read, reads
through plain Zarr (as a viewer, xarray or nifti-zarr would):

* one volume (the middle one);
* one spatial block of all volumes (the block at the centre).

Bytes read are the process's ``rchar`` (every byte returned by read
system calls, metadata included). Prints a table and writes JSON.

Usage::

    python benchmarks/bench_store_reads.py --workdir /tmp/reads
    python benchmarks/bench_store_reads.py --shape 64 64 32 --nvols 60   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import zarr

from p2s_dask.io import DwiMeta, create_dwi_store, write_region
from p2s_dask.io.budget import DEFAULT_MEMORY_LIMIT, plan
from p2s_dask.io.zarr_store import default_compressor, mark_complete

HERE = Path(__file__).resolve().parent


def rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def block_values(shape, nvols, region, rng):
    """A brain-like int16 block of all volumes: an ellipsoid of signal that
    attenuates per volume, noise everywhere, zeros beyond the head."""
    axes = [np.linspace(-1, 1, n)[s] for n, s in zip(shape, region)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt((x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.8) ** 2)
    head = np.clip((1.0 - r) * 12, 0, 1).astype(np.float32)[..., None]
    atten = np.exp(-np.linspace(0, 2, nvols, dtype=np.float32))[None, None, None, :]
    values = 1500 * head * atten + rng.normal(0, 40, (*x.shape, nvols)).astype(np.float32)
    return np.clip(np.abs(values) * (head > 0), 0, 32767).astype(np.int16)


def blocks(shape, chunks):
    for i in range(0, shape[0], chunks[0]):
        for j in range(0, shape[1], chunks[1]):
            for k in range(0, shape[2], chunks[2]):
                yield tuple(slice(a, min(a + c, n)) for a, c, n in
                            zip((i, j, k), chunks, shape))


def write_stores(work: Path, shape, nvols, chunks):
    """Both layouts, block by block from the same seeded generator."""
    full = (*shape, nvols)
    meta = DwiMeta.for_array(full, np.int16)
    old = zarr.create_group(str(work / "before.zarr"), zarr_format=3, overwrite=True,
                            attributes={"p2s_dask": {"format": "p2s-dask-dwi", "version": 1,
                                                     **meta.to_json(), "complete": True}})
    old_dwi = old.create_array("dwi", shape=full, dtype=np.int16, chunks=(*chunks, nvols),
                               compressors=default_compressor(), fill_value=0,
                               dimension_names=("x", "y", "z", "volume"))
    new = create_dwi_store(work / "after.zarr", full, np.int16, chunks, meta, overwrite=True)
    rng = np.random.default_rng(0)
    for region in blocks(shape, chunks):
        values = block_values(shape, nvols, region, rng)
        old_dwi[region] = values
        write_region(new, (*region, slice(None)), values, str(work / "after.zarr"))
    mark_complete(work / "after.zarr")


def timed_read(read, cold: bool):
    if cold:
        drop_caches()
    before, start = rchar(), time.perf_counter()
    out = read()
    return time.perf_counter() - start, rchar() - before, out


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args):
    shape, nvols = tuple(args.shape), args.nvols
    chunks = plan((*shape, nvols), 2, DEFAULT_MEMORY_LIMIT, chunk_itemsize=8).chunks
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_stores(work, shape, nvols, chunks)
    print(f"stores written in {time.perf_counter() - start:.1f} s; blocks {chunks}")
    cold = drop_caches()
    v = nvols // 2
    centre = tuple(slice((n // 2 // c) * c, min((n // 2 // c) * c + c, n))
                   for n, c in zip(shape, chunks))
    old = zarr.open_group(str(work / "before.zarr"), mode="r")["dwi"]
    new = zarr.open_group(str(work / "after.zarr"), mode="r")["0"]
    reads = {
        ("one volume", "before"): lambda: old[:, :, :, v],
        ("one volume", "after"): lambda: new[v],
        ("one block, all volumes", "before"): lambda: old[centre],
        ("one block, all volumes", "after"): lambda: new[(slice(None), *centre[::-1])],
    }
    rows, results = [], {}
    for (what, layout), read in reads.items():
        seconds, nbytes, out = timed_read(read, cold)
        rows.append((what, layout, out.nbytes, nbytes, seconds))
        results.setdefault(what, {})[layout] = {"bytes_read": nbytes, "seconds": seconds,
                                                "values_bytes": out.nbytes}
    # the two layouts hold the same numbers
    assert np.array_equal(old[:, :, :, v], new[v].T)
    print(f"\n{'read':<24}{'layout':<8}{'values MB':>11}{'read MB':>10}{'seconds':>9}")
    for what, layout, values, nbytes, seconds in rows:
        print(f"{what:<24}{layout:<8}{values / 1e6:>11.2f}{nbytes / 1e6:>10.2f}{seconds:>9.3f}")
    sizes = {k: store_bytes(work / f"{k}.zarr") for k in ("before", "after")}
    print(f"\nstore sizes: before {sizes['before'] / 1e9:.2f} GB, after {sizes['after'] / 1e9:.2f} GB"
          f"; page cache {'dropped' if cold else 'NOT dropped (not root)'} before each read")
    record = {"shape": [*shape, nvols], "dtype": "int16", "blocks": list(chunks),
              "cold": cold, "results": results, "store_bytes": sizes,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    if not args.keep:
        for k in ("before", "after"):
            shutil.rmtree(work / f"{k}.zarr", ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(256, 256, 128))
    p.add_argument("--nvols", type=int, default=300)
    p.add_argument("--workdir", default="/tmp/p2s-bench-reads")
    p.add_argument("--json", default=str(HERE / "results" / "bench_store_reads.json"))
    p.add_argument("--keep", action="store_true")
    run(p.parse_args())


if __name__ == "__main__":
    main()
