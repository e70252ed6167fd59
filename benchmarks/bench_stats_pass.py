#!/usr/bin/env python
"""The statistics pass of ``patch_radius=1``: lagged products against the
direct scatter, and the whole call, on the project phantom.

Two modes, each case in a fresh Python process (so each peak RSS is its
own: the worker's ``VmHWM`` right after the timed work, which includes the
loaded input array, and the peak RSS of its process tree sampled every 50
ms), all in one run of this script so that the machine's load is the same
for every case:

``--mode stats`` (default), on the 81 x 106 x 76 x 160 phantom of
``bench_vs_dipy.py`` (10 b0 + 150 at b=2000, float32):

- ``stats_direct``: the whole statistics pass (every block, on the threads
  the in-memory API uses, one BLAS thread per task) with the direct
  ``(27 m)^2`` scatter, at the chunks the chunk policy picked before lagged
  products (the policy of ``patch_radius=0``: 3 planes here on 2 cores);
- ``stats_lag``: the same pass with lagged products at the chunks the policy
  picks now for ``patch_radius=1``;
- ``call_lag``: the whole ``p2s_dask.patch2self(patch_radius=1)`` call as it
  runs now; ``call_direct`` (unless ``--quick``): the call with the direct
  statistics at the old chunks, i.e. as it ran before lagged products.

Both passes' statistics are checked to agree (max |difference| over the
largest entry, per group, mean and scatter, within 1e-9).

``--mode cli``: ``p2s-dask denoise`` of the phantom written as a ``.nii``
(``--dtype``), radius 1, ``--memory-limit`` (default 2GiB), in a fresh
process: stage times, wall and the peak RSS of the process tree.

``--mode call``: only the whole call, e.g. on a 300-volume phantom
(``--shape 96 96 60 --nvols 300 --nb0 20 --shells 1000 2000``), its wall
and CPU time and the peak RSS against ``--budget`` (2 GiB, the command
line's default ``--memory-limit``); ``--dtype int16`` rounds the phantom to
scanner integers first.

The calls run as ``bench_vs_dipy.py`` runs them (``version=1``,
``shift_intensity=False``). CPU seconds (``time.process_time`` of the
worker, all threads) are the numbers to compare on a shared machine; wall
seconds follow its load.

Usage::

    python benchmarks/bench_stats_pass.py
    python benchmarks/bench_stats_pass.py --mode call --shape 96 96 60 --nvols 300 \\
        --nb0 20 --shells 1000 2000 --dtype int16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_JSON = os.path.join(HERE, "results", "bench_stats_pass.json")
RADIUS = (1, 1, 1)
TOL = 1e-9
GiB = 1 << 30


# ----------------------------------------------------------------------------
# worker (a fresh process per case)
# ----------------------------------------------------------------------------
def _peak_rss() -> int:
    """This process's peak RSS (Linux ``VmHWM``: reset by ``exec``, unlike
    ``ru_maxrss``, which a child starts from its parent's)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    import psutil
    return psutil.Process().memory_info().rss


def _load(cache, dtype):
    data = np.load(os.path.join(cache, "dwi.npy"))
    if dtype == "int16":
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    return data, np.load(os.path.join(cache, "bvals.npy"))


def stats_pass(data, bvals, chunks, method):
    """The statistics pass as the in-memory API runs it: its chunks, its
    scheduler (threads on every core), one BLAS thread per task."""
    from p2s_dask.graph import engine
    from p2s_dask.run import inmemory
    from p2s_dask.run.executors import current_executor
    from p2s_dask.config.groups import make_groups
    from p2s_dask.run.threads import single_threaded_blas

    groups = make_groups(bvals, data.shape[3])
    with single_threaded_blas():
        stats_chunks = engine.as_chunked(data, chunks, RADIUS).chunks
        executor = current_executor()
        with executor.blocks_of(data, stats_chunks, inmemory.block_order(data)) as blocks:
            graph = engine.summarize(blocks.array(stats_chunks), groups, RADIUS, None,
                                     check_finite=False, method=method)
            summary = executor.compute(graph)
    return summary, [tuple(max(c) for c in stats_chunks[:3]), len(groups)]


def whole_call(data, bvals, chunks, method):
    import p2s_dask
    from p2s_dask.graph import engine

    with engine.statistics_method(method):
        return p2s_dask.patch2self(data, bvals, patch_radius=RADIUS, version=1,
                                   shift_intensity=False, chunks=chunks)


def worker(args):
    """Time one case; print ``RESULT {json}``."""
    data, bvals = _load(args.cache_dir, args.dtype)
    chunks = tuple(args.chunks) if args.chunks else None
    rss_before = _rss_now()
    load = os.getloadavg()[0]
    cpu, wall = time.process_time(), time.perf_counter()
    if args.worker == "stats":
        summary, info = stats_pass(data, bvals, chunks, args.method)
    else:
        out = whole_call(data, bvals, chunks, args.method)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    res = dict(wall_s=wall, cpu_s=cpu, peak_rss_bytes=_peak_rss(),
               rss_before_bytes=rss_before, input_bytes=data.nbytes,
               loadavg_1min_before=load, loadavg_1min_after=os.getloadavg()[0])
    if args.worker == "stats":
        res.update(chunks=list(info[0]), groups=info[1])
        if args.save:
            arrays = {}
            for i, st in enumerate(summary.stats):
                if st is not None:
                    arrays.update({f"count{i}": st.count, f"mean{i}": st.mean,
                                   f"scatter{i}": st.scatter})
            np.savez(args.save, **arrays)
    else:
        res.update(out_dtype=str(out.dtype), output_bytes=out.nbytes)
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------
def old_chunks(shape):
    """The chunks of ``patch_radius=1`` before lagged products: the policy's
    chunks of ``patch_radius=0``, made as thick as the radius."""
    from p2s_dask.graph.engine import in_memory_sizes
    return [max(c, r) for c, r in zip(in_memory_sizes(shape)[0][:3], RADIUS)]


def new_chunks(shape):
    from p2s_dask.graph.engine import in_memory_sizes
    return list(in_memory_sizes(shape, RADIUS)[0][:3])


def run_case(args, cache, kind, method, chunks, save=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--method", method,
           "--cache-dir", cache, "--dtype", args.dtype]
    if chunks:
        cmd += ["--chunks", *map(str, chunks)]
    if save:
        cmd += ["--save", save]
    print(f"  {kind} {method} chunks={chunks} ...", flush=True)
    from p2s_dask.run.memory import PeakMemory
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        with PeakMemory(proc.pid, interval=0.05) as tree:  # the whole process tree
            proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(stdout + stderr)
        raise SystemExit(f"{kind} {method} failed")
    res = json.loads(lines[-1][len("RESULT "):])
    res.update(case=f"{kind}_{method}", method=method, requested_chunks=chunks,
               tree_peak_rss_bytes=tree.peak)
    print(f"    wall {res['wall_s']:.1f} s, cpu {res['cpu_s']:.1f} s, "
          f"peak {res['peak_rss_bytes'] / GiB:.2f} GiB (tree {tree.peak / GiB:.2f})",
          flush=True)
    return res


def compare(path_a, path_b):
    """Max relative difference of the means and scatters of two saved passes."""
    a, b = np.load(path_a), np.load(path_b)
    worst = {"mean": 0.0, "scatter": 0.0}
    for key in a.files:
        if key.startswith("count"):
            assert int(a[key]) == int(b[key]), key
            continue
        name = "mean" if key.startswith("mean") else "scatter"
        scale = np.abs(a[key]).max()
        worst[name] = max(worst[name], float(np.abs(a[key] - b[key]).max() / scale))
    return worst


def stats_mode(args, cache, shape):
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        direct_npz, lag_npz = os.path.join(tmp, "direct.npz"), os.path.join(tmp, "lag.npz")
        cases.append(run_case(args, cache, "stats", "direct", old_chunks(shape), direct_npz))
        cases.append(run_case(args, cache, "stats", "auto", new_chunks(shape), lag_npz))
        diff = compare(direct_npz, lag_npz)
    cases.append(run_case(args, cache, "call", "auto", None))
    if not args.quick:
        cases.append(run_case(args, cache, "call", "direct", old_chunks(shape)))
    direct, lag = cases[0], cases[1]
    summary = dict(
        stats_speedup_wall=direct["wall_s"] / lag["wall_s"],
        stats_speedup_cpu=direct["cpu_s"] / lag["cpu_s"],
        max_rel_diff=diff, agree=max(diff.values()) <= TOL,
        call_speedup_vs_190s=args.baseline_call_s / cases[2]["wall_s"])
    if not args.quick:
        summary.update(call_speedup_wall=cases[3]["wall_s"] / cases[2]["wall_s"],
                       call_speedup_cpu=cases[3]["cpu_s"] / cases[2]["cpu_s"])
    return cases, summary


def call_mode(args, cache, shape):
    case = run_case(args, cache, "call", "auto", None)
    peak = max(case["peak_rss_bytes"], case["tree_peak_rss_bytes"])
    return [case], dict(budget_bytes=args.budget, peak_bytes=peak,
                        within_budget=peak <= args.budget, chunks=new_chunks(shape))


def cli_mode(args, cache, shape):
    """``p2s-dask denoise IN.nii OUT.nii --patch-radius 1 --ver 1`` with the
    default budget, in a fresh process, page cache dropped (floors.run_cli)."""
    import nibabel as nib
    from floors import run_cli
    data, bvals = _load(cache, args.dtype)
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
        src, out = os.path.join(tmp, "dwi.nii"), os.path.join(tmp, "den.nii")
        affine = np.load(os.path.join(cache, "affine.npy"))
        nib.save(nib.Nifti1Image(data, affine), src)
        np.savetxt(os.path.join(tmp, "dwi.bval"), bvals[None], fmt="%g")
        del data
        got = run_cli(src, out, args.memory_limit,
                      extra=["--patch-radius", args.radius, "--ver", "1"])
        floors = _cli_floors(args, got, src, out, tmp, bvals)
    budget = _parse_bytes(args.memory_limit)
    case = dict(case=f"cli radius {args.radius}", wall_s=got["wall_s"], stages=got["stages"],
                chunks=got["plan"]["chunks"], peak_rss_bytes=got["peak_rss_tree"],
                command=got["command"], cross_validation=got.get("cross_validation"),
                keep_predictions=got["plan"].get("keep_predictions"), **floors)
    return [case], dict(budget_bytes=budget, peak_bytes=got["peak_rss_tree"],
                        within_budget=got["peak_rss_tree"] <= budget)


def _cli_floors(args, got, src, out, tmp, bvals) -> dict:
    """The run's compute floor (its own BLAS calls on its threads, one
    prediction pass where the minima pass kept its predictions) and the
    I/O floor of its input (read once, as many bytes written), measured now;
    none for ``--radius auto`` (its radius is the run's choice)."""
    from floors import floor_of_run, io_floor
    if args.radius == "auto":
        return {}
    print("measuring the floors ...", flush=True)
    compute = floor_of_run(got, out, bvals, integer=args.dtype == "int16", max_seconds=None)
    io = io_floor(Path(src), Path(tmp) / "io_floor.bin")
    return dict(compute_floor=compute, io_floor=io)


def _parse_bytes(text):
    from dask.utils import parse_bytes
    return int(parse_bytes(text))


def print_cli(cases, summary):
    c = cases[0]
    print("\nstage        seconds")
    for name, secs in c["stages"].items():
        print(f"{name:<12} {secs:>8.1f}")
    print(f"{'whole':<12} {c['wall_s']:>8.1f}  (process start included)")
    if c.get("cross_validation"):
        print(f"cross-validation chose: {c['cross_validation'].get('setting')}")
    if c.get("compute_floor"):
        floor, io = c["compute_floor"], c["io_floor"]["floor_s"]
        stats = floor["statistics"]["seconds"]
        pred = floor["prediction"]["seconds"]
        print(f"compute floor: statistics {stats:.1f} s + {floor['prediction_passes']} x "
              f"prediction {pred:.1f} s on {floor['threads']} threads; I/O floor {io:.1f} s")
        print(f"statistics / their floor            {c['stages']['statistics'] / stats:.2f}"
              "  (target <= 1.2)")
        print(f"whole / (compute + I/O floor)       "
              f"{c['wall_s'] / (floor['seconds'] + io):.2f}  (target <= 1.25)")
    print(f"chunks {'x'.join(map(str, c['chunks']))}, peak RSS of the process tree "
          f"{c['peak_rss_bytes'] / GiB:.2f} GiB (budget {summary['budget_bytes'] / GiB:.2f})")


def print_table(cases, summary):
    print(f"\n{'case':<13} {'chunks':>14} {'wall s':>8} {'cpu s':>8} {'peak GiB':>9} "
          f"{'before GiB':>10}")
    for c in cases:
        chunks = "x".join(map(str, c.get("chunks") or c["requested_chunks"] or ["auto"]))
        print(f"{c['case']:<13} {chunks:>14} {c['wall_s']:>8.1f} {c['cpu_s']:>8.1f} "
              f"{c['peak_rss_bytes'] / GiB:>9.2f} {c['rss_before_bytes'] / GiB:>10.2f}")
    for key, value in summary.items():
        print(f"  {key}: {value:.3g}" if isinstance(value, float) else f"  {key}: {value}")


def machine():
    from threadpoolctl import threadpool_info
    blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")}
            for i in threadpool_info() if i.get("user_api") == "blas"]
    return {"cores": os.cpu_count(), "numpy": np.__version__, "blas": blas}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["stats", "call", "cli"], default="stats")
    p.add_argument("--radius", choices=["1", "auto"], default="1",
                   help="cli mode: --patch-radius (auto: chosen by cross-validation, "
                        "radius 0 or 1)")
    p.add_argument("--memory-limit", default="2GiB", help="cli mode: --memory-limit")
    p.add_argument("--tmp-dir", help="cli mode: where the .nii files go (default $TMPDIR)")
    p.add_argument("--shape", type=int, nargs=3, default=[81, 106, 76])
    p.add_argument("--nvols", type=int, default=160)
    p.add_argument("--nb0", type=int, default=10)
    p.add_argument("--shells", type=float, nargs="+", default=[2000.0])
    p.add_argument("--snr", type=float, default=25.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "int16"], default="float32")
    p.add_argument("--quick", action="store_true",
                   help="stats mode: leave out the whole call with the direct statistics")
    p.add_argument("--baseline-call-s", type=float, default=190.5,
                   help="the whole call's wall seconds before lagged products "
                        "(bench_vs_dipy.json, p2s_dask r=1)")
    p.add_argument("--budget", type=int, default=2 * GiB, help="call mode: bytes")
    p.add_argument("--json", default=DEFAULT_JSON)
    # internal: worker mode
    p.add_argument("--worker", choices=["stats", "call"], help=argparse.SUPPRESS)
    p.add_argument("--method", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--chunks", type=int, nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, HERE)
    from bench_vs_dipy import ensure_data  # the phantom and its cache
    cache = ensure_data({k: getattr(args, k)
                         for k in ("shape", "nvols", "nb0", "shells", "snr", "seed")})
    shape = tuple(args.shape) + (args.nvols,)
    started = time.time()
    modes = {"stats": stats_mode, "call": call_mode, "cli": cli_mode}
    cases, summary = modes[args.mode](args, cache, shape)
    (print_cli if args.mode == "cli" else print_table)(cases, summary)
    key = f"{args.mode}_{'x'.join(map(str, shape))}_{args.dtype}"
    result = dict(command="python benchmarks/bench_stats_pass.py " + " ".join(
        sys.argv[1:] if argv is None else argv), data=dict(
        shape=list(shape), nb0=args.nb0, shells=args.shells, dtype=args.dtype,
        cache=os.path.relpath(cache, ROOT)), radius=list(RADIUS), machine=machine(),
        seconds=round(time.time() - started, 1), cases=cases, summary=summary)
    everything = {}
    if os.path.exists(args.json):
        with open(args.json) as fh:
            everything = json.load(fh)
    everything[key] = result
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(everything, fh, indent=1)
        fh.write("\n")
    print(f"wrote {os.path.relpath(args.json, ROOT)} [{key}]")
    return result


if __name__ == "__main__":
    main()
