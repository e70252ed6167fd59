#!/usr/bin/env python
"""``patch_radius='auto'`` against the fixed radii 0 and 1, on phantoms with a truth.

For each case the in-memory API denoises with ``patch_radius=0``, ``1`` and
``'auto'`` (``version=1``, ``shift_intensity=False``, all in one process, one
after another), and reports the RMSE of the diffusion-weighted volumes
against the noise-free truth inside the brain mask, the wall and CPU seconds
of each call and the radius ``'auto'`` chose (its log line).

Cases: the two phantoms of ``tests/test_crossval.py`` (fitted on the brain
mask, as there) and the two of ``bench_vs_dipy.py`` (81 x 106 x 76 x 160 and
64 x 64 x 40 x 300, SNR 25, seed 1; cached under ``benchmarks/.cache/``),
each fitted on all voxels and on the brain mask.

Example::

    python benchmarks/bench_auto.py                       # every case
    python benchmarks/bench_auto.py --cases few many      # the small ones
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

SMALL = {  # tests/test_crossval.py's phantoms
    "few": dict(shape=(32, 32, 24), nvols=16, nb0=2, shells=(1000.0,), snr=10.0, seed=3),
    "many": dict(shape=(26, 26, 16), nvols=60, nb0=3, shells=(1000.0, 2000.0, 3000.0),
                 snr=40.0, seed=3),
}
LARGE = {  # bench_vs_dipy.py's phantoms
    "main": dict(shape=[81, 106, 76], nvols=160, nb0=10, shells=[2000.0], snr=25.0, seed=1),
    "v300": dict(shape=[64, 64, 40], nvols=300, nb0=18, shells=[1000.0, 2000.0], snr=25.0,
                 seed=1),
}
# (case, phantom, fitted on the mask)
CASES = {"few": ("few", True), "many": ("many", True), "main": ("main", False),
         "main-mask": ("main", True), "v300": ("v300", False), "v300-mask": ("v300", True)}


def load(name):
    """The phantom ``name`` as a dict of arrays (the large ones cached)."""
    if name in SMALL:
        from p2s_dask.testing.phantom import make_phantom
        return make_phantom(**SMALL[name])
    from bench_vs_dipy import ensure_data
    path = ensure_data(LARGE[name])
    return {k: np.load(os.path.join(path, k + ".npy"))
            for k in ("dwi", "clean", "mask", "bvals")}


class _Choice(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        if "auto: chose" in record.getMessage():
            self.lines.append(record.getMessage())


def run(ph, masked, radius):
    """One call: its seconds, the truth RMSE and (for 'auto') the choice."""
    from p2s_dask import patch2self
    handler = _Choice()
    logger = logging.getLogger("p2s_dask")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        out = patch2self(ph["dwi"], ph["bvals"], patch_radius=radius, version=1,
                         shift_intensity=False, mask=ph["mask"] if masked else None)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    dw, mask = ph["bvals"] > 50, ph["mask"]
    diff = out[..., dw][mask].astype(np.float64) - ph["clean"][..., dw][mask]
    return {"radius": radius, "wall_s": wall, "cpu_s": cpu,
            "rmse_vs_truth": float(np.sqrt(np.mean(diff ** 2))),
            "choice": handler.lines[0] if handler.lines else None}


def table(results) -> str:
    """The README's table."""
    lines = ["| data | fitted on | r=0 | r=1 | auto | auto chose | CPU s auto / r=1 |",
             "|---|---|---:|---:|---:|---|---:|"]
    for case, res in results.items():
        by = {str(r["radius"]): r for r in res["runs"]}
        chose = by["auto"]["choice"].split("chose ")[1].split(" (")[0]
        ratio = by["auto"]["cpu_s"] / by["1"]["cpu_s"]
        lines.append(f"| {res['shape']} | {'brain mask' if res['masked'] else 'all voxels'} "
                     f"| {by['0']['rmse_vs_truth']:.3f} | {by['1']['rmse_vs_truth']:.3f} "
                     f"| {by['auto']['rmse_vs_truth']:.3f} | {chose} "
                     f"| {by['auto']['cpu_s']:.1f} / {by['1']['cpu_s']:.1f} = {ratio:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--json", default=os.path.join(HERE, "results", "bench_auto.json"))
    p.add_argument("--table", action="store_true", help="print the table of --json only")
    a = p.parse_args(argv)
    if a.table:
        with open(a.json) as fh:
            print(table(json.load(fh)["results"]))
        return
    results, phantoms = {}, {}
    for case in a.cases:
        name, masked = CASES[case]
        ph = phantoms.setdefault(name, load(name))
        shape = "x".join(map(str, ph["dwi"].shape))
        runs = []
        for radius in (0, 1, "auto"):
            runs.append(run(ph, masked, radius))
            print(case, json.dumps(runs[-1]), flush=True)
        results[case] = {"shape": shape, "masked": masked, "runs": runs}
    record = {"date": _dt.date.today().isoformat(), "cpus": os.cpu_count(),
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "results": results}
    with open(a.json, "w") as fh:
        json.dump(record, fh, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
