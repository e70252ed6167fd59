"""Synthetic brain-like DWI phantom with a noise-free ground truth.

Used by the tests and the benchmarks of ``p2s_dask``. The phantom is built in
normalised coordinates (``[-1, 1]`` along each axis), so the "brain" fills the
field of view in proportion to the grid shape:

* an ellipsoidal brain with a thin outer CSF rim, a cortical grey-matter shell
  whose inner (GM/WM) boundary is folded ("gyri"), two lateral ventricles
  (CSF) and two deep-GM nuclei (thalamus-like);
* white matter made of several fibre bundles with smooth orientation fields:
  corpus-callosum-like left-right arcs, two corticospinal-like
  superior-inferior columns (fanning), two SLF-like anterior-posterior tubes,
  two cingulum-like tubes and a radial "corona radiata" background. Where
  bundles overlap a voxel holds 2-3 crossing fibre populations with
  continuous volume fractions;
* soft (partial-volume) tissue boundaries, a smooth multiplicative bias field
  and a smooth S0 texture.

Every fibre population is a prolate tensor. The normalised single-fibre
signal for each orientation of a dense set of axes (1445 axes, about 4 degree
spacing) is computed once with ``dipy.sims.voxel.multi_tensor``; a voxel's WM
signal is the fraction-weighted sum of those kernels, which is what
``multi_tensor`` gives for a multi-fibre voxel (``selftest=True`` checks it).
GM and CSF are isotropic tensors.

Noise is Rician, from ``dipy.sims.voxel.add_noise(signal, snr, S0=s0)``, i.e.
``sigma = s0 / snr``, drawn from ``numpy.random.default_rng(seed + 1000)``.
The background (outside the head) has zero signal, so it becomes Rayleigh
noise.

DIPY is needed here (``pip install dipy``) but it is a test and benchmark
dependency only: it is imported inside the functions that use it.

Command line::

    python -m p2s_dask.testing.phantom --shape 81 106 76 --nvols 160 --nb0 10 \\
        --shells 2000 --snr 25 --seed 1 --out data/stanford_like
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

__all__ = ["make_phantom", "write_phantom", "main"]

# Tissue diffusivities (mm^2/s) and S0 relative to the reference S0.
WM_EVALS = np.array([1.5e-3, 0.3e-3, 0.3e-3])
GM_EVALS = np.array([0.8e-3, 0.8e-3, 0.8e-3])
CSF_EVALS = np.array([3.0e-3, 3.0e-3, 3.0e-3])
S0_REL = dict(wm=0.90, gm=1.05, csf=1.35)

# A fibre population below this fraction of a voxel's WM is dropped (and the
# others renormalised): it would be a rounding artefact of the soft bundle
# memberships rather than a fibre.
MIN_FIBRE_FRACTION = 0.08


def _require_dipy():
    """Import DIPY or fail with an actionable message."""
    try:
        import dipy  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "p2s_dask.testing.phantom needs DIPY to simulate the diffusion "
            "signal and the Rician noise; DIPY is a test/benchmark dependency "
            "of p2s_dask, not a runtime one. Install it with "
            "`pip install dipy` (or `pip install p2s-dask[test]`).") from exc


# ----------------------------------------------------------------------------
# acquisition
# ----------------------------------------------------------------------------
def make_acquisition(nvols, nb0, shells, rng):
    """Gradient scheme: ``nb0`` b0 volumes spread through the series.

    Parameters
    ----------
    nvols : int
        Total number of volumes, b0 included.
    nb0 : int
        Number of b=0 volumes.
    shells : sequence of float
        b-values of the diffusion-weighted shells; the DW volumes are split
        evenly over them and interleaved round-robin.
    rng : numpy.random.Generator
        Draws the initial directions (then spread by electrostatic repulsion)
        and their random signs.

    Returns
    -------
    bvals : ndarray, shape (nvols,)
    bvecs : ndarray, shape (nvols, 3)
        Unit vectors; b0 volumes have ``(0, 0, 0)``.
    """
    _require_dipy()
    from dipy.core.sphere import HemiSphere, disperse_charges

    shells = [float(s) for s in shells]
    ndwi = nvols - nb0
    if ndwi < len(shells):
        raise ValueError("need at least one DW volume per shell")
    counts = [ndwi // len(shells)] * len(shells)
    for i in range(ndwi - sum(counts)):
        counts[i] += 1
    shell_dirs = []
    for n in counts:
        theta = np.arccos(rng.uniform(0, 1, n))          # upper hemisphere
        phi = rng.uniform(0, 2 * np.pi, n)
        hemi = HemiSphere(theta=theta, phi=phi)
        iters = 5000 if n <= 200 else 2000
        hemi, _ = disperse_charges(hemi, iters)
        v = hemi.vertices.copy()
        # Random signs: the sign is irrelevant to the signal, but a real
        # scheme covers the whole sphere.
        v *= rng.choice([-1.0, 1.0], size=(n, 1))
        shell_dirs.append(v)
    # interleave the shells round-robin
    dw_b, dw_v = [], []
    pos = [0] * len(shells)
    k = 0
    while len(dw_b) < ndwi:
        s = k % len(shells)
        if pos[s] < counts[s]:
            dw_b.append(shells[s])
            dw_v.append(shell_dirs[s][pos[s]])
            pos[s] += 1
        k += 1
    # one b0 every ~nvols/nb0 volumes, as in a typical acquisition
    b0_pos = set(np.floor(np.arange(nb0) * nvols / nb0).astype(int).tolist())
    bvals = np.zeros(nvols)
    bvecs = np.zeros((nvols, 3))
    j = 0
    for i in range(nvols):
        if i in b0_pos:
            continue
        bvals[i] = dw_b[j]
        bvecs[i] = dw_v[j]
        j += 1
    return bvals, bvecs


# ----------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------
def _sstep(d, width):
    """Soft inside-indicator: 1 for d << 0, 0 for d >> 0, linear ramp of `width`."""
    return np.clip(0.5 - d / width, 0.0, 1.0)


def _ellipsoid_r(x, y, z, c, radii):
    return np.sqrt(((x - c[0]) / radii[0]) ** 2 + ((y - c[1]) / radii[1]) ** 2 +
                   ((z - c[2]) / radii[2]) ** 2)


def _unit(v):
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.maximum(n, 1e-12)


def make_geometry(shape, rng):
    """Tissue fractions, fibre bundles and smooth intensity fields.

    Parameters
    ----------
    shape : tuple of 3 int
    rng : numpy.random.Generator
        Draws the S0 texture.

    Returns
    -------
    dict
        ``csf``, ``gm``, ``wm`` (tissue fractions), ``f_brain`` (intracranial
        fraction), ``memb`` (``shape + (5,)`` normalised bundle memberships),
        ``dirs`` (``shape + (5, 3)`` unit fibre directions), ``tex`` and
        ``bias`` (multiplicative S0 fields).
    """
    from scipy.ndimage import gaussian_filter

    shape = tuple(int(s) for s in shape)
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) / (n / 2.0) for n in shape],
                          indexing="ij")
    # ~1.5 voxel partial-volume ramp, in normalised radial units
    w = 1.5 * 2.0 / min(shape) / 0.85

    rb = _ellipsoid_r(x, y, z, (0, 0, 0.0), (0.80, 0.88, 0.80))
    f_brain = _sstep(rb - 1.0, w)                      # whole intracranial
    f_inner = _sstep(rb - 0.955, w)                    # inside the CSF rim
    # folded GM/WM boundary (gyri): modulate the WM radius with angles
    az = np.arctan2(y, x)
    el = np.arctan2(z, np.sqrt(x ** 2 + y ** 2))
    fold = 0.06 * np.sin(9 * az) * np.cos(7 * el) + 0.03 * np.sin(5 * el + 3 * az)
    f_wmzone = _sstep(rb - (0.80 + fold), w)

    # lateral ventricles
    f_vent = np.zeros(shape)
    for sx in (-1, 1):
        rv = _ellipsoid_r(x, y, z, (sx * 0.11, 0.02, 0.08), (0.07, 0.36, 0.13))
        f_vent = np.maximum(f_vent, _sstep(rv - 1.0, w / 0.1))
    # deep GM nuclei
    f_dgm = np.zeros(shape)
    for sx in (-1, 1):
        rd = _ellipsoid_r(x, y, z, (sx * 0.20, -0.12, -0.10), (0.12, 0.17, 0.13))
        f_dgm = np.maximum(f_dgm, _sstep(rd - 1.0, w / 0.13))

    csf = (f_brain - f_inner) + f_wmzone * f_vent
    gm = (f_inner - f_wmzone) + f_wmzone * (1 - f_vent) * f_dgm
    wm = f_wmzone * (1 - f_vent) * (1 - f_dgm)
    gm = np.clip(gm, 0, 1)
    csf = np.clip(csf, 0, 1)

    pos = np.stack([x, y, z], axis=-1)
    bundles = []  # (membership, direction field)

    # corpus-callosum-like arcs in x-z planes, circle centre (0, ., -0.5), R 0.75
    R, zc = 0.75, -0.5
    rr = np.sqrt(x ** 2 + (z - zc) ** 2)
    d_cc = np.abs(rr - R) / 0.11
    m_cc = _sstep(d_cc - 1.0, 0.6) * _sstep(np.abs(y) / 0.45 - 1.0, 0.3) \
        * _sstep(np.abs(x) / 0.72 - 1.0, 0.3)
    dir_cc = _unit(np.stack([z - zc, np.zeros_like(x), -x], axis=-1))
    bundles.append((m_cc, dir_cc))

    # corticospinal-like columns: centre line x = +-(0.28 + 0.12 z), y = -0.05
    m_cst = np.zeros(shape)
    dir_cst = np.zeros(shape + (3,))
    for sx in (-1, 1):
        xc = sx * (0.28 + 0.12 * z)
        d = np.sqrt((x - xc) ** 2 + (y + 0.05) ** 2) / 0.11
        m = _sstep(d - 1.0, 0.6) * _sstep((z - 0.62) / 0.1, 1.0) \
            * _sstep((-0.85 - z) / 0.1, 1.0)
        sel = m > m_cst
        m_cst = np.where(sel, m, m_cst)
        dv = np.broadcast_to(np.array([sx * 0.12, 0.0, 1.0]), shape + (3,))
        dir_cst = np.where(sel[..., None], dv, dir_cst)
    # voxels outside both columns get a placeholder direction (membership 0)
    dir_cst = _unit(dir_cst + (dir_cst == 0).all(-1, keepdims=True) * np.array([0, 0, 1.0]))
    bundles.append((m_cst, dir_cst))

    # SLF-like A-P tubes, slightly bowed in z
    m_slf = np.zeros(shape)
    for sx in (-1, 1):
        zc_s = 0.13 + 0.10 * (1 - (y / 0.6) ** 2)
        d = np.sqrt((x - sx * 0.50) ** 2 + (z - zc_s) ** 2) / 0.10
        m = _sstep(d - 1.0, 0.6) * _sstep(np.abs(y) / 0.62 - 1.0, 0.3)
        m_slf = np.maximum(m_slf, m)
    dz = 0.10 * (-2 * y / 0.36)
    dir_slf = _unit(np.stack([np.zeros_like(x), np.ones_like(x), dz], axis=-1))
    bundles.append((m_slf, dir_slf))

    # cingulum-like A-P tubes above the CC
    m_cg = np.zeros(shape)
    for sx in (-1, 1):
        d = np.sqrt((x - sx * 0.10) ** 2 + (z - 0.33) ** 2) / 0.06
        m = _sstep(d - 1.0, 0.6) * _sstep(np.abs(y) / 0.55 - 1.0, 0.3)
        m_cg = np.maximum(m_cg, m)
    dir_cg = np.broadcast_to(np.array([0.0, 1.0, 0.0]), shape + (3,))
    bundles.append((m_cg, dir_cg))

    # radial background population ("corona radiata") fills what is left
    m_sum = m_cc + m_cst + m_slf + m_cg
    m_bg = np.clip(1.0 - m_sum, 0.0, 1.0)
    dir_bg = _unit(pos * np.array([1.0, 0.9, 1.1]) + 1e-6)
    bundles.append((m_bg, dir_bg))

    memb = np.stack([b[0] for b in bundles], axis=-1)
    memb = memb / np.maximum(memb.sum(-1, keepdims=True), 1e-12)
    dirs = np.stack([b[1] for b in bundles], axis=-2)   # (..., 5, 3)

    # smooth S0 texture (+-~4 %) and bias field (~0.88-1.12)
    tex = gaussian_filter(rng.standard_normal(shape), 2.0)
    tex = 1.0 + 0.04 * tex / max(tex.std(), 1e-12)
    bias = 1.0 + 0.12 * np.sin(0.9 * x + 0.3) * np.cos(0.7 * y - 0.2) + 0.05 * z

    return dict(csf=csf, gm=gm, wm=wm, f_brain=f_brain, memb=memb, dirs=dirs,
                tex=tex, bias=bias)


# ----------------------------------------------------------------------------
# signal
# ----------------------------------------------------------------------------
def _axes_set():
    """About 1450 fibre axes, one per antipodal pair (~4 degree spacing)."""
    from dipy.data import get_sphere

    sph = get_sphere(name="repulsion724").subdivide(n=1)
    v = sph.vertices
    keep = (v[:, 2] > 1e-9) | ((np.abs(v[:, 2]) <= 1e-9) & (v[:, 1] > 1e-9)) | \
           ((np.abs(v[:, 2]) <= 1e-9) & (np.abs(v[:, 1]) <= 1e-9) & (v[:, 0] > 0))
    return v[keep]


def _vec_to_angles(v):
    # multi_tensor takes (theta, phi) in degrees, DIPY's sphere2cart convention
    theta = np.degrees(np.arccos(np.clip(v[..., 2], -1, 1)))
    phi = np.degrees(np.arctan2(v[..., 1], v[..., 0]))
    return theta, phi


def _kernels(gtab, axes):
    """Unit-S0 single-fibre signal per axis, and the GM / CSF signals."""
    from dipy.sims.voxel import multi_tensor

    th, ph = _vec_to_angles(axes)
    E = np.empty((len(axes), len(gtab.bvals)))
    for i in range(len(axes)):
        E[i], _ = multi_tensor(gtab, WM_EVALS[None], S0=1.0, angles=[(th[i], ph[i])],
                               fractions=[100], snr=None)
    iso = {}
    for name, ev in (("gm", GM_EVALS), ("csf", CSF_EVALS)):
        iso[name], _ = multi_tensor(gtab, ev[None], S0=1.0, angles=[(0, 0)],
                                    fractions=[100], snr=None)
    return E, iso


def _nearest_axis(d, axes, chunk=200000):
    """Index of the axis closest (up to sign) to each direction in ``d``."""
    flat = d.reshape(-1, 3)
    out = np.empty(len(flat), dtype=np.int32)
    for i in range(0, len(flat), chunk):
        out[i:i + chunk] = np.argmax(np.abs(flat[i:i + chunk] @ axes.T), axis=1)
    return out


def _clean_signal(geo, gtab, s0, nvols):
    """Noise-free signal, ``(nvox, nvols)`` float32, plus what selftest needs."""
    axes = _axes_set()
    E, iso = _kernels(gtab, axes)

    shape = geo["csf"].shape
    nvox = int(np.prod(shape))
    csf = geo["csf"].reshape(-1)
    gm = geo["gm"].reshape(-1)
    wm = geo["wm"].reshape(-1)
    memb = geo["memb"].reshape(nvox, -1)
    nb = memb.shape[1]
    dirs = geo["dirs"].reshape(nvox, nb, 3)
    s0map = (s0 * geo["tex"] * geo["bias"]).reshape(-1)

    memb = np.where(memb < MIN_FIBRE_FRACTION, 0.0, memb)
    memb /= np.maximum(memb.sum(1, keepdims=True), 1e-12)
    ax_idx = np.stack([_nearest_axis(dirs[:, k], axes) for k in range(nb)], axis=1)

    head = (csf + gm + wm) > 1e-6
    clean = np.zeros((nvox, nvols), dtype=np.float32)
    idx = np.flatnonzero(head)
    chunk = 20000   # voxels at a time, to bound the float64 temporaries
    for i in range(0, len(idx), chunk):
        v = idx[i:i + chunk]
        s = (csf[v, None] * S0_REL["csf"]) * iso["csf"][None] + \
            (gm[v, None] * S0_REL["gm"]) * iso["gm"][None]
        wv = wm[v] * S0_REL["wm"]
        for k in range(nb):
            f = memb[v, k] * wv
            nz = f > 0
            if nz.any():
                s[nz] += f[nz, None] * E[ax_idx[v[nz], k]]
        clean[v] = (s * s0map[v, None]).astype(np.float32)
    extra = dict(axes=axes, memb=memb, ax_idx=ax_idx, s0map=s0map, wm=wm,
                 csf=csf, gm=gm)
    return clean, extra


def _selftest(clean, gtab, extra, n=20):
    """Max relative error of the kernel sum vs. a direct multi_tensor call."""
    from dipy.sims.voxel import multi_tensor

    memb, wm, axes, ax_idx, s0map = (extra[k] for k in
                                     ("memb", "wm", "axes", "ax_idx", "s0map"))
    cross = np.flatnonzero(((memb > 0).sum(1) >= 2) & (wm > 0.99))
    if len(cross) == 0:
        return len(cross), float("nan")
    pick = cross[np.linspace(0, len(cross) - 1, min(n, len(cross))).astype(int)]
    maxerr = 0.0
    for v in pick:
        ks = np.flatnonzero(memb[v] > 0)
        th, ph = _vec_to_angles(axes[ax_idx[v, ks]])
        S, _ = multi_tensor(gtab, np.tile(WM_EVALS, (len(ks), 1)),
                            S0=s0map[v] * S0_REL["wm"],
                            angles=list(zip(th, ph)),
                            fractions=list(100 * memb[v, ks]), snr=None)
        maxerr = max(maxerr, float(np.max(np.abs(S - clean[v])) / S.max()))
    return len(pick), maxerr


def _add_rician_noise(clean, snr, s0, seed):
    """Rician noise with ``sigma = s0 / snr``, chunked to bound memory."""
    from dipy.sims.voxel import add_noise

    nvox, nvols = clean.shape
    noisy = np.empty_like(clean)
    # A separate stream from the geometry's, so changing the geometry code
    # does not change the noise realisation.
    nrng = np.random.default_rng(seed + 1000)
    vchunk = max(1, 4_000_000 // nvols)
    for i in range(0, nvox, vchunk):
        noisy[i:i + vchunk] = add_noise(clean[i:i + vchunk].astype(np.float64),
                                        snr, s0, noise_type="rician",
                                        rng=nrng).astype(np.float32)
    return noisy


def make_phantom(shape=(81, 106, 76), nvols=160, nb0=10, shells=(2000.,), snr=25.,
                 seed=1, *, s0=1000., voxel_size=2.0, maps=False, selftest=False):
    """Simulate a noisy brain-like DWI phantom and its ground truth, in memory.

    Parameters
    ----------
    shape : tuple of 3 int, optional
        Grid shape; the brain scales with it.
    nvols : int, optional
        Total number of volumes, b0 included.
    nb0 : int or None, optional
        Number of b=0 volumes; None means ``max(1, round(nvols / 16))``.
    shells : sequence of float, optional
        b-values of the DW shells; DW volumes are split evenly over them.
    snr : float, optional
        ``s0 / sigma`` of the Rician noise.
    seed : int, optional
        Seeds the acquisition and geometry (``default_rng(seed)``) and the
        noise (``default_rng(seed + 1000)``); equal arguments give identical
        phantoms.
    s0 : float, optional
        Reference S0; tissue S0 is ``s0 * (WM 0.9, GM 1.05, CSF 1.35)``
        times a smooth bias field and texture.
    voxel_size : float, optional
        Isotropic voxel size in mm, for the affine.
    maps : bool, optional
        Also return ``tissue``: ``shape + (4,)`` float32 with the CSF, GM and
        WM fractions and the number of fibre populations (WM voxels).
    selftest : bool, optional
        Check the kernel-sum signal against a direct ``multi_tensor`` call on
        a few crossing-fibre voxels; the error goes into ``params``.

    Returns
    -------
    dict
        ``dwi`` (float32, ``shape + (nvols,)``, noisy), ``clean`` (float32,
        noise-free), ``mask`` (bool, brain fraction > 0.5), ``bvals``
        (``(nvols,)``), ``bvecs`` (``(nvols, 3)``, zero for b0), ``affine``
        (4 x 4), ``sigma`` (noise level) and ``params`` (a JSON-able summary);
        ``tissue`` too with ``maps=True``.

    Raises
    ------
    ImportError
        If DIPY is not installed.
    """
    _require_dipy()
    from dipy.core.gradients import gradient_table

    t0 = time.time()
    shape = tuple(int(s) for s in shape)
    nvols = int(nvols)
    if nb0 is None:
        nb0 = max(1, int(round(nvols / 16.0)))
    shells = [float(s) for s in shells]
    # One stream for acquisition then geometry, in that order: the order of
    # the draws is part of the phantom's definition.
    rng = np.random.default_rng(seed)

    bvals, bvecs = make_acquisition(nvols, nb0, shells, rng)
    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=50)
    geo = make_geometry(shape, rng)

    clean, extra = _clean_signal(geo, gtab, s0, nvols)
    check = _selftest(clean, gtab, extra) if selftest else None
    sigma = s0 / snr
    noisy = _add_rician_noise(clean, snr, s0, seed)

    mask = geo["f_brain"] > 0.5
    affine = np.diag([voxel_size] * 3 + [1.0])
    affine[:3, 3] = -np.array(shape) / 2.0 * voxel_size

    memb, wm = extra["memb"], extra["wm"]
    m = mask.reshape(-1)
    nfib_in = (memb[m & (wm > 0.5)] > 0).sum(1)
    params = dict(
        shape=list(shape), nvols=nvols, nb0=nb0, shells=shells, snr=snr,
        sigma=sigma, s0_ref=s0, seed=seed, voxel_size=voxel_size,
        b0_positions=np.flatnonzero(bvals == 0).tolist(),
        n_per_shell={str(b): int((bvals == b).sum()) for b in sorted(set(bvals))},
        mask_voxels=int(m.sum()), mask_fraction=float(m.mean()),
        wm_voxels_fibre_count={str(k): int((nfib_in == k).sum()) for k in (1, 2, 3, 4)},
        mean_b0_in_mask=float(clean[m][:, bvals == 0].mean()),
        wm_evals=WM_EVALS.tolist(), gm_evals=GM_EVALS.tolist(),
        csf_evals=CSF_EVALS.tolist(), s0_rel=S0_REL, n_axes=int(len(extra["axes"])),
    )
    if check is not None:
        params["selftest"] = dict(n_voxels=check[0], max_rel_err=check[1])
    params["seconds"] = round(time.time() - t0, 1)

    out = dict(dwi=noisy.reshape(shape + (nvols,)),
               clean=clean.reshape(shape + (nvols,)),
               mask=mask, bvals=bvals, bvecs=bvecs, affine=affine, sigma=sigma,
               params=params)
    if maps:
        nfib = ((memb > 0).sum(1) * (wm > 0.5)).astype(np.float32)
        out["tissue"] = np.stack([extra["csf"], extra["gm"], wm, nfib],
                                 axis=-1).reshape(shape + (4,)).astype(np.float32)
    return out


def write_phantom(out_dir, *, ext=".nii.gz", **kwargs):
    """Simulate a phantom with :func:`make_phantom` and write it to a folder.

    Files: ``dwi`` (noisy, float32), ``clean`` (ground truth, float32),
    ``mask`` (uint8) images with a 2 mm (``voxel_size``) isotropic affine;
    ``dwi.bval`` and ``dwi.bvec`` in FSL layout (one row of b-values; 3 rows
    of vector components, zeros for b0); ``params.json``; and ``tissue``
    with ``maps=True``.

    Parameters
    ----------
    out_dir : str or path-like
        Created if missing; existing files are overwritten.
    ext : {'.nii.gz', '.nii'}, optional
        Image file extension.
    **kwargs
        Passed to :func:`make_phantom`.

    Returns
    -------
    dict
        What :func:`make_phantom` returned.
    """
    import nibabel as nib

    ph = make_phantom(**kwargs)
    os.makedirs(out_dir, exist_ok=True)
    aff = ph["affine"]

    def save(arr, name, dtype):
        img = nib.Nifti1Image(arr.astype(dtype, copy=False), aff)
        img.header.set_data_dtype(dtype)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, os.path.join(out_dir, name + ext))

    save(ph["dwi"], "dwi", np.float32)
    save(ph["clean"], "clean", np.float32)
    save(ph["mask"], "mask", np.uint8)
    if "tissue" in ph:
        save(ph["tissue"], "tissue", np.float32)
    np.savetxt(os.path.join(out_dir, "dwi.bval"), ph["bvals"][None], fmt="%g")
    np.savetxt(os.path.join(out_dir, "dwi.bvec"), ph["bvecs"].T, fmt="%.6f")
    with open(os.path.join(out_dir, "params.json"), "w") as fh:
        json.dump(ph["params"], fh, indent=1)
    return ph


def _parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m p2s_dask.testing.phantom",
        description="Write a synthetic brain-like DWI phantom with its noise-free "
                    "ground truth (dwi, clean, mask images; dwi.bval, dwi.bvec; "
                    "params.json). Needs DIPY.")
    p.add_argument("--shape", type=int, nargs=3, default=[81, 106, 76],
                   metavar=("X", "Y", "Z"), help="grid shape (default 81 106 76)")
    p.add_argument("--nvols", type=int, default=160,
                   help="total number of volumes incl. b0 (default 160)")
    p.add_argument("--nb0", type=int, default=None,
                   help="number of b=0 volumes (default round(nvols/16), >=1)")
    p.add_argument("--shells", type=float, nargs="+", default=[2000.0],
                   help="b-values of the DWI shells; DW volumes split evenly "
                        "(default 2000)")
    p.add_argument("--snr", type=float, default=25.0,
                   help="SNR = S0_ref / sigma (default 25)")
    p.add_argument("--s0", type=float, default=1000.0,
                   help="reference S0 (default 1000); tissue S0 = s0 * "
                        "(WM 0.9, GM 1.05, CSF 1.35) * bias * texture")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--voxel-size", type=float, default=2.0,
                   help="voxel size in mm for the affine (default 2.0)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ext", default=".nii.gz", choices=[".nii.gz", ".nii"],
                   help="image file extension (default .nii.gz)")
    p.add_argument("--save-maps", action="store_true",
                   help="also save tissue images (csf, gm, wm, n_fibres)")
    p.add_argument("--selftest", action="store_true",
                   help="check kernel-sum signal == direct multi_tensor on a "
                        "few crossing voxels")
    return p.parse_args(argv)


def main(argv=None):
    """Command-line entry point; prints the phantom's parameters as JSON."""
    a = _parse_args(argv)
    ph = write_phantom(a.out, ext=a.ext, shape=a.shape, nvols=a.nvols, nb0=a.nb0,
                       shells=a.shells, snr=a.snr, seed=a.seed, s0=a.s0,
                       voxel_size=a.voxel_size, maps=a.save_maps,
                       selftest=a.selftest)
    st = ph["params"].get("selftest")
    if st is not None:
        print(f"selftest: {st['n_voxels']} crossing voxels, max rel err vs "
              f"multi_tensor = {st['max_rel_err']:.2e}")
    print(json.dumps(ph["params"]))


if __name__ == "__main__":
    main()
