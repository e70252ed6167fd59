#!/usr/bin/env python
"""Benchmark p2s_dask against DIPY 1.12.1's ``patch2self`` on one phantom.

Methods (each run in its own fresh Python process):

``dipy_v3``      DIPY ``patch2self(version=3)`` (count-sketch fit, r=0)
``dipy_v1``      DIPY ``patch2self(version=1, patch_radius=0)``
``p2s_dask``     ``p2s_dask.patch2self(version=1, patch_radius=0)``
``p2s_dask_r1``  ``p2s_dask.patch2self(version=1, patch_radius=1)``

Each worker loads the cached phantom into memory, times only the denoising
call (wall clock), then reads its peak resident set size
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
    python benchmarks/bench_vs_dipy.py --shape 40 40 30 --nvols 40 --nb0 4
    python benchmarks/bench_vs_dipy.py --methods p2s_dask p2s_dask_r1 --repeat 3
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
}
# Thread-count variables of the BLAS / OpenMP runtimes the methods use.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
# DIPY's version 3 draws its sketch from NumPy's global generator; seeding it
# makes reruns reproducible (it is seeded outside the timed call).
V3_SEED = 0


# ----------------------------------------------------------------------------
# worker (runs in a fresh process per method)
# ----------------------------------------------------------------------------
def _denoiser(method):
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

    radius = 1 if method == "p2s_dask_r1" else 0

    def run(data, bvals):
        return p2s_dask.patch2self(data, bvals, version=1, patch_radius=radius,
                                   shift_intensity=False)
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
    run = _denoiser(method)
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
def cache_dir_for(a):
    shells = "-".join(f"{s:g}" for s in a.shells)
    name = (f"phantom_{a.shape[0]}x{a.shape[1]}x{a.shape[2]}x{a.nvols}"
            f"_nb0-{a.nb0}_b{shells}_snr{a.snr:g}_seed{a.seed}")
    return os.path.join(CACHE_ROOT, name)


def ensure_data(a):
    """Generate the phantom once and cache it as ``.npy`` files."""
    path = cache_dir_for(a)
    if os.path.exists(os.path.join(path, "params.json")):
        print(f"using cached phantom {os.path.relpath(path, ROOT)}", flush=True)
        return path
    from p2s_dask.testing import make_phantom

    print(f"generating phantom {tuple(a.shape) + (a.nvols,)} ...", flush=True)
    t0 = time.perf_counter()
    ph = make_phantom(shape=tuple(a.shape), nvols=a.nvols, nb0=a.nb0,
                      shells=tuple(a.shells), snr=a.snr, seed=a.seed)
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


def make_table(rows, input_rmse):
    """Markdown table of the results (also what goes into the README)."""
    base = next((r for r in rows if r["method"] == "dipy_v3"), None)
    lines = ["| method | wall s | speedup vs DIPY v3 | peak RSS MB | RMSE vs truth |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        speed = base["wall_s"] / r["wall_s"] if base else None
        lines.append(f"| {METHODS[r['method']]} | {r['wall_s']:.2f} | "
                     f"{_speed(speed)} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} | {r['rmse_vs_truth']:.3f} |")
    lines.append(f"| noisy input (no denoising) | - | - | - | {input_rmse:.3f} |")
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
                    "on the same phantom, each method in a fresh process.")
    p.add_argument("--shape", type=int, nargs=3, default=[81, 106, 76],
                   metavar=("X", "Y", "Z"), help="phantom grid (default 81 106 76)")
    p.add_argument("--nvols", type=int, default=160,
                   help="volumes incl. b0 (default 160)")
    p.add_argument("--nb0", type=int, default=10, help="b0 volumes (default 10)")
    p.add_argument("--shells", type=float, nargs="+", default=[2000.0],
                   help="DW shells (default 2000)")
    p.add_argument("--snr", type=float, default=25.0, help="phantom SNR (default 25)")
    p.add_argument("--seed", type=int, default=1, help="phantom seed (default 1)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS),
                   default=list(METHODS), help="methods to run (default all)")
    p.add_argument("--skip-dipy-v1", action="store_true",
                   help="leave out DIPY version 1 (the slowest)")
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


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        worker(a.worker, a.cache_dir, a.save or None)
        return
    methods = [m for m in METHODS if m in a.methods
               and not (a.skip_dipy_v1 and m == "dipy_v1")]
    cache = ensure_data(a)
    params = json.load(open(os.path.join(cache, "params.json")))
    clean = np.load(os.path.join(cache, "clean.npy"), mmap_mode="r")
    dwi = np.load(os.path.join(cache, "dwi.npy"), mmap_mode="r")
    mask = np.load(os.path.join(cache, "mask.npy"))
    input_rmse = _rmse_in_mask(dwi, clean, mask)
    input_mb = dwi.nbytes / 2**20
    data_range = float(dwi.max()) - float(dwi.min())
    del clean, dwi

    env = worker_env(a.threads)
    info = machine_info(a.threads)
    outdir = tempfile.mkdtemp(dir=CACHE_ROOT, prefix="outputs-")
    rows, runs = [], {}
    try:
        for m in methods:
            reps = []
            for k in range(a.repeat):
                save = os.path.join(outdir, m + ".npy") if k == a.repeat - 1 else None
                print(f"running {m} ({k + 1}/{a.repeat}) ...", flush=True)
                res = run_worker(m, cache, save, env, a.timeout)
                print(f"  {res['wall_s']:.2f} s, peak RSS "
                      f"{res['peak_rss_bytes'] / 2**20:.0f} MB, RMSE "
                      f"{res['rmse_vs_truth']:.4f}", flush=True)
                reps.append(res)
            best = min(reps, key=lambda r: r["wall_s"])
            row = dict(best)
            row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in reps)
            row["all_wall_s"] = [r["wall_s"] for r in reps]
            row["label"] = METHODS[m]
            rows.append(row)
            runs[m] = reps
        cmp = None
        if "p2s_dask" in methods and "dipy_v1" in methods:
            cmp = compare_to_dipy_v1(os.path.join(outdir, "p2s_dask.npy"),
                                     os.path.join(outdir, "dipy_v1.npy"))
    finally:
        shutil.rmtree(outdir, ignore_errors=True)

    shape = tuple(a.shape) + (a.nvols,)
    nb0 = params["nb0"]
    head = (f"Data: phantom {' x '.join(map(str, shape))} float32 ({nb0} b0 + "
            f"{a.nvols - nb0} DW at b={'/'.join(f'{s:g}' for s in a.shells)}, "
            f"SNR {a.snr:g}, seed {a.seed}); {info['cpus_available']} CPUs "
            f"({info['cpu_model']}), {info['memory_gb']} GB RAM; thread variables "
            f"{info['thread_env_note']}.")
    table = make_table(rows, input_rmse)
    notes = [
        f"Wall time of the denoising call only{' (fastest of %d runs)' % a.repeat if a.repeat > 1 else ''}; "
        "every method with shift_intensity=False.",
        f"Peak RSS = ru_maxrss of the method's own fresh process, reported as "
        f"is: it includes the loaded input ({input_mb:.0f} MB float32) and the "
        f"imported libraries (RSS just before the call: "
        f"{min(r['rss_before_call_bytes'] for r in rows) / 2**20:.0f}-"
        f"{max(r['rss_before_call_bytes'] for r in rows) / 2**20:.0f} MB).",
        "RMSE vs the noise-free ground truth, over the brain mask and all volumes.",
    ]
    notes.append("CPU time of the call (user + system, all threads): "
                 + ", ".join(f"{r['method']} {r['cpu_s']:.1f} s" for r in rows) + ".")
    loads = [(r["method"], r.get("loadavg_1min_before"), r.get("loadavg_1min_after"))
             for r in rows]
    if all(b is not None and e is not None for _, b, e in loads):
        notes.append("1-min load average just before / after each timed call "
                     "(load from other work on the machine slows the timings): "
                     + ", ".join(f"{m} {b:.2f} / {e:.2f}" for m, b, e in loads) + ".")
    if cmp is not None:
        notes.append(
            f"p2s_dask (r=0) vs DIPY v1: max |diff| = {cmp['max_abs_diff']:.4g}; "
            f"max over volumes of the per-volume spread (max - min) of the "
            f"difference = {cmp['max_per_volume_spread']:.4g} (data range "
            f"{data_range:.4g}). DIPY 1.12.1 predicts from centred features, so "
            f"it is off by one constant per volume (median |constant| = "
            f"{cmp['median_abs_per_volume_offset']:.4g}); that constant is what "
            f"makes its RMSE large.")
    report = head + "\n\n" + table + "\n\n" + "\n".join("- " + n for n in notes)
    print()
    print(report)

    result = dict(
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        data=dict(shape=list(shape), dtype="float32", nb0=nb0,
                  shells=list(a.shells), snr=a.snr, seed=a.seed,
                  mask_voxels=params.get("mask_voxels"),
                  cache=os.path.relpath(cache, ROOT), input_rmse_vs_truth=input_rmse,
                  data_range=data_range),
        machine=info, dipy_v3_global_seed=V3_SEED,
        results=rows, runs=runs, p2s_dask_vs_dipy_v1=cmp,
        table_markdown=table, notes=notes,
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
