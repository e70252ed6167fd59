"""gzip benchmark: reading and writing a ~400 MB ``.nii.gz``, zlib against ISA-L.

Generates (in ``--workdir``, one volume at a time) a noisy DWI-like phantom,
96x96x60x180 float32 by default (398 MB of voxels): an ellipsoid "brain" with
smooth contrast and a CSF blob, each volume attenuated by its own b-value and
direction, Rician noise, zero-mean noise around it. Then, for each gzip
backend of :mod:`p2s_dask.io.nifti_stream` (chosen with ``P2S_DASK_GZIP``,
as a user would; "zlib" is the fallback taken when isal is not installed):

- write: the voxels (held in memory) through ``NiftiWriter`` to a
  ``.nii.gz``, ``--slab`` volumes per write, level 1 (the default);
- read: that file written by zlib (a standard level-1 stream, as nibabel or
  a scanner writes it) through ``NiftiReader``, ``--slab`` volumes per read.
  It comes from the page cache: this measures decompression, not the disk.

MB/s counts uncompressed bytes (the ``.nii``) per wall second. CPU seconds are
``getrusage(RUSAGE_SELF)`` user + system, which covers every thread of the
process (ISA-L's writer compresses in background threads). Each figure is the
median of ``--repeat`` runs; all runs are in the JSON.

Usage::

    python benchmarks/bench_gzip.py --workdir /tmp/p2s_gzip \
        --json benchmarks/results/bench_gzip.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from p2s_dask.io import nifti_stream
from p2s_dask.io.nifti_stream import GZIP_ENV, NiftiReader, NiftiWriter

BACKENDS = ("zlib", "isal")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of the process
    return usage.ru_utime + usage.ru_stime


def phantom_volumes(shape, nvols, dtype, seed=0):
    """Yield the volumes of a noisy DWI-like phantom, Fortran ordered."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    gx, gy, gz = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny),
                             np.linspace(-1, 1, nz), indexing="ij")
    brain = gx ** 2 / 0.8 + gy ** 2 / 0.9 + gz ** 2 / 0.7 < 1
    s0 = np.where(brain, 800 + 400 * np.cos(6 * gx) * np.sin(5 * gy), 0)
    csf = gx ** 2 + (gy - 0.1) ** 2 + gz ** 2 < 0.05
    s0[csf] = 1800
    nb0 = max(1, nvols // 15)
    bvals = np.r_[np.zeros(nb0), np.full((nvols - nb0) // 2, 1000.0),
                  np.full(nvols - nb0 - (nvols - nb0) // 2, 2000.0)]
    dirs = rng.normal(size=(nvols, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    fibre = np.stack([np.cos(3 * gz), np.sin(3 * gz), np.zeros_like(gz)], -1)
    sigma = 25.0
    for v in range(nvols):
        diffusivity = np.where(csf, 3e-3, 7e-4 + 1.2e-3 * (fibre @ dirs[v]) ** 2)
        signal = s0 * np.exp(-bvals[v] * diffusivity)
        real = signal + rng.normal(0, sigma, signal.shape)
        imag = rng.normal(0, sigma, signal.shape)
        magnitude = np.sqrt(real * real + imag * imag)
        if np.dtype(dtype).kind != "f":
            magnitude = np.rint(magnitude)
        yield np.asfortranarray(magnitude.astype(dtype))


def generate(path: Path, shape, nvols, dtype):
    """The plain ``.nii``, written one volume at a time (kept between runs)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(tuple(shape) + (nvols,))
    hdr.set_data_dtype(dtype)
    hdr.set_xyzt_units("mm", "sec")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    hdr.set_qform(affine, 1)
    hdr.set_sform(affine, 1)
    hdr["vox_offset"] = 352
    size = 352 + int(np.prod(shape)) * nvols * np.dtype(dtype).itemsize
    if path.exists() and path.stat().st_size == size:
        return
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as fh:
        fh.write(hdr.binaryblock)
        fh.write(b"\0" * (352 - len(hdr.binaryblock)))
        for volume in phantom_volumes(shape, nvols, dtype):
            fh.write(volume.tobytes(order="F"))
    os.replace(tmp, path)


def measure(run, repeat):
    """Run ``run()`` ``repeat`` times; wall and CPU seconds of each."""
    samples = []
    for _ in range(repeat):
        wall0, cpu0 = time.perf_counter(), cpu_seconds()
        run()
        samples.append({"wall_s": time.perf_counter() - wall0, "cpu_s": cpu_seconds() - cpu0})
    return samples


def summary(samples, nbytes):
    wall = statistics.median(s["wall_s"] for s in samples)
    cpu = statistics.median(s["cpu_s"] for s in samples)
    return {"MB_per_s": nbytes / wall / 1e6, "wall_s": wall, "cpu_s": cpu,
            "MB_per_cpu_s": nbytes / cpu / 1e6, "runs": samples}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/p2s_gzip"))
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 60))
    parser.add_argument("--nvols", type=int, default=180)
    parser.add_argument("--dtype", default="float32", choices=("float32", "int16"))
    parser.add_argument("--slab", type=int, default=8, help="volumes per read or write")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).parent / "results" / "bench_gzip.json")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    shape, nvols, dtype = tuple(args.shape), args.nvols, np.dtype(args.dtype)

    plain = args.workdir / f"phantom_{'x'.join(map(str, shape))}x{nvols}_{dtype.name}.nii"
    t0 = time.perf_counter()
    generate(plain, shape, nvols, dtype)
    print(f"input: {plain} ({plain.stat().st_size / 1e6:.0f} MB, "
          f"{time.perf_counter() - t0:.1f} s to make)", flush=True)
    with NiftiReader(plain) as reader:
        meta = reader.meta
        data = reader.read_slab(meta.shape)  # Fortran ordered, as in the file
    nbytes = plain.stat().st_size  # header + voxels, uncompressed
    slabs = [np.ascontiguousarray(data[..., v:v + args.slab].T)  # C order of the transposed
             for v in range(0, nvols, args.slab)]
    del data

    previous = os.environ.get(GZIP_ENV)
    results = {}
    try:
        for backend in BACKENDS:
            os.environ[GZIP_ENV] = backend
            out = args.workdir / f"written_by_{backend}.nii.gz"

            def write():
                with NiftiWriter(out, meta, overwrite=True) as writer:
                    assert writer.gzip_backend == backend
                    for slab in slabs:
                        writer.write(slab)
                    writer.commit()

            results[backend] = {"write": summary(measure(write, args.repeat), nbytes)}
            results[backend]["write"]["compressed_bytes"] = out.stat().st_size
            results[backend]["write"]["ratio"] = out.stat().st_size / nbytes
            print(f"{backend}: written, {out.stat().st_size / nbytes:.4f} of the size",
                  flush=True)

        source = args.workdir / "written_by_zlib.nii.gz"
        for backend in BACKENDS:
            os.environ[GZIP_ENV] = backend

            def read():
                with NiftiReader(source) as reader:
                    assert reader.gzip_backend == backend
                    x, y, z, n = reader.meta.shape
                    for v in range(0, n, args.slab):
                        reader.read_slab((x, y, z, min(args.slab, n - v)))

            results[backend]["read"] = summary(measure(read, args.repeat), nbytes)
            print(f"{backend}: read", flush=True)

        # what each backend wrote is one gzip stream of the same bytes
        for backend in BACKENDS:
            with open(args.workdir / f"written_by_{backend}.nii.gz", "rb") as fh:
                whole = zlib.decompress(fh.read(), 16 + zlib.MAX_WBITS)
            assert whole == plain.read_bytes(), backend
    finally:
        if previous is None:
            os.environ.pop(GZIP_ENV, None)
        else:
            os.environ[GZIP_ENV] = previous
        if not args.keep:
            for backend in BACKENDS:
                (args.workdir / f"written_by_{backend}.nii.gz").unlink(missing_ok=True)

    before, after = results["zlib"], results["isal"]
    speedup = {f"{op}_{what}": (after[op]["MB_per_s"] / before[op]["MB_per_s"]
                                if what == "speed" else before[op]["cpu_s"] / after[op]["cpu_s"])
               for op in ("read", "write") for what in ("speed", "cpu")}

    import isal

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    report = {
        "benchmark": "bench_gzip",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": cores, "python": platform.python_version(),
                    "platform": platform.platform(), "isal": isal.__version__,
                    "zlib": zlib.ZLIB_RUNTIME_VERSION,
                    "load_average": list(os.getloadavg())},
        "data": {"shape": list(shape) + [nvols], "dtype": dtype.name, "bytes": nbytes,
                 "slab_volumes": args.slab, "repeat": args.repeat},
        "isal_writer": {"level": nifti_stream._isal_level(1),
                        "threads": max(1, min(nifti_stream._ISAL_MAX_THREADS, cores)),
                        "block_bytes": nifti_stream._ISAL_BLOCK},
        "zlib_writer": {"level": 1, "threads": 1},
        "results": results,
        "speedup_isal_over_zlib": speedup,
    }

    print()
    print(f"{nbytes / 1e6:.0f} MB .nii ({'x'.join(map(str, shape))}x{nvols} {dtype.name}), "
          f"{cores} CPUs, median of {args.repeat}")
    head = (f"{'backend':8} {'read MB/s':>10} {'read CPU s':>11} {'write MB/s':>11} "
            f"{'write CPU s':>12} {'written/raw':>12}")
    print(head)
    print("-" * len(head))
    for backend in BACKENDS:
        r, w = results[backend]["read"], results[backend]["write"]
        print(f"{backend:8} {r['MB_per_s']:10.1f} {r['cpu_s']:11.2f} {w['MB_per_s']:11.1f} "
              f"{w['cpu_s']:12.2f} {w['ratio']:12.4f}")
    print(f"{'isal/zlib':8} {speedup['read_speed']:9.2f}x {speedup['read_cpu']:10.2f}x "
          f"{speedup['write_speed']:10.2f}x {speedup['write_cpu']:11.2f}x")
    print("(speed: MB/s ratio; CPU: zlib CPU seconds / isal CPU seconds)")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
