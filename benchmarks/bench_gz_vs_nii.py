"""The same acquisition denoised as ``.nii.gz`` and as ``.nii``, end to end.

Writes a brain-like float32 phantom (``--shape X Y Z --nvols N``, default
80 x 80 x 40 x 300, as in issue 10) as a ``.nii`` (see
``bench_zarr_path.make_dwi``) and the same bytes as a ``.nii.gz`` (ISA-L,
level 1), then runs the command line ``denoise IN OUT`` for
``.nii -> .nii`` and ``.nii.gz -> .nii.gz`` in fresh processes, alternating,
``--repeats`` rounds. Prints the stage times (``--report-json``), the whole
process wall and CPU seconds, and the ratio gz / nii of the whole wall time;
writes JSON.

Usage::

    python benchmarks/bench_gz_vs_nii.py --workdir /tmp/gz_vs_nii --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_zarr_path import STAGES, denoise, make_dwi  # noqa: E402


def gzip_copy(src: Path, dst: Path) -> None:
    from isal import igzip_threaded
    with open(src, "rb") as fin, igzip_threaded.open(dst, "wb", compresslevel=1) as fout:
        while chunk := fin.read(16 << 20):
            fout.write(chunk)
    for side in (".bval", ".bvec"):
        (dst.parent / (dst.name[:-len(".nii.gz")] + side)).write_bytes(
            src.with_suffix(side).read_bytes())


def run_pair(work: Path, extra):
    out = {}
    for name, src, dst in (("nii", work / "dwi.nii", work / "out.nii"),
                           ("gz", work / "dwi_gz.nii.gz", work / "out_gz.nii.gz")):
        for side in (".bval", ".bvec", ".json"):  # the last round's sidecars
            (work / (dst.name.split(".")[0] + side)).unlink(missing_ok=True)
        t0 = time.perf_counter()
        r = denoise(src, dst, work / f"report_{name}.json", extra, None)
        r["wall"] = time.perf_counter() - t0
        out[name] = r
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs=3, type=int, default=[80, 80, 40])
    ap.add_argument("--nvols", type=int, default=300)
    ap.add_argument("--workdir", default="/tmp/p2s_gz_vs_nii")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(HERE / "results" / "bench_gz_vs_nii.json"))
    ap.add_argument("extra", nargs="*", help="more denoise flags (after --)")
    args = ap.parse_args(argv)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    make_dwi(work / "dwi.nii", tuple(args.shape), args.nvols, "float32")
    gzip_copy(work / "dwi.nii", work / "dwi_gz.nii.gz")
    rounds = [run_pair(work, args.extra) for _ in range(args.repeats)]
    print(f"{tuple(args.shape) + (args.nvols,)} float32, "
          f"{(work / 'dwi_gz.nii.gz').stat().st_size / 1e6:.0f} MB gz, "
          f"{(work / 'dwi.nii').stat().st_size / 1e6:.0f} MB nii")
    print("| round | input | " + " | ".join(STAGES) + " | process wall s | CPU s | ratio |")
    print("|---|---|" + "---:|" * (len(STAGES) + 3))
    for i, pair in enumerate(rounds):
        for name in ("nii", "gz"):
            r = pair[name]
            ratio = r["process_wall"] / pair["nii"]["process_wall"]
            cells = " | ".join(f"{r['stages'][k]:.2f}" for k in STAGES)
            print(f"| {i + 1} | {name} | {cells} | {r['process_wall']:.2f} | "
                  f"{r['process_cpu']:.2f} | {ratio:.2f} |")
    ratios = [p["gz"]["process_wall"] / p["nii"]["process_wall"] for p in rounds]
    print(f"median ratio gz / nii (whole process wall): {statistics.median(ratios):.2f}")
    record = {"shape": [*args.shape, args.nvols], "rounds": rounds, "ratios": ratios,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "load": os.getloadavg()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
