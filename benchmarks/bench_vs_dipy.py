#!/usr/bin/env python
"""Benchmark p2s_dask against DIPY 1.12.1's ``patch2self`` on one phantom.

Methods (each run in its own fresh Python process):

``dipy_v3``          DIPY ``patch2self(version=3)`` (count-sketch fit, r=0)
``dipy_v1``          DIPY ``patch2self(version=1, patch_radius=0)``
``p2s_dask``         ``p2s_dask.patch2self(version=1, patch_radius=0)``
``p2s_dask_r1``      ``p2s_dask.patch2self(version=1, patch_radius=1)``
``p2s_dask_r1_mask`` the same, fitted on the phantom's brain mask only
                     (``mask=``; every voxel is still denoised)

Two sets of rows, each on its own phantom:

``main``  the project phantom, 81 x 106 x 76 x 160 (``--shape``, ``--nvols``,
          ...), every method;
``v300``  300 volumes (18 b0 + 282 at b=1000/2000) on a grid small enough
          for DIPY version 3 to take minutes, not the ~20 of 96 x 96 x 60
          here: 64 x 64 x 40 by default (``--shape300``; about 6 minutes if
          DIPY's time scales with the voxels): DIPY v3 against ours at r=0,
          and ours at r=1 with and without the mask (``--methods300``).

Each worker loads the cached phantom into memory, times only the denoising
call (wall clock and CPU seconds), then reads its peak resident set size
(``getrusage(RUSAGE_SELF).ru_maxrss``, taken right after the call, so it
includes the loaded input array and the imported libraries but not the
error computation) and the RMSE against the noise-free ground truth inside
the phantom's brain mask. Every method runs with ``shift_intensity=False`` so
that a per-volume constant does not bias the errors.

DIPY 1.12.1's version 1 predicts from centred features, so its output differs
from the exact regression by one constant per volume; the script reports the
max |p2s_dask - dipy_v1| and the max over volumes of the spread
(max - min) of that difference, which should be ~0 (float32 rounding).

The default data is the project phantom, 81 x 106 x 76 x 160 float32
(10 b0 + 150 at b=2000, SNR 25, seed 1), generated once with
:func:`p2s_dask.testing.make_phantom` and cached as ``.npy`` under
``benchmarks/.cache/``.

Example::

    python benchmarks/bench_vs_dipy.py                     # full benchmark
    python benchmarks/bench_vs_dipy.py --readme            # ... and the README table
    python benchmarks/bench_vs_dipy.py --quick --json /tmp/vs_dipy.json  # a check
    python benchmarks/bench_vs_dipy.py --sets main --shape 40 40 30 --nvols 40 --nb0 4
    python benchmarks/bench_vs_dipy.py --sets main --methods p2s_dask p2s_dask_r1 --repeat 3
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE_ROOT = os.path.join(HERE, ".cache")
DEFAULT_JSON = os.path.join(HERE, "results", "bench_vs_dipy.json")
README = os.path.join(ROOT, "README.md")
MARK_START = "<!-- bench_vs_dipy:start -->"
MARK_END = "<!-- bench_vs_dipy:end -->"

# Run order matters only for the table; DIPY v3 first because it is the
# baseline of the speedup column.
METHODS = {
    "dipy_v3": "DIPY 1.12.1 version=3 (r=0)",
    "dipy_v1": "DIPY 1.12.1 version=1 (r=0)",
    "p2s_dask": "p2s_dask version=1 (r=0)",
    "p2s_dask_r1": "p2s_dask version=1 (r=1)",
    "p2s_dask_r1_mask": "p2s_dask version=1 (r=1, fit on brain mask)",
}
# the 300-volume set: DIPY's version 1 would take hours there
METHODS_300 = ("dipy_v3", "p2s_dask", "p2s_dask_r1", "p2s_dask_r1_mask")
# --quick: phantoms small enough for a check of the whole script in ~2
# minutes. The 300-volume set shrinks to 48 volumes: a radius-1 fit needs more
# fitting voxels than its 27 (m - 1) features (at 300 volumes 7600, a 64^3
# grid's worth), else it is ill-posed and takes the slow per-volume solve.
QUICK = dict(main=dict(shape=[32, 32, 20], nvols=40, nb0=4),
             v300=dict(shape=[24, 24, 16], nvols=48, nb0=4))
# Thread-count variables of the BLAS / OpenMP runtimes the methods use.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# DIPY's version 3 draws its sketch from NumPy's global generator; seeding it
# makes reruns reproducible (it is seeded outside the timed call).
V3_SEED = 0


# ----------------------------------------------------------------------------
# worker (runs in a fresh process per method)
# ----------------------------------------------------------------------------
def _denoiser(method, cache_dir):
    """Return ``f(data, bvals) -> denoised`` for ``method``; imports happen here."""
    if method.startswith("dipy"):
        from dipy.denoise.patch2self import patch2self as dipy_p2s

        if method == "dipy_v3":
            def run(data, bvals):
                return dipy_p2s(data, bvals, version=3, shift_intensity=False)
        else:
            def run(data, bvals):
                return dipy_p2s(data, bvals, version=1, patch_radius=(0, 0, 0),
                                shift_intensity=False)
        return run
    import p2s_dask

    radius = 1 if method.startswith("p2s_dask_r1") else 0
    mask = None
    if method.endswith("_mask"):
        mask = np.load(os.path.join(cache_dir, "mask.npy"))

    def run(data, bvals):
        return p2s_dask.patch2self(data, bvals, version=1, patch_radius=radius,
                                   shift_intensity=False, mask=mask)
    return run


def _peak_rss_bytes():
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak if sys.platform == "darwin" else peak * 1024


def _cpu_seconds():
    """User + system CPU time of this process so far, all threads."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _vm_hwm_bytes():
    """Peak RSS of the current address space (Linux VmHWM), as a cross-check."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _rmse_in_mask(out, clean, mask, rows=20000):
    """RMSE over the mask's voxels and all volumes, accumulated in float64."""
    # Gather the mask's voxels once (whole feature rows, contiguous in the
    # (x, y, z, n) layout), then difference them a block of rows at a time.
    a = out[mask]
    b = clean[mask]
    sse = 0.0
    for i in range(0, len(a), rows):
        d = a[i:i + rows].astype(np.float64) - b[i:i + rows]
        sse += float(np.einsum("ij,ij->", d, d))
    return float(np.sqrt(sse / a.size))


def worker(method, cache_dir, save_path):
    """Time one method on the cached data and print a ``RESULT {json}`` line."""
    run = _denoiser(method, cache_dir)
    # Fully in memory (not memory-mapped): every method gets the same input.
    data = np.load(os.path.join(cache_dir, "dwi.npy"))
    bvals = np.load(os.path.join(cache_dir, "bvals.npy"))
    if method == "dipy_v3":
        np.random.seed(V3_SEED)
    rss_before = _peak_rss_bytes()
    # Other work on the machine skews wall times: keep the load on record.
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    out = run(data, bvals)
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    rss_peak = _peak_rss_bytes()
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    hwm = _vm_hwm_bytes()

    del data
    clean = np.load(os.path.join(cache_dir, "clean.npy"), mmap_mode="r")
    mask = np.load(os.path.join(cache_dir, "mask.npy"))
    rmse = _rmse_in_mask(out, clean, mask)
    if save_path:
        np.save(save_path, out)
    blas = []
    try:
        from threadpoolctl import threadpool_info

        blas = [{k: d.get(k) for k in ("internal_api", "version", "num_threads")}
                for d in threadpool_info()]
    except ImportError:
        pass
    res = dict(method=method, wall_s=wall, peak_rss_bytes=rss_peak,
               rss_before_call_bytes=rss_before, vm_hwm_bytes=hwm,
               rmse_vs_truth=rmse, cpu_s=cpu, loadavg_1min_before=load_before,
               loadavg_1min_after=load_after,
               out_dtype=str(out.dtype), threadpools=blas)
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------
def cache_dir_for(spec):
    """The cache folder of a phantom ``spec`` (shape, nvols, nb0, shells, snr, seed)."""
    shells = "-".join(f"{s:g}" for s in spec["shells"])
    shape = spec["shape"]
    name = (f"phantom_{shape[0]}x{shape[1]}x{shape[2]}x{spec['nvols']}"
            f"_nb0-{spec['nb0']}_b{shells}_snr{spec['snr']:g}_seed{spec['seed']}")
    return os.path.join(CACHE_ROOT, name)


def ensure_data(spec):
    """Generate the phantom once and cache it as ``.npy`` files."""
    path = cache_dir_for(spec)
    if os.path.exists(os.path.join(path, "params.json")):
        print(f"using cached phantom {os.path.relpath(path, ROOT)}", flush=True)
        return path
    from p2s_dask.testing import make_phantom

    print(f"generating phantom {tuple(spec['shape']) + (spec['nvols'],)} ...", flush=True)
    t0 = time.perf_counter()
    ph = make_phantom(shape=tuple(spec["shape"]), nvols=spec["nvols"], nb0=spec["nb0"],
                      shells=tuple(spec["shells"]), snr=spec["snr"], seed=spec["seed"])
    os.makedirs(CACHE_ROOT, exist_ok=True)
    # Write into a temporary folder and rename, so an interrupted run never
    # leaves a half-written cache behind.
    tmp = tempfile.mkdtemp(dir=CACHE_ROOT, prefix=".partial-")
    for key in ("dwi", "clean", "mask", "bvals", "bvecs", "affine"):
        np.save(os.path.join(tmp, key + ".npy"), ph[key])
    with open(os.path.join(tmp, "params.json"), "w") as fh:
        json.dump(ph["params"], fh, indent=1)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.rename(tmp, path)
    print(f"  done in {time.perf_counter() - t0:.1f} s -> {os.path.relpath(path, ROOT)}",
          flush=True)
    return path


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------
def worker_env(threads):
    """The same environment for every worker: thread variables set or unset."""
    env = dict(os.environ)
    for var in THREAD_VARS:
        if threads is None:
            env.pop(var, None)   # unset: each runtime uses all cores
        else:
            env[var] = str(threads)
    # The workers import p2s_dask from this checkout even if not installed.
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"]
                                if env.get("PYTHONPATH") else "")
    return env


def run_worker(method, cache_dir, save_path, env, timeout):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method,
           "--cache-dir", cache_dir, "--save", save_path or ""]
    if os.name == "posix" and os.path.exists("/bin/sh"):
        # Linux carries a process's RSS high-water mark across exec, so a
        # worker exec'd straight from this (large) process would report our
        # peak as its own ru_maxrss. A small shell in between forks the
        # worker from its own tiny address space; "; exit $?" stops the shell
        # from exec'ing the command in place.
        cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh"] + cmd
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["process_s"] = time.perf_counter() - t0
            return res
    raise RuntimeError(f"{method} worker failed (exit {proc.returncode}):\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def compare_to_dipy_v1(ours_path, dipy_path):
    """Max |ours - dipy_v1| and max per-volume spread of that difference."""
    ours = np.load(ours_path, mmap_mode="r")
    ref = np.load(dipy_path, mmap_mode="r")
    n = ours.shape[3]
    ours, ref = ours.reshape(-1, n), ref.reshape(-1, n)
    # Per-volume running max / min of the difference over blocks of voxels
    # (rows are contiguous, so each file is read once).
    hi = np.full(n, -np.inf)
    lo = np.full(n, np.inf)
    rows = 20000
    for i in range(0, len(ours), rows):
        d = ours[i:i + rows].astype(np.float64) - ref[i:i + rows]
        np.maximum(hi, d.max(axis=0), out=hi)
        np.minimum(lo, d.min(axis=0), out=lo)
    spread = hi - lo
    offset = np.abs((hi + lo) / 2)   # the per-volume constant, up to the spread
    return dict(max_abs_diff=float(np.maximum(np.abs(hi), np.abs(lo)).max()),
                max_per_volume_spread=float(spread.max()),
                median_abs_per_volume_offset=float(np.median(offset)),
                max_abs_per_volume_offset=float(offset.max()))


def machine_info(threads):
    import dask
    import scipy

    info = dict(
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        platform=platform.platform(), python=platform.python_version(),
        cpu_count=os.cpu_count(),
        cpus_available=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        cpu_model=None, memory_gb=None,
        numpy=np.__version__, scipy=scipy.__version__, dask=dask.__version__,
    )
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    for mod in ("dipy", "sklearn", "p2s_dask"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # the layout of show_config varies across versions
        info["numpy_blas"] = None
    info["thread_env"] = ({v: None for v in THREAD_VARS} if threads is None
                          else {v: str(threads) for v in THREAD_VARS})
    info["thread_env_note"] = ("unset for every method: each runtime uses all cores"
                               if threads is None else
                               f"set to {threads} for every method")
    return info


def _speed(x):
    if x is None:
        return "-"
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def _shape_text(shape):
    return "x".join(map(str, shape))


def make_table(sets):
    """Markdown table of the results (also what goes into the README).

    ``sets``: ``[(name, data, rows)]``; each set's rows are compared with
    its own DIPY v3 row.
    """
    lines = ["| data | method | wall s | CPU s | speedup vs DIPY v3 | peak RSS MB | "
             "RMSE vs truth |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for _, data, rows in sets:
        shape = _shape_text(data["shape"])
        base = next((r for r in rows if r["method"] == "dipy_v3"), None)
        for r in rows:
            speed = base["wall_s"] / r["wall_s"] if base else None
            lines.append(f"| {shape} | {METHODS[r['method']]} | {r['wall_s']:.2f} | "
                         f"{r['cpu_s']:.1f} | {_speed(speed)} | "
                         f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['rmse_vs_truth']:.3f} |")
        lines.append(f"| {shape} | noisy input (no denoising) | - | - | - | - | "
                     f"{data['input_rmse_vs_truth']:.3f} |")
    return "\n".join(lines)


def update_readme(text):
    if not os.path.exists(README):
        print(f"--readme: {README} not found; nothing written")
        return False
    with open(README) as fh:
        content = fh.read()
    i, j = content.find(MARK_START), content.find(MARK_END)
    if i < 0 or j < i:
        print(f"--readme: markers {MARK_START} / {MARK_END} not in README.md; "
              "nothing written")
        return False
    new = content[:i + len(MARK_START)] + "\n" + text.strip() + "\n" + content[j:]
    with open(README, "w") as fh:
        fh.write(new)
    print("README.md benchmark section updated")
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time DIPY 1.12.1 patch2self (version 3 and 1) and p2s_dask "
                    "on the same phantoms, each method in a fresh process.")
    p.add_argument("--sets", nargs="+", choices=("main", "v300"), default=["main", "v300"],
                   help="row sets to run (default both)")
    p.add_argument("--shape", type=int, nargs=3, default=[81, 106, 76],
                   metavar=("X", "Y", "Z"), help="main phantom grid (default 81 106 76)")
    p.add_argument("--nvols", type=int, default=160,
                   help="main phantom: volumes incl. b0 (default 160)")
    p.add_argument("--nb0", type=int, default=10, help="main phantom: b0 volumes (default 10)")
    p.add_argument("--shells", type=float, nargs="+", default=[2000.0],
                   help="main phantom: DW shells (default 2000)")
    p.add_argument("--shape300", type=int, nargs=3, default=[64, 64, 40],
                   metavar=("X", "Y", "Z"),
                   help="300-volume phantom grid (default 64 64 40: DIPY v3 takes minutes; "
                        "~20 at 96 96 60)")
    p.add_argument("--nvols300", type=int, default=300,
                   help="300-volume phantom: volumes incl. b0 (default 300)")
    p.add_argument("--nb0-300", type=int, default=18,
                   help="300-volume phantom: b0 volumes (default 18)")
    p.add_argument("--shells300", type=float, nargs="+", default=[1000.0, 2000.0],
                   help="300-volume phantom: DW shells (default 1000 2000)")
    p.add_argument("--snr", type=float, default=25.0, help="phantom SNR (default 25)")
    p.add_argument("--seed", type=int, default=1, help="phantom seed (default 1)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS),
                   default=list(METHODS), help="methods of the main set (default all)")
    p.add_argument("--methods300", nargs="+", choices=list(METHODS),
                   default=list(METHODS_300),
                   help=f"methods of the 300-volume set (default {' '.join(METHODS_300)})")
    p.add_argument("--skip-dipy-v1", action="store_true",
                   help="leave out DIPY version 1 (the slowest)")
    quick = ", ".join(f"{name} {_shape_text(q['shape'] + [q['nvols']])}"
                      for name, q in QUICK.items())
    p.add_argument("--quick", action="store_true",
                   help=f"tiny phantoms ({quick}) to check the script in about two "
                        "minutes; the timings mean nothing")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per method, each in a fresh process; the table "
                        "shows the fastest (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="set OMP/OPENBLAS/MKL/... thread variables to this for "
                        "every method (default: unset, all cores)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds allowed per worker process (default none)")
    p.add_argument("--json", default=DEFAULT_JSON,
                   help="where to write the results (default "
                        "benchmarks/results/bench_vs_dipy.json)")
    p.add_argument("--readme", action="store_true",
                   help=f"rewrite the README.md section between {MARK_START} "
                        f"and {MARK_END}")
    # internal: worker mode
    p.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def set_specs(a):
    """``{name: (phantom spec, methods)}`` of the sets to run."""
    specs = {
        "main": (dict(shape=list(a.shape), nvols=a.nvols, nb0=a.nb0, shells=list(a.shells),
                      snr=a.snr, seed=a.seed), list(a.methods)),
        "v300": (dict(shape=list(a.shape300), nvols=a.nvols300, nb0=a.nb0_300,
                      shells=list(a.shells300), snr=a.snr, seed=a.seed), list(a.methods300)),
    }
    if a.quick:
        for name, change in QUICK.items():
            specs[name][0].update(change)
    out = {}
    for name in a.sets:
        spec, methods = specs[name]
        # the order of METHODS: DIPY v3, the baseline, first
        out[name] = (spec, [m for m in METHODS if m in methods
                            and not (a.skip_dipy_v1 and m == "dipy_v1")])
    return out


def describe_data(spec, cache):
    """What the table and the JSON say about one phantom."""
    params = json.load(open(os.path.join(cache, "params.json")))
    clean = np.load(os.path.join(cache, "clean.npy"), mmap_mode="r")
    dwi = np.load(os.path.join(cache, "dwi.npy"), mmap_mode="r")
    mask = np.load(os.path.join(cache, "mask.npy"))
    data = dict(shape=list(spec["shape"]) + [spec["nvols"]], dtype="float32",
                nb0=params["nb0"], shells=list(spec["shells"]), snr=spec["snr"],
                seed=spec["seed"], mask_voxels=int(np.count_nonzero(mask)),
                cache=os.path.relpath(cache, ROOT),
                input_rmse_vs_truth=_rmse_in_mask(dwi, clean, mask),
                data_range=float(dwi.max()) - float(dwi.min()),
                input_mb=dwi.nbytes / 2**20)
    return data


def run_methods(name, methods, cache, env, a, outdir):
    """Every method of one set, ``a.repeat`` times each: the table's rows
    (fastest run of each) and all runs."""
    rows, runs = [], {}
    for m in methods:
        reps = []
        for k in range(a.repeat):
            save = os.path.join(outdir, f"{name}-{m}.npy") if k == a.repeat - 1 else None
            print(f"running {name}: {m} ({k + 1}/{a.repeat}) ...", flush=True)
            res = run_worker(m, cache, save, env, a.timeout)
            print(f"  {res['wall_s']:.2f} s, {res['cpu_s']:.1f} CPU s, peak RSS "
                  f"{res['peak_rss_bytes'] / 2**20:.0f} MB, RMSE "
                  f"{res['rmse_vs_truth']:.4f}", flush=True)
            reps.append(res)
        best = min(reps, key=lambda r: r["wall_s"])
        row = dict(best)
        row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in reps)
        row["all_wall_s"] = [r["wall_s"] for r in reps]
        row["label"] = METHODS[m]
        row["set"] = name
        rows.append(row)
        runs[f"{name}/{m}"] = reps
    return rows, runs


def data_line(data):
    nb0, n = data["nb0"], data["shape"][3]
    return (f"phantom {' x '.join(map(str, data['shape']))} float32 ({nb0} b0 + "
            f"{n - nb0} DW at b={'/'.join(f'{s:g}' for s in data['shells'])}, "
            f"SNR {data['snr']:g}, seed {data['seed']}, brain mask "
            f"{data['mask_voxels']} voxels)")


def make_notes(sets, cmp, repeat):
    rows = [r for _, _, set_rows in sets for r in set_rows]
    inputs = ", ".join(f"{_shape_text(d['shape'])} {d['input_mb']:.0f} MB" for _, d, _ in sets)
    notes = [
        f"Wall and CPU time (user + system, all threads) of the denoising call only"
        f"{' (fastest of %d runs)' % repeat if repeat > 1 else ''}; every method with "
        "shift_intensity=False. Speedups are against DIPY v3 on the same phantom.",
        f"Peak RSS = ru_maxrss of the method's own fresh process, reported as "
        f"is: it includes the loaded input ({inputs} float32) and the "
        f"imported libraries (RSS just before the call: "
        f"{min(r['rss_before_call_bytes'] for r in rows) / 2**20:.0f}-"
        f"{max(r['rss_before_call_bytes'] for r in rows) / 2**20:.0f} MB).",
        "RMSE vs the noise-free ground truth, over the brain mask and all volumes. "
        "'fit on brain mask': the regressions are fitted on the mask's voxels only, "
        "every voxel is denoised.",
    ]
    loads = [(f"{r['set']}/{r['method']}", r.get("loadavg_1min_before"),
              r.get("loadavg_1min_after")) for r in rows]
    if all(b is not None and e is not None for _, b, e in loads):
        notes.append("1-min load average just before / after each timed call "
                     "(load from other work on the machine slows the timings): "
                     + ", ".join(f"{m} {b:.2f} / {e:.2f}" for m, b, e in loads) + ".")
    if cmp is not None:
        data_range = next(d["data_range"] for name, d, _ in sets if name == "main")
        notes.append(
            f"p2s_dask (r=0) vs DIPY v1: max |diff| = {cmp['max_abs_diff']:.4g}; "
            f"max over volumes of the per-volume spread (max - min) of the "
            f"difference = {cmp['max_per_volume_spread']:.4g} (data range "
            f"{data_range:.4g}). DIPY 1.12.1 predicts from centred features, so "
            f"it is off by one constant per volume (median |constant| = "
            f"{cmp['median_abs_per_volume_offset']:.4g}); that constant is what "
            f"makes its RMSE large.")
    return notes


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        worker(a.worker, a.cache_dir, a.save or None)
        return
    specs = set_specs(a)
    caches = {name: ensure_data(spec) for name, (spec, _) in specs.items()}
    datas = {name: describe_data(specs[name][0], cache) for name, cache in caches.items()}

    env = worker_env(a.threads)
    info = machine_info(a.threads)
    os.makedirs(CACHE_ROOT, exist_ok=True)
    outdir = tempfile.mkdtemp(dir=CACHE_ROOT, prefix="outputs-")
    sets, runs, cmp = [], {}, None
    try:
        for name, (spec, methods) in specs.items():
            rows, set_runs = run_methods(name, methods, caches[name], env, a, outdir)
            sets.append((name, datas[name], rows))
            runs.update(set_runs)
        if "main" in specs and {"p2s_dask", "dipy_v1"} <= set(specs["main"][1]):
            cmp = compare_to_dipy_v1(os.path.join(outdir, "main-p2s_dask.npy"),
                                     os.path.join(outdir, "main-dipy_v1.npy"))
    finally:
        shutil.rmtree(outdir, ignore_errors=True)

    head = ("Data: " + "; ".join(data_line(d) for _, d, _ in sets) +
            f". {info['cpus_available']} CPUs ({info['cpu_model']}), {info['memory_gb']} GB "
            f"RAM; thread variables {info['thread_env_note']}.")
    table = make_table(sets)
    notes = make_notes(sets, cmp, a.repeat)
    report = head + "\n\n" + table + "\n\n" + "\n".join("- " + n for n in notes)
    print()
    print(report)

    result = dict(
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        # the main set's phantom (as before the 300-volume set was added)
        data=datas.get("main"), sets=datas,
        machine=info, dipy_v3_global_seed=V3_SEED,
        results=[r for _, _, rows in sets for r in rows], runs=runs,
        p2s_dask_vs_dipy_v1=cmp, table_markdown=table, notes=notes,
    )
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"\nresults written to {a.json}")
    if a.readme:
        update_readme(report)


if __name__ == "__main__":
    main()
