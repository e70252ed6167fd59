"""Out-of-core benchmark: a dataset larger than the memory budget, NIfTI -> NIfTI.

Generates (streaming, one volume at a time) a 4D int16 NIfTI with 300 volumes
and at least 10 GB of voxel data, runs ``p2s-dask denoise IN OUT
--memory-limit 2GiB`` in a subprocess, samples the peak RSS of that whole
process tree, and reads the time of each stage from the command's JSON
report. Both floors are measured in the same run on the same machine
(``floors.py``):

- the I/O floor, before and after the denoise (the speed of a shared cloud
  disk drifts): reading the input once and writing a file of the same size
  (with the page cache dropped first, when this user may drop it); the
  ratios use the mean of the two;
- the compute floor, after the denoise: the run's BLAS calls (statistics
  once, the prediction once per pass that predicts), cut into the run's
  chunks and pieces, on as many threads as the run used.

It prints ``whole / (compute + I/O)`` (target <= 1.25), ``whole /
max(compute, I/O)`` (target <= 1.6) and the peak RSS of the process tree
(target < 2.5 GiB).

Usage::

    python benchmarks/bench_out_of_core.py --shape 256 256 256 --nvols 300 \
        --workdir /tmp/p2s_ooc --json benchmarks/results/bench_out_of_core.json

Options after ``--`` go to ``p2s-dask denoise`` (``-- --patch-radius 1``);
the compute floor follows the options the run wrote into its output's
``.json`` sidecar (radius, mask, intensity shift, prediction arithmetic).
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

from floors import floor_of_run, floor_rows, io_floor, print_rows, ratio_rows, ratios, run_cli


def generate(path: Path, shape, nvols, seed=0):
    """Write a low-rank 'anatomy x per-volume contrast' signal plus noise.

    One volume is in memory at a time; the file is written sequentially.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    z = np.linspace(-1, 1, nz, dtype=np.float32)[None, None, :]
    r2 = x * x / 0.8 + y * y / 0.9 + z * z / 0.7
    anatomy = np.where(r2 < 1, 1000 * (1.1 - 0.3 * r2), 0).astype(np.float32)
    bases = [np.cos(3 * x + 2 * y) * np.ones_like(z), np.sin(2 * y - z) * np.ones_like(x),
             np.cos(x * z * 4) * np.ones_like(y)]
    nb0 = max(1, nvols // 16)
    bvals = np.array([0] * nb0 + [1000] * ((nvols - nb0) // 2) +
                     [2000] * (nvols - nb0 - (nvols - nb0) // 2))
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(tuple(shape) + (nvols,))
    hdr.set_data_dtype(np.int16)
    hdr.set_xyzt_units("mm", "sec")
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    hdr.set_qform(affine, 1)
    hdr.set_sform(affine, 1)
    hdr["vox_offset"] = 352
    with open(path, "wb") as fh:
        fh.write(hdr.binaryblock)
        fh.write(b"\0" * (352 - len(hdr.binaryblock)))
        for v in range(nvols):
            if bvals[v] == 0:
                contrast = anatomy
            else:
                c = rng.uniform(0.2, 0.5, 4).astype(np.float32)
                mod = c[0] + 0.15 * (c[1] * bases[0] + c[2] * bases[1] + c[3] * bases[2])
                contrast = anatomy * mod
            vol = contrast + rng.standard_normal(shape, dtype=np.float32) * 30
            # NIfTI is x-fastest: write the transposed C array
            fh.write(np.clip(np.rint(vol), -32768, 32767).astype("<i2").T.tobytes())
    base = str(path)[: -len(".nii")]
    np.savetxt(base + ".bval", bvals[None], fmt="%d")
    vecs = rng.normal(size=(3, nvols))
    vecs /= np.linalg.norm(vecs, axis=0)
    vecs[:, bvals == 0] = 0
    np.savetxt(base + ".bvec", vecs, fmt="%.6f")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 256])
    p.add_argument("--nvols", type=int, default=300)
    p.add_argument("--memory-limit", default="2GiB")
    p.add_argument("--workdir", default="/tmp/p2s_ooc")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--json", default="benchmarks/results/bench_out_of_core.json")
    p.add_argument("--floor-seconds", type=float, default=30.0,
                   help="time at most this many seconds of each part of the compute "
                        "floor and scale by the operations left (0: time every call)")
    p.add_argument("extra", nargs="*", help="extra p2s-dask denoise options (after --)")
    a = p.parse_args(argv)

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / "dwi.nii"
    nbytes = int(np.prod(a.shape)) * a.nvols * 2
    if not src.exists() or src.stat().st_size != nbytes + 352:
        t0 = time.perf_counter()
        generate(src, tuple(a.shape), a.nvols)
        print(f"generated {src} ({nbytes / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
    floor = io_floor(src, work / "floor.tmp")
    print(f"I/O floor: read {floor['read_s']:.1f} s + write {floor['write_s']:.1f} s "
          f"= {floor['floor_s']:.1f} s", flush=True)
    res = run_cli(src, work / "dwi_denoised.nii", a.memory_limit, a.extra)
    # the disk's speed drifts (a shared cloud volume): measure the floor again
    # right after the run and compare with the mean of the two
    after = io_floor(src, work / "floor.tmp")
    print(f"I/O floor after: read {after['read_s']:.1f} s + write {after['write_s']:.1f} s "
          f"= {after['floor_s']:.1f} s", flush=True)
    floor_mean = (floor["floor_s"] + after["floor_s"]) / 2
    if res.get("resumed"):
        print(f"warning: the run resumed earlier work ({', '.join(res['resumed'])}): "
              "its time is not a whole run", flush=True)
    bvals = np.loadtxt(work / "dwi.bval", ndmin=1)
    compute = floor_of_run(res, res["output"], bvals, integer=True,
                           max_seconds=a.floor_seconds or None)
    versus = ratios(res["wall_s"], compute["seconds"], floor_mean, res["peak_rss_tree"])
    out = dict(
        shape=list(a.shape) + [a.nvols], dtype="int16", data_bytes=nbytes,
        memory_limit=a.memory_limit, io_floor=floor, io_floor_after=after, denoise=res,
        io_floor_mean_s=floor_mean, ratio_to_floor=res["wall_s"] / floor_mean,
        compute_floor=compute, ratios=versus,
        machine=dict(cpus=os.cpu_count(), memory=psutil.virtual_memory().total,
                     python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
                     load_average=list(os.getloadavg())),
    )
    rows = [("stage", "seconds")] + [(k, f"{v:.1f}") for k, v in res["stages"].items()]
    rows += [("denoise in its process (report)", f"{res['seconds']:.1f}"),
             ("whole denoise (wall, process start included)", f"{res['wall_s']:.1f}"),
             ("I/O floor before (read + write)", f"{floor['floor_s']:.1f}"),
             ("I/O floor after (read + write)", f"{after['floor_s']:.1f}"),
             ("ratio to the mean I/O floor", f"{out['ratio_to_floor']:.2f}")]
    rows += floor_rows(compute) + ratio_rows(versus)
    print(f"\n{a.shape[0]}x{a.shape[1]}x{a.shape[2]}x{a.nvols} int16, "
          f"{nbytes / 1e9:.1f} GB, --memory-limit {a.memory_limit}, chunks "
          f"{'x'.join(map(str, res['plan']['chunks']))}")
    print_rows(rows)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    if not a.keep:
        for f in work.glob("dwi*"):
            if f.is_file():
                f.unlink()
    return out


if __name__ == "__main__":
    main()
