"""Statistics of patch features (r > 0): direct scatter vs lag products.

Times :func:`p2s_dask.core.stats.block_stats` (the direct ``(27 m)^2``
scatter by rank-k updates) against :func:`p2s_dask.core.lagstats.lag_block_stats`
(lagged cross products) on blocks like the engine's statistics pass: the full
81 x 106 plane of a 81 x 106 x 76 acquisition, ``nz`` planes thick, with a
halo of ``r`` voxels (zeros beyond the image in x and y, neighbouring planes
in z), 160 volumes, float32 and int16, with and without a brain-like mask.
One BLAS thread, as the engine runs one per Dask thread.

Both CPU time (``time.process_time``, the number to compare on a shared
machine) and wall time are recorded; each lag timing is the best of
``--repeat`` runs, the direct one the best of ``--direct-repeat``. Every pair
of results is checked to agree (max |S_lag - S_direct| / max |S_direct|).

Usage::

    python benchmarks/bench_lagstats.py \
        --json benchmarks/results/bench_lagstats.json
    python benchmarks/bench_lagstats.py --nz 3 --dtypes float32 --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from p2s_dask.core.lagstats import lag_block_stats
from p2s_dask.core.stats import block_stats

IMAGE = (81, 106, 76)


def brain_mask(shape=IMAGE):
    """A folded ellipsoid filling about a third of the field of view."""
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r2 = (x / 0.78) ** 2 + (y / 0.84) ** 2 + ((z + 0.1) / 0.72) ** 2
    folds = 1 + 0.06 * np.sin(9 * x) * np.cos(7 * y) * np.cos(5 * z)
    return r2 < folds ** 2


def acquisition(z0, z1, radius, volumes, dtype, seed=0):
    """Planes ``[z0 - r, z1 + r)`` of a synthetic DWI with its x/y halo of
    zeros, shape ``(81 + 2 r, 106 + 2 r, z1 - z0 + 2 r, volumes)``."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = IMAGE
    zs = np.arange(z0 - radius[2], z1 + radius[2])
    x, y, z = np.meshgrid(np.linspace(-1, 1, nx), np.linspace(-1, 1, ny),
                          np.linspace(-1, 1, nz)[np.clip(zs, 0, nz - 1)], indexing="ij")
    inside = brain_mask()[:, :, np.clip(zs, 0, nz - 1)]
    s0 = np.where(inside, 900 + 250 * np.cos(3 * x) * np.sin(2 * y + z), 40.0)
    diffusivity = 0.7e-3 + 0.4e-3 * (np.sin(4 * x + 3 * z) > 0)
    index = np.arange(volumes)
    bvals = np.where(index % 16 == 0, 0.0, 1000.0 + 1000.0 * (index % 2))
    spread = rng.uniform(0.6, 1.4, volumes)
    signal = s0[..., None] * np.exp(-bvals * spread * diffusivity[..., None])
    signal += rng.normal(0, 25, signal.shape)
    outside = (zs < 0) | (zs >= nz)
    signal[:, :, outside] = 0  # zero padding beyond the image in z
    if np.dtype(dtype).kind == "i":
        signal = np.clip(np.rint(signal), -32768, 32767)
    block = np.zeros((nx + 2 * radius[0], ny + 2 * radius[1]) + signal.shape[2:], dtype=dtype)
    block[radius[0]:radius[0] + nx, radius[1]:radius[1] + ny] = signal
    return block


def timed(fn, repeat):
    """Best CPU and wall seconds of ``repeat`` calls, and the last result."""
    cpu = wall = math.inf
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        out = fn()
        cpu = min(cpu, time.process_time() - c)
        wall = min(wall, time.perf_counter() - w)
    return cpu, wall, out


def machine():
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "blas": blas}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nz", type=int, nargs="+", default=[12, 3],
                    help="block thickness in planes (12: the issue's block; 3: the chunk "
                         "the in-memory API picks for 81x106x76x160 at r=1)")
    ap.add_argument("--volumes", type=int, default=160)
    ap.add_argument("--small-volumes", type=int, default=10,
                    help="also time a small group (a b0 group); 0 to skip")
    ap.add_argument("--radius", type=int, nargs=3, default=[1, 1, 1])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "int16"])
    ap.add_argument("--masks", nargs="+", default=["none", "brain"])
    ap.add_argument("--repeat", type=int, default=2, help="lag runs per case (best)")
    ap.add_argument("--direct-repeat", type=int, default=1, help="direct runs per case (best)")
    ap.add_argument("--quick", action="store_true", help="skip the int16 and small-group rows")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    radius = tuple(args.radius)
    dtypes = args.dtypes[:1] if args.quick else args.dtypes
    groups = [args.volumes] + ([args.small_volumes] if args.small_volumes and not args.quick
                               else [])
    mask_all = brain_mask()
    rows = []
    load_before = os.getloadavg()
    started = time.time()
    header = (f"{'block (interior)':>20} {'vols':>4} {'dtype':>7} {'mask':>5} {'voxels':>7} "
              f"{'direct cpu':>10} {'lag cpu':>8} {'speedup':>7} {'direct wall':>11} "
              f"{'lag wall':>8} {'max rel diff':>12}")
    print(header, flush=True)
    with threadpool_limits(limits=1, user_api="blas"):
        for nz in args.nz:
            z0 = (IMAGE[2] - nz) // 2  # an interior slab: the z-halo holds neighbours
            for m in groups:
                for dtype in dtypes:
                    block = acquisition(z0, z0 + nz, radius, m, dtype)
                    for mask_kind in args.masks:
                        mask = None if mask_kind == "none" else mask_all[:, :, z0:z0 + nz]
                        d_cpu, d_wall, want = timed(lambda: block_stats(block, radius, mask),
                                                    args.direct_repeat)
                        l_cpu, l_wall, got = timed(lambda: lag_block_stats(block, radius, mask),
                                                   args.repeat)
                        assert got.count == want.count
                        diff = float(np.abs(got.scatter - want.scatter).max()
                                     / np.abs(want.scatter).max())
                        mdiff = float(np.abs(got.mean - want.mean).max()
                                      / np.abs(want.mean).max())
                        row = dict(interior=[IMAGE[0], IMAGE[1], nz], radius=list(radius),
                                   volumes=m, dtype=dtype, mask=mask_kind, voxels=want.count,
                                   direct_cpu_s=round(d_cpu, 3), lag_cpu_s=round(l_cpu, 3),
                                   speedup_cpu=round(d_cpu / l_cpu, 2),
                                   direct_wall_s=round(d_wall, 3), lag_wall_s=round(l_wall, 3),
                                   speedup_wall=round(d_wall / l_wall, 2),
                                   lag_us_per_voxel=round(1e6 * l_cpu / want.count, 1),
                                   max_rel_diff_scatter=diff, max_rel_diff_mean=mdiff,
                                   pass_blocks=math.ceil(IMAGE[2] / nz))
                        rows.append(row)
                        print(f"{'x'.join(map(str, row['interior'])):>20} {m:>4} {dtype:>7} "
                              f"{mask_kind:>5} {want.count:>7} {d_cpu:>10.2f} {l_cpu:>8.2f} "
                              f"{d_cpu / l_cpu:>6.2f}x {d_wall:>11.2f} {l_wall:>8.2f} "
                              f"{diff:>12.1e}", flush=True)
                        del want, got
    # the statistics pass of the whole image in blocks of the same thickness,
    # for the main group (a small group's share is tiny either way)
    passes = []
    for row in rows:
        if row["volumes"] != args.volumes:
            continue
        blocks = row["pass_blocks"]
        passes.append(dict(chunk_nz=row["interior"][2], blocks=blocks, volumes=row["volumes"],
                           dtype=row["dtype"], mask=row["mask"],
                           direct_cpu_s=round(blocks * row["direct_cpu_s"], 1),
                           lag_cpu_s=round(blocks * row["lag_cpu_s"], 1),
                           speedup=row["speedup_cpu"]))
    print(f"\nstatistics pass of {'x'.join(map(str, IMAGE))}x{args.volumes}, one group, one "
          "thread (estimate: blocks x block CPU time)")
    for p in passes:
        print(f"  z-chunks of {p['chunk_nz']:>2} ({p['blocks']:>2} blocks) {p['dtype']:>7} "
              f"mask={p['mask']:<5}: direct {p['direct_cpu_s']:>6.1f} s, "
              f"lag {p['lag_cpu_s']:>5.1f} s -> {p['speedup']:.2f}x")
    result = dict(command="python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:])),
                  machine=machine(), load_average_before=load_before,
                  load_average_after=os.getloadavg(), seconds=round(time.time() - started, 1),
                  timing_blas_threads=1,
                  notes=("CPU seconds (process_time) of one call with one BLAS thread; lag "
                         "best of --repeat, direct best of --direct-repeat. The machine is "
                         "shared: wall times vary with its load, CPU times much less."),
                  rows=rows, statistics_pass=passes)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
