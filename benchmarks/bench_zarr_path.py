"""The Zarr path against the plain .nii path, same data, same machine.

Makes a synthetic DWI acquisition (``--shape X Y Z --nvols N``, float32 by
default) as a plain ``.nii`` in ``--workdir``, converts it with
``p2s-dask convert``, then denoises ``.nii -> .nii`` and ``.zarr -> .zarr``,
each run in a fresh process of the command line (``--report-json``), in
alternating order for ``--repeats`` rounds. Prints a table of the stage
times, the ratio of statistics + minima + predict (Zarr / NIfTI) and the
peak RSS of each run's process tree (as the command reports it), and writes
everything to ``benchmarks/results/bench_zarr_path.json``.

``--malloc-reuse`` starts both runs with glibc's mmap and trim thresholds
raised (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) to what
``p2s_dask.io.malloc.reuse_freed_memory`` sets for the block size: what the
``.nii`` path does for itself once it knows its blocks.

Usage::

    python benchmarks/bench_zarr_path.py                      # 96 x 96 x 60 x 160
    python benchmarks/bench_zarr_path.py --repeats 3
    python benchmarks/bench_zarr_path.py --shape 145 174 145 --nvols 288  # HCP size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STAGES = ("input", "statistics", "minima", "predict", "output")
CORE = ("statistics", "minima", "predict")


def make_dwi(path: Path, shape, nvols: int, dtype, seed: int = 1) -> None:
    """A brain-like acquisition written volume by volume (bounded memory):
    an ellipsoidal head whose tissue attenuates differently in every
    direction, Gaussian noise everywhere (Rayleigh-like background), 10% b0s."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    nb0 = max(1, nvols // 10)
    bvals = np.array([0] * nb0 + [1000 if i % 2 else 2000 for i in range(nvols - nb0)])
    bvecs = rng.normal(size=(3, nvols))
    bvecs /= np.linalg.norm(bvecs, axis=0)
    bvecs[:, :nb0] = 0
    x, y, z = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny),
                          np.linspace(-1, 1, nz), indexing="ij")
    r = np.sqrt((x / 0.85) ** 2 + (y / 0.9) ** 2 + (z / 0.8) ** 2)
    head = np.clip((1.0 - r) * 12, 0, 1).astype(np.float32)
    s0 = (1000 * head * (1 + 0.2 * np.sin(5 * x) * np.cos(4 * y))).astype(np.float32)
    # two tissue classes with different orientation preferences
    fa = np.clip(0.5 + 0.5 * np.sin(7 * x + 3 * z), 0, 1).astype(np.float32)
    axis = np.stack([np.cos(3 * y), np.sin(3 * y), 0.3 * np.ones_like(y)]).astype(np.float32)
    axis /= np.linalg.norm(axis, axis=0)
    del x, y, z, r
    sigma = 1000 / 25
    dtype = np.dtype(dtype)
    img = nib.Nifti1Image(np.zeros((1, 1, 1, 1), dtype), np.diag([2.0, 2.0, 2.0, 1.0]))
    hdr = img.header
    hdr.set_data_shape((nx, ny, nz, nvols))
    hdr.set_data_dtype(dtype)
    offset = 352
    hdr["vox_offset"] = offset
    with open(path, "wb") as fh:
        fh.write(hdr.binaryblock)
        fh.write(b"\0" * (offset - len(hdr.binaryblock)))
        for v in range(nvols):
            if bvals[v] == 0:
                signal = s0
            else:
                cos2 = np.einsum("i,i...->...", bvecs[:, v], axis) ** 2
                d = 0.8e-3 + 1.2e-3 * fa * (cos2 - 1 / 3)
                signal = s0 * np.exp(-bvals[v] * d)
            noisy = np.abs(signal + rng.normal(0, sigma, signal.shape).astype(np.float32))
            fh.write(np.asarray(noisy, dtype).tobytes(order="F"))
    stem = str(path)[:-len(".nii")]
    np.savetxt(stem + ".bval", bvals[None], fmt="%d")
    np.savetxt(stem + ".bvec", bvecs, fmt="%.6f")


def cli(*args, env=None) -> tuple[float, float]:
    """Run the command line; its wall seconds and CPU seconds (user + system
    of the process and its children, start-up included)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "p2s_dask.fronts.cli", *map(str, args)], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def remove(path: Path) -> None:
    """A file or folder, and the sidecars written next to an output NIfTI."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    if path.suffix == ".nii":
        for side in (".bval", ".bvec", ".json"):
            path.with_suffix(side).unlink(missing_ok=True)


def denoise(src: Path, out: Path, report: Path, extra, env) -> dict:
    remove(out)
    report.unlink(missing_ok=True)  # the command never replaces a file without --overwrite
    wall, cpu = cli("denoise", src, out, "--quiet", "--report-json", report, *extra, env=env)
    got = json.loads(report.read_text())
    stages = {k: float(got["stages"].get(k, 0.0)) for k in STAGES}
    return {"stages": stages, "core": sum(stages[k] for k in CORE),
            "seconds": float(got["seconds"]), "process_wall": wall, "process_cpu": cpu,
            "peak_rss": int(got["peak_rss"])}


def malloc_env(shape, nvols) -> dict:
    """glibc thresholds as reuse_freed_memory sets them for the default
    chunks (a generous bound: the float64 bytes of the whole data)."""
    block = int(np.prod(shape)) * nvols * 8
    size = max(block, 1 << 20) * 2
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(min(size, 1 << 30))
    env["MALLOC_TRIM_THRESHOLD_"] = str(min(4 * size, (1 << 31) - 1))
    return env


def table(runs) -> str:
    lines = ["| round | path | " + " | ".join(STAGES) + " | stats+minima+predict | "
             "ratio | process CPU s | peak RSS MiB |",
             "|---|---|" + "---:|" * (len(STAGES) + 4)]
    for i, pair in enumerate(runs):
        ratio = pair["zarr"]["core"] / pair["nii"]["core"]
        for name in ("nii", "zarr"):
            r = pair[name]
            cells = " | ".join(f"{r['stages'][k]:.2f}" for k in STAGES)
            lines.append(f"| {i + 1} | {name} | {cells} | {r['core']:.2f} | "
                         f"{ratio if name == 'zarr' else 1.0:.2f} | {r['process_cpu']:.2f} | "
                         f"{r['peak_rss'] / 2**20:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", nargs=3, type=int, default=[96, 96, 60], metavar=("X", "Y", "Z"))
    ap.add_argument("--nvols", type=int, default=160)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--workdir", default=None,
                    help="where the data and outputs go (default: a folder in /tmp)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--memory-limit", default=None, help="passed to both denoise runs")
    ap.add_argument("--chunks", default=None, metavar="X,Y,Z",
                    help="passed to convert and both denoise runs (default: each "
                         "command's own choice)")
    ap.add_argument("--malloc-reuse", action="store_true",
                    help="raise glibc's mmap/trim thresholds for both runs")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--json", default=str(HERE / "results" / "bench_zarr_path.json"))
    args = ap.parse_args(argv)

    shape, nvols = tuple(args.shape), args.nvols
    tag = "x".join(map(str, (*shape, nvols)))
    work = Path(args.workdir or f"/tmp/p2s-bench-zarr-{tag}-{args.dtype}")
    work.mkdir(parents=True, exist_ok=True)
    nii, store = work / "dwi.nii", work / "dwi.zarr"
    made = time.perf_counter()
    if not nii.exists():
        print(f"making {nii} ({tag} {args.dtype})", flush=True)
        make_dwi(nii, shape, nvols, args.dtype)
    made = time.perf_counter() - made
    remove(store)
    chunks = ["--chunks", args.chunks] if args.chunks else []
    convert = cli("convert", nii, store, "--quiet", *chunks)[0]
    print(f"convert: {convert:.2f} s", flush=True)
    extra = (["--memory-limit", args.memory_limit] if args.memory_limit else []) + chunks
    env = malloc_env(shape, nvols) if args.malloc_reuse else None
    runs = []
    for i in range(args.repeats):
        pair = {}
        order = ("nii", "zarr") if i % 2 == 0 else ("zarr", "nii")
        for name in order:
            src, out = (nii, work / "out.nii") if name == "nii" else (store, work / "out.zarr")
            pair[name] = denoise(src, out, work / f"report_{name}.json", extra, env)
        runs.append(pair)
        print(f"round {i + 1}: zarr/nii {pair['zarr']['core'] / pair['nii']['core']:.2f}",
              flush=True)
    if not args.keep:
        remove(work / "out.nii")
        remove(work / "out.zarr")
    ratios = [p["zarr"]["core"] / p["nii"]["core"] for p in runs]
    print()
    print(f"Data {tag} {args.dtype}; {os.cpu_count()} CPUs; load average before: "
          f"{os.getloadavg()[0]:.1f}")
    print(table(runs))
    best = min(p["zarr"]["core"] for p in runs) / min(p["nii"]["core"] for p in runs)
    cpu = {k: float(np.median([p[k]["process_cpu"] for p in runs])) for k in ("nii", "zarr")}
    print(f"\nzarr / nii (statistics + minima + predict): "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; median {np.median(ratios):.2f}; "
          f"best zarr / best nii {best:.2f}")
    print(f"median CPU seconds per run (whole process): nii {cpu['nii']:.2f}, "
          f"zarr {cpu['zarr']:.2f}")
    result = {
        "data": {"shape": [*shape, nvols], "dtype": args.dtype,
                 "nii_bytes": nii.stat().st_size, "made_seconds": made},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "options": {"memory_limit": args.memory_limit, "malloc_reuse": args.malloc_reuse,
                    "chunks": args.chunks},
        # array 0 (t, z, y, x): one shard per spatial block of all volumes
        "stored_shards": json.loads((store / "0" / "zarr.json").read_text())
        ["chunk_grid"]["configuration"]["chunk_shape"],
        "convert_seconds": convert,
        "runs": runs,
        "ratios": ratios,
        "median_ratio": float(np.median(ratios)),
        "best_ratio": best,
        "median_process_cpu": cpu,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
