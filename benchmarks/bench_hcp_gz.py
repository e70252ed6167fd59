"""HCP-sized end-to-end run through the command line: ``.nii.gz`` in and out.

Generates (once, one volume at a time, kept in ``--workdir`` for the next
run with the same parameters) a 145x174x145x288 float32 ``.nii.gz``, the
size of an HCP 3T subject: 18 b0 + 270 volumes at b=1000/2000, an
ellipsoid "brain" with smooth contrast and a fibre direction field, and
Gaussian noise everywhere (background too), so that it compresses about as
badly as real data. Written with ISA-L's threaded gzip when installed.

Then, for each ``--radius``, runs ``p2s-dask denoise IN.nii.gz OUT.nii.gz
--report-json R.json`` in a fresh process and reports the stage times of
its report, the whole wall time (process start included) and the peak RSS
of its process tree, against two floors measured in the same run
(``floors.py``):

- the gzip floor: decompressing the input once (ISA-L, page cache dropped)
  and compressing an output of the same size with ISA-L's threaded writer
  at the run's settings (fsync'ed); measured before and after the runs,
  the ratios use the mean;
- the compute floor: the run's BLAS calls at this machine's speed.

Ratios: ``whole / (compute + gzip)`` (target <= 1.25) and ``whole /
max(compute, gzip)`` (target <= 1.6); peak RSS target < 2.5 GiB.

Usage::

    python benchmarks/bench_hcp_gz.py --workdir /tmp/p2s_hcp            # r = 0
    python benchmarks/bench_hcp_gz.py --workdir /tmp/p2s_hcp --radius 1
    python benchmarks/bench_hcp_gz.py --shape 40 40 30 --nvols 40 --nb0 4 \\
        --workdir /tmp/p2s_hcp_small --json /tmp/hcp_small.json         # a quick check

Options after ``--`` go to ``p2s-dask denoise``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

from floors import (floor_of_run, floor_rows, gzip_floor, print_rows, ratio_rows, ratios,
                    run_cli, seconds)

HERE = Path(__file__).resolve().parent
# bump when the generated data change, so that a kept file is made anew
GENERATOR_VERSION = 1


# ----------------------------------------------------------------------------
# data


def acquisition(nvols, nb0, shells, seed):
    """b-values (b0 first, then the shells in turn) and unit directions."""
    ndw = nvols - nb0
    bvals = np.concatenate([np.zeros(nb0), np.resize(np.asarray(shells, float), ndw)])
    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(nvols, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    dirs[:nb0] = 0
    return bvals, dirs


class Phantom:
    """The maps every volume is made from, in NIfTI order (x fastest): arrays
    are ``(z, y, x)`` C-ordered, so a volume's bytes are the file's bytes."""

    def __init__(self, shape):
        nx, ny, nz = shape
        x = np.linspace(-1, 1, nx, dtype=np.float32)[None, None, :]
        y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
        z = np.linspace(-1, 1, nz, dtype=np.float32)[:, None, None]
        r2 = x * x / 0.8 + y * y / 0.9 + z * z / 0.7
        brain = r2 < 1
        self.s0 = np.where(brain, 900 + 300 * np.cos(5 * x) * np.sin(4 * y), 0).astype(np.float32)
        self.csf = (x * x + (y - 0.1) ** 2 + z * z) < 0.05
        self.s0[self.csf] = 1800
        # a fibre direction turning with z, in the xy-plane
        angle = 3 * z
        self.fx, self.fy = np.cos(angle), np.sin(angle)

    def volume(self, b, g, sigma, rng):
        """One noisy volume, float32 ``(z, y, x)``."""
        cos = self.fx * np.float32(g[0]) + self.fy * np.float32(g[1])
        diffusivity = np.where(self.csf, np.float32(3e-3), 7e-4 + 1.2e-3 * cos * cos)
        vol = self.s0 * np.exp(np.float32(-b) * diffusivity)
        vol += rng.standard_normal(vol.shape, dtype=np.float32) * np.float32(sigma)
        return vol


def header(shape, nvols):
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(tuple(shape) + (nvols,))
    hdr.set_data_dtype(np.float32)
    hdr.set_xyzt_units("mm", "sec")
    affine = np.diag([1.25, 1.25, 1.25, 1.0])  # HCP's voxel size
    hdr.set_qform(affine, 1)
    hdr.set_sform(affine, 1)
    hdr["vox_offset"] = 352
    return hdr


def gzip_writer(fh):
    """ISA-L's threaded writer (the project's settings) when installed, else zlib."""
    try:
        from isal import igzip_threaded
    except ImportError:
        import gzip
        return gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=1), "zlib"
    from p2s_dask.io import nifti_stream
    threads = max(1, min(nifti_stream._ISAL_MAX_THREADS, len(os.sched_getaffinity(0))))
    return igzip_threaded.open(fh, "wb", compresslevel=nifti_stream._isal_level(1),
                               threads=threads, block_size=nifti_stream._ISAL_BLOCK), "isal"


def generate(path: Path, params: dict) -> str:
    """Write the ``.nii.gz`` (under a temporary name, renamed when complete)
    and its ``.bval``/``.bvec``; one volume in memory at a time."""
    shape, nvols = params["shape"], params["nvols"]
    bvals, dirs = acquisition(nvols, params["nb0"], params["shells"], params["seed"])
    phantom = Phantom(shape)
    rng = np.random.default_rng(params["seed"] + 1)
    tmp = path.with_name(path.name + ".partial")
    hdr = header(shape, nvols)
    with open(tmp, "wb") as fh:
        out, backend = gzip_writer(fh)
        out.write(hdr.binaryblock + b"\0" * (352 - len(hdr.binaryblock)))
        for v in range(nvols):
            out.write(phantom.volume(bvals[v], dirs[v], params["sigma"], rng).tobytes())
        out.close()
    os.replace(tmp, path)
    base = str(path)[: -len(".nii.gz")]
    np.savetxt(base + ".bval", bvals[None], fmt="%d")
    np.savetxt(base + ".bvec", dirs.T, fmt="%.6f")
    return backend


def ensure_data(work: Path, params: dict) -> Path:
    """The input, made anew unless one with the same parameters is there."""
    path = work / "dwi.nii.gz"
    record = work / "dwi.params.json"
    if path.exists() and record.exists() and json.loads(record.read_text()) == params:
        print(f"using {path} ({path.stat().st_size / 1e9:.2f} GB)", flush=True)
        return path
    record.unlink(missing_ok=True)
    t0 = time.perf_counter()
    backend = generate(path, params)
    record.write_text(json.dumps(params, indent=1))
    print(f"generated {path} ({path.stat().st_size / 1e9:.2f} GB, {backend}) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return path


# ----------------------------------------------------------------------------
# runs


def denoise_args(radius, extra) -> list:
    # DIPY's version 3 (the CLI's default) is radius 0 only
    return ["--patch-radius", str(radius)] + (["--ver", "1"] if radius != 0 else []) \
        + list(extra)


def radius_arg(text):
    """A patch radius, or 'auto' (chosen by the run, up to radius 1)."""
    return "auto" if text == "auto" else int(text)


def one_run(src, work, radius, args, bvals):
    """Denoise at one radius; the run's report and its compute floor."""
    out = work / f"dwi_denoised_r{radius}.nii.gz"
    print(f"denoising at radius {radius} ...", flush=True)
    res = run_cli(src, out, args.memory_limit, denoise_args(radius, args.extra))
    if res.get("resumed"):
        print(f"warning: the run resumed earlier work ({', '.join(res['resumed'])}): "
              "its time is not a whole run", flush=True)
    print(f"  {res['wall_s']:.1f} s; measuring the compute floor ...", flush=True)
    # 'auto' sums its statistics at radius 1 whatever it chooses: the floor
    # of a radius-1 run
    compute = floor_of_run(res, out, bvals, integer=False,
                           max_seconds=args.floor_seconds or None,
                           radius=(1, 1, 1) if radius == "auto" else None)
    res["output_bytes"] = out.stat().st_size
    if not args.keep:
        base = str(out)[: -len(".nii.gz")]
        for name in (str(out), base + ".json", base + ".bval", base + ".bvec"):
            Path(name).unlink(missing_ok=True)
    return dict(radius=radius, denoise=res, compute_floor=compute)


def print_gzip_floor(name, floor):
    # the sizes say whether the floor's output compressed as the input does
    print(f"{name}: gunzip {seconds(floor['read_s'])} s + gzip {seconds(floor['write_s'])} s "
          f"= {seconds(floor['floor_s'])} s ({floor['backend']}, {floor['threads']} threads; "
          f"compressed to {floor['written_bytes'] / floor['bytes']:.3f} of the raw bytes, "
          f"the input to {floor['compressed_bytes'] / floor['bytes']:.3f})", flush=True)


def run_rows(run, gz_mean):
    res, compute = run["denoise"], run["compute_floor"]
    rows = [("stage", "seconds")] + [(k, seconds(v)) for k, v in res["stages"].items()]
    rows += [("denoise in its process (report)", seconds(res["seconds"])),
             ("whole denoise (wall, process start included)", seconds(res["wall_s"])),
             ("gzip floor (mean of before and after)", seconds(gz_mean))]
    return rows + floor_rows(compute) + ratio_rows(run["ratios"], "gzip")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[145, 174, 145])
    p.add_argument("--nvols", type=int, default=288)
    p.add_argument("--nb0", type=int, default=18)
    p.add_argument("--shells", type=float, nargs="+", default=[1000.0, 2000.0])
    p.add_argument("--sigma", type=float, default=30.0, help="noise level (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--radius", type=radius_arg, nargs="+", default=[0],
                   help="patch radii to run, one run each (default 0; 'auto': chosen by "
                        "the run, its floor that of radius 1)")
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--workdir", default="/tmp/p2s_hcp")
    p.add_argument("--keep", action="store_true", help="keep the outputs (the input is "
                   "always kept for the next run)")
    p.add_argument("--floor-seconds", type=float, default=30.0,
                   help="time at most this many seconds of each part of the compute "
                        "floor and scale by the operations left (0: time every call)")
    p.add_argument("--json", default=str(HERE / "results" / "bench_hcp_gz.json"))
    p.add_argument("extra", nargs="*", help="extra p2s-dask denoise options (after --)")
    a = p.parse_args(argv)

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    params = dict(shape=list(a.shape), nvols=a.nvols, nb0=a.nb0, shells=list(a.shells),
                  sigma=a.sigma, seed=a.seed, version=GENERATOR_VERSION)
    src = ensure_data(work, params)
    bvals = np.loadtxt(work / "dwi.bval", ndmin=1)
    before = gzip_floor(src, work / "floor.tmp.gz")
    print_gzip_floor("gzip floor", before)
    runs = [one_run(src, work, r, a, bvals) for r in a.radius]
    after = gzip_floor(src, work / "floor.tmp.gz")
    print_gzip_floor("gzip floor after", after)
    gz_mean = (before["floor_s"] + after["floor_s"]) / 2
    for run in runs:
        run["ratios"] = ratios(run["denoise"]["wall_s"], run["compute_floor"]["seconds"],
                               gz_mean, run["denoise"]["peak_rss_tree"])

    shape = "x".join(map(str, a.shape + [a.nvols]))
    for run in runs:
        print(f"\n{shape} float32 .nii.gz ({src.stat().st_size / 1e9:.2f} GB compressed, "
              f"{before['bytes'] / 1e9:.2f} GB raw), radius {run['radius']}, "
              f"--memory-limit {a.memory_limit}, chunks "
              f"{'x'.join(map(str, run['denoise']['plan']['chunks']))}")
        print_rows(run_rows(run, gz_mean))

    out = dict(
        benchmark="bench_hcp_gz", data=dict(params, path=str(src),
                                            compressed_bytes=src.stat().st_size,
                                            raw_bytes=before["bytes"]),
        memory_limit=a.memory_limit, gzip_floor=before, gzip_floor_after=after,
        gzip_floor_mean_s=gz_mean, runs=runs,
        machine=dict(cpus=len(os.sched_getaffinity(0)), memory=psutil.virtual_memory().total,
                     python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
                     load_average=list(os.getloadavg())),
    )
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {a.json}")
    return out


if __name__ == "__main__":
    main()
