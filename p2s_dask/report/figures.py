"""The report's figures, drawn with matplotlib into PNG bytes.

Each figure is drawn on its own :class:`matplotlib.figure.Figure` with the
Agg canvas (no pyplot: no global state, safe beside the run's threads and in
a process with no display). They are small (about 70 dots per inch) because
the page embeds them.

Why not nireports, the NiPreps report library: it installs about 25 more
packages (nipype, pybids with SQLAlchemy, templateflow, nilearn, seaborn),
templateflow fetches templates from the network when first asked, its
reportlets are nipype interfaces built around registration and
segmentation contours, and pybids is what :mod:`p2s_dask.fronts.bids`
already chose not to depend on. We keep NiPreps' layout (``sub-XX.html``,
figures under ``sub-XX/figures/``) and draw our own few figures here.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 70
# the grey window of the mosaics: this percentile of the original slices
WINDOW_PERCENTILE = 99.5


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": "p2s-dask"})
    return buf.getvalue()


def _show(ax, image, **kwargs):
    # x to the right, y up (the radiological view of an axial slice)
    ax.imshow(np.asarray(image).T, origin="lower", interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def _volume_label(v, bvals) -> str:
    return f"vol {v}, b={bvals[v]:g}"


def head_box(result, margin=3) -> tuple:
    """The slices ``(x, y)`` around the head in the shown slices (the first
    shown volume's voxels above a tenth of its window), so that the figures
    spend no pixels on empty background; the whole slice when none."""
    if not result.mosaics:
        return slice(None), slice(None)
    original = next(iter(result.mosaics.values()))[0]
    inside = (original > 0.1 * np.percentile(original, WINDOW_PERCENTILE)).any(axis=2)
    if not inside.any():
        return slice(None), slice(None)
    box = []
    for axis in (1, 0):
        hit = np.flatnonzero(inside.any(axis=axis))
        box.append(slice(max(0, hit[0] - margin), hit[-1] + 1 + margin))
    return tuple(box)


def mosaic(result) -> bytes:
    """Original, denoised and residual of each shown volume, a few axial
    slices each; the three on one grey scale: the residual's window is as
    wide as the images' and centred on zero."""
    volumes = list(result.mosaics)
    k = max(1, len(result.slices))
    box = head_box(result)
    fig = Figure(figsize=(1.3 * k + 0.6, 1.3 * 3 * len(volumes) + 0.3))
    axes = fig.subplots(3 * len(volumes), k, squeeze=False)
    for i, v in enumerate(volumes):
        original, denoised = (m[box] for m in result.mosaics[v])
        top = float(np.percentile(original, WINDOW_PERCENTILE)) or 1.0
        rows = (("original", original, 0.0, top), ("denoised", denoised, 0.0, top),
                ("residual", original - denoised, -top / 2, top / 2))
        for j, (name, images, lo, hi) in enumerate(rows):
            for s in range(k):
                ax = axes[3 * i + j, s]
                _show(ax, images[:, :, s], cmap="gray", vmin=lo, vmax=hi)
                if s == 0:
                    ax.set_ylabel(f"{_volume_label(v, result.bvals)}\n{name}"
                                  if j == 0 else name, fontsize=7)
                if i == 0 and j == 0:
                    ax.set_title(f"slice z={result.slices[s]}", fontsize=8)
    fig.subplots_adjust(left=0.09, right=0.99, top=0.98, bottom=0.01, wspace=0.03,
                        hspace=0.05)
    return png(fig)


def noise_map(result) -> bytes:
    """The noise map's axial slices (those of the mosaics), one colour scale."""
    k = max(1, len(result.slices))
    fig = Figure(figsize=(1.6 * k + 1.0, 2.0))
    axes = fig.subplots(1, k, squeeze=False)[0]
    top = float(np.percentile(result.noise, 99.5)) or 1.0
    box = head_box(result)
    image = None
    for s, ax in enumerate(axes):
        image = ax.imshow(result.noise[box][:, :, result.slices[s]].T, origin="lower",
                          cmap="magma", vmin=0, vmax=top, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"z={result.slices[s]}", fontsize=8)
    fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.01, label="residual RMS")
    return png(fig)


def residuals(result) -> bytes:
    """Residual RMS per volume (flagged volumes in red) and, below, each
    volume's RMS per slice over its shell's median (a dropped slice is a
    bright cell)."""
    n = result.rms_volume.size
    flagged = set(result.flagged_volumes)
    fig = Figure(figsize=(max(6.0, 0.12 * n + 1.5), 5.0))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [1, 1.4]})
    colours = ["tab:red" if v in flagged else "tab:blue" for v in range(n)]
    top.bar(np.arange(n), result.rms_volume, color=colours, width=0.8)
    for v in sorted(flagged):
        top.annotate(str(v), (v, result.rms_volume[v]), ha="center", va="bottom",
                     fontsize=7, color="tab:red")
    top.set_xlim(-0.5, n - 0.5)
    top.set_ylabel("residual RMS")
    top.set_title("per volume (red: flagged)", fontsize=9)
    ratio = _slice_ratio(result)
    image = bottom.imshow(ratio.T, origin="lower", aspect="auto", cmap="viridis",
                          vmin=0.5, vmax=2.0, interpolation="nearest")
    for f in result.flagged:
        for z in f["slices"]:
            bottom.plot(f["volume"], z, marker="s", markersize=6, markerfacecolor="none",
                        markeredgecolor="tab:red")
    bottom.set_xlabel("volume")
    bottom.set_ylabel("slice (z)")
    bottom.set_title("per volume and slice, over the shell's median (red: flagged)",
                     fontsize=9)
    fig.colorbar(image, ax=bottom, fraction=0.03, pad=0.01)
    fig.tight_layout()
    return png(fig)


def _slice_ratio(result) -> np.ndarray:
    """Each volume's residual RMS profile over slices, over its shell's
    median profile (1 where the volume is passed through)."""
    from .results import comparison_sets
    with np.errstate(invalid="ignore", divide="ignore"):
        profile = result.rms_slice / result.rms_volume[:, None]
        ratio = np.ones_like(profile)
        for _, idx in comparison_sets(result.groups, result.bvals):
            idx = list(idx)
            ratio[idx] = profile[idx] / np.nanmedian(profile[idx], axis=0)
    return np.nan_to_num(ratio, nan=1.0, posinf=2.0)


def histogram(result) -> bytes:
    """The residuals' histogram (a uniform sample) against the normal of
    their mean and standard deviation, on a log scale (tails show)."""
    sample = np.asarray(result.sample, np.float64)
    fig = Figure(figsize=(6.0, 3.2))
    ax = fig.subplots()
    if sample.size:
        mean, std = float(sample.mean()), float(sample.std()) or 1.0
        lo, hi = np.percentile(sample, [0.05, 99.95])
        edges = np.linspace(min(lo, mean - 4 * std), max(hi, mean + 4 * std), 121)
        density, _ = np.histogram(sample, bins=edges, density=True)
        ax.stairs(density, edges, fill=True, color="tab:blue", alpha=0.7,
                  label=f"residuals ({sample.size:,} sampled)")
        x = 0.5 * (edges[1:] + edges[:-1])
        pdf = np.exp(-0.5 * ((x - mean) / std) ** 2) / (std * np.sqrt(2 * np.pi))
        ax.plot(x, pdf, color="tab:orange", label=f"normal (mean {mean:.3g}, sd {std:.3g})")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("residual (input - output)")
    ax.set_ylabel("density")
    fig.tight_layout()
    return png(fig)


# the figures of a run's report, by name, in the order the page shows them
FIGURES = {"mosaic": mosaic, "noise": noise_map, "residuals": residuals,
           "histogram": histogram}


def draw_all(result) -> dict:
    """``{name: PNG bytes}`` of every figure of :data:`FIGURES`."""
    return {name: draw(result) for name, draw in FIGURES.items()}
