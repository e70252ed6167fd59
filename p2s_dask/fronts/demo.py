"""``p2s-dask demo``: denoise the bundled real acquisition and draw a figure."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..datasets import example_paths
from ..errors import InputError


def save_figure(original, denoised, path, volume=None, z=None, title=""):
    """Original / denoised / residual of one axial slice, as DIPY's example."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = original.shape[2] // 2 if z is None else z
    volume = original.shape[3] - 1 if volume is None else volume
    orig = original[:, :, z, volume].T
    den = denoised[:, :, z, volume].T
    resid = np.sqrt(np.abs(orig.astype(np.float64) - den) ** 2)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    vmax = np.percentile(orig, 99.5)
    for ax, img, name, kw in [
        (axes[0], orig, "Original", dict(vmin=0, vmax=vmax)),
        (axes[1], den, "Denoised", dict(vmin=0, vmax=vmax)),
        (axes[2], resid, "Residual", dict(vmin=0, vmax=np.percentile(resid, 99.5))),
    ]:
        ax.imshow(img, cmap="gray", origin="lower", interpolation="none", **kw)
        ax.set_title(name)
        ax.set_axis_off()
    fig.suptitle(title or f"Patch2Self (p2s-dask), volume {volume}, slice z={z}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir="p2s_demo", *, overwrite=False, progress=True):
    """Denoise the bundled data with the full pipeline and save a figure.

    Writes ``OUT_DIR/dwi_denoised.nii.gz`` and ``OUT_DIR/denoised.png``.
    """
    import nibabel as nib

    from ..run.pipeline import denoise_file

    paths = example_paths()
    out_dir = Path(out_dir)
    out = out_dir / "dwi_denoised.nii.gz"
    figure = out_dir / "denoised.png"
    if (out.exists() or figure.exists()) and not overwrite:
        raise InputError(f"{out_dir} already holds demo results; pass --overwrite")
    os.makedirs(out_dir, exist_ok=True)
    report = denoise_file(str(paths.dwi), str(out), bvals=str(paths.bval),
                          bvecs=str(paths.bvec), overwrite=overwrite, progress=progress)
    original = nib.load(paths.dwi).get_fdata(dtype=np.float32)
    denoised = np.asanyarray(nib.load(out).dataobj)
    save_figure(original, denoised, figure)
    print(report.summary_line())
    print(f"p2s-dask: figure -> {figure}")
    return report
