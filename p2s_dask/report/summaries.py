"""Per-block QC summaries of the residuals, their merge, and the flag rule.

The residual of a voxel and volume is the input value minus the output value
as written (after the shift, the clip, the cast and the output's
``scl_slope``). Each prediction task summarises its own block here, from the
block it has read and the values it has just predicted, so the report costs
no pass over the data of its own; what a task returns is small whatever the
data's size:

* per volume and per axial slice, the sum of squared residuals (``n x cz``)
  and, per slice, the voxels counted;
* the block's part of the noise map (the residuals' RMS over the diffusion
  volumes, one value per voxel: 1/n-th of a block of n volumes);
* a sample of residuals for the histogram, a fixed share of the block, so that
  all blocks together give about :data:`SAMPLE_SIZE` values;
* the block's part of the few axial slices shown in the mosaics, input and
  output, for a b0 and one volume per shell.

Blocks merge exactly (sums add, pieces are kept), in any order, so Dask
reduces them in a tree and a resumed run adds the summaries that earlier
tasks saved beside their output. Plain NumPy: no Dask, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# residuals kept for the histogram, over the whole image
SAMPLE_SIZE = 100_000
# axial slices shown in the mosaics and the noise map
MOSAIC_SLICES = 5
# shells shown in the mosaics (the ones with the most volumes), besides a b0
MOSAIC_SHELLS = 6
# b-values are shells when they round to the same multiple of this
SHELL_ROUNDING = 100.0

# the flag rule (see .results.flag_volumes): a volume is flagged when its
# residual RMS in one slice (relative to its whole volume's), or its residual
# RMS, is both this many robust standard deviations above the median of its
# shell's volumes ...
FLAG_Z = 6.0
# ... and this many times that median, in a slice (tuned on phantoms: clean
# ones reach 1.23 at most; a slice set to zero or to half gives 1.3 to 10) ...
FLAG_SLICE_RATIO = 1.3
# ... or for the whole volume (the volumes of a clean shell differ by up to
# 1.6 with the gradient direction; a set whose volumes agree closely has a
# tiny MAD: the ratio keeps ordinary variation from being flagged)
FLAG_RATIO = 1.75
# a shell of fewer volumes has no median and MAD worth the name (the five b0
# of the bundled acquisition, one taken at the start and four at the end,
# differ by 40% in some slices): nothing of it is flagged
FLAG_MIN_VOLUMES = 8
# the MAD is floored at this share of the median (a slice of identical
# residuals, e.g. all zero outside the head, has a MAD of 0)
MAD_FLOOR = 0.01
# 1 / Phi^-1(3/4): the MAD of a normal sample times this is its sigma
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class QcSpec:
    """What every block summarises, decided once from the header.

    Attributes
    ----------
    shape : tuple of 4 ints
        ``(x, y, z, volumes)``.
    radius : tuple of 3 ints
        The halo around each block (its interior is summarised).
    noise_volumes : tuple of int
        The volumes whose residuals make the noise map.
    sampled : tuple of int
        The volumes whose residuals are sampled for the histogram.
    mosaic_volumes : tuple of int
        The volumes shown (a b0, then one per shell).
    slices : tuple of int
        The axial slices shown.
    seed : int
        Of the histogram's sample (the same residuals on every run).
    """

    shape: tuple
    radius: tuple
    noise_volumes: tuple
    sampled: tuple
    mosaic_volumes: tuple
    slices: tuple
    seed: int = 0

    @property
    def sample_rate(self) -> float:
        """The share of sampled residuals that each block keeps."""
        total = float(np.prod(self.shape[:3])) * max(1, len(self.sampled))
        return min(1.0, SAMPLE_SIZE / total)


def shells_of(bvals, b0_threshold) -> dict:
    """``{shell b-value: volume indices}`` of the diffusion volumes."""
    bvals = np.asarray(bvals, float)
    out = {}
    for v in np.flatnonzero(bvals > b0_threshold):
        shell = float(np.round(bvals[v] / SHELL_ROUNDING) * SHELL_ROUNDING)
        out.setdefault(shell, []).append(int(v))
    return out


def make_spec(shape, bvals, groups, b0_threshold, radius=(0, 0, 0)) -> QcSpec:
    """The :class:`QcSpec` of a run.

    Parameters
    ----------
    shape : tuple of 4 ints
    bvals : array-like (n,)
    groups : list of Group
        The run's groups; a volume passed through has no residual.
    b0_threshold : float
    radius : tuple of 3 ints

    Returns
    -------
    QcSpec
    """
    bvals = np.asarray(bvals, float)
    denoised = sorted(int(v) for g in groups if g.denoise for v in g.indices)
    dwi = [v for v in denoised if bvals[v] > b0_threshold]
    # the noise map is over the diffusion volumes; without any (a b0-only
    # run), over what was denoised, and failing that over every volume
    noise = dwi or denoised or list(range(int(shape[3])))
    b0 = [int(v) for v in np.flatnonzero(bvals <= b0_threshold)]
    shells = shells_of(bvals, b0_threshold)
    biggest = sorted(shells, key=lambda s: (-len(shells[s]), s))[:MOSAIC_SHELLS]
    shown = b0[:1] + [shells[s][0] for s in sorted(biggest)]
    z = int(shape[2])
    slices = np.unique(np.round(np.linspace(0.2 * (z - 1), 0.8 * (z - 1), MOSAIC_SLICES)))
    return QcSpec(tuple(int(s) for s in shape), tuple(int(r) for r in radius), tuple(noise),
                  tuple(denoised), tuple(shown), tuple(int(s) for s in slices))


@dataclass
class QcParts:
    """Summaries of some blocks (one, or many merged).

    Attributes
    ----------
    z0 : int
        The first slice that ``sq`` and ``voxels`` cover.
    sq : ndarray (n, slices) float64
        Sums of squared residuals per volume and slice.
    voxels : ndarray (slices,) int64
        Voxels summed per slice (the same for every volume).
    noise : list of (origin, ndarray)
        Pieces of the noise map: the corner ``(x, y, z)`` and float32 values.
    sample : list of ndarray
        Residuals for the histogram (float32).
    pieces : list of (volume, slice, x0, y0, original, denoised)
        Parts of the mosaics' slices (float32, 2D).
    """

    z0: int
    sq: np.ndarray
    voxels: np.ndarray
    noise: list = field(default_factory=list)
    sample: list = field(default_factory=list)
    pieces: list = field(default_factory=list)


def _interior(block, radius):
    return block[tuple(slice(r, block.shape[i] - r) for i, r in enumerate(radius))]


def _sample_positions(spec: QcSpec, origin, inner_shape):
    """The block's sample: positions ``(x, y, z, sampled volume)`` in the
    block, the same whatever the order the blocks run in, sorted by slice
    then ``x`` (so that each strip of :func:`block_qc` finds its own with a
    binary search); with their sort keys ``z * cx + x``."""
    cx, cy, cz = (int(s) for s in inner_shape[:3])
    size = cx * cy * cz * len(spec.sampled)
    k = min(size, int(np.ceil(spec.sample_rate * size)))
    rng = np.random.default_rng([spec.seed, *(int(o) for o in origin)])
    flat = rng.choice(size, size=k, replace=False) if k else np.zeros(0, np.int64)
    x, y, z, which = np.unravel_index(flat, (cx, cy, cz, len(spec.sampled)))
    keys = z * cx + x
    order = np.argsort(keys, kind="stable")
    return keys[order], np.stack([x, y, which])[:, order]


# bytes of float64 residuals a task holds at a time (a strip of one slice)
STRIP_BYTES = 1 << 20


def block_qc(block, out, origin, spec: QcSpec, slope=1.0) -> QcParts:
    """The :class:`QcParts` of one block.

    Parameters
    ----------
    block : ndarray (x, y, z, n)
        The input block as the prediction read it (with its halo).
    out : ndarray
        The block's output values as cast for the output (its interior).
    origin : tuple of 3 ints
        The interior's first voxel in the image.
    spec : QcSpec
    slope : float
        The output's ``scl_slope`` (values written are ``out * slope``).

    Returns
    -------
    QcParts
    """
    inner = _interior(block, spec.radius)
    cx, cy, cz, n = inner.shape
    weights = np.zeros(n)
    weights[list(spec.noise_volumes)] = 1.0 / len(spec.noise_volumes)
    sample = _sample_positions(spec, origin, inner.shape)
    parts = QcParts(int(origin[2]), np.zeros((n, cz)), np.full(cz, cx * cy, np.int64))
    noise = np.empty((cx, cy, cz), np.float32)
    how = (sample, weights, np.asarray(spec.sampled, np.int64), slope)
    volume_major = inner.strides[3] > inner.strides[0]
    # strips of a slice, all volumes: a bounded float64 copy in either layout
    step = max(1, STRIP_BYTES // (cy * n * 8))
    for z in range(cz):
        if volume_major:  # whole planes, a few volumes at a time: contiguous reads
            _plane(parts, noise, (inner, out), z, how)
        else:
            for x0 in range(0, cx, step):
                strip = (slice(x0, min(cx, x0 + step)), slice(None), z)
                _strip(parts, noise, (inner[strip], out[strip]), (z, x0, cx), how)
        _mosaic_pieces(parts, inner, out, origin, z, spec, slope)
    parts.noise.append((tuple(int(o) for o in origin), noise))
    return parts


def _strip(parts, noise, values, where, how):
    """Add one strip of a slice to ``parts`` and ``noise``: ``values`` are
    its input and output (x, y, volumes), ``where`` is ``(z, x0, cx)``,
    ``how`` is ``(sample, weights, sampled volumes, slope)``."""
    (inp, out), (z, x0, cx) = values, where
    sample, weights, sampled, slope = how
    r = _slice_residuals(inp, out, slope)
    k, cy, n = r.shape
    # (voxels, volumes) in the strip's own layout: a view, no copy
    order = "F" if r.flags.f_contiguous else "C"
    r2 = np.square(r.reshape(k * cy, n, order=order))
    parts.sq[:, z] += r2.sum(axis=0, dtype=np.float64)
    noise[x0:x0 + k, :, z] = np.sqrt(r2 @ weights.astype(r2.dtype)).reshape(k, cy, order=order)
    keys, (xs, ys, which) = sample
    lo, hi = np.searchsorted(keys, [z * cx + x0, z * cx + x0 + k])
    if hi > lo:
        picked = sampled[which[lo:hi]]
        parts.sample.append(r[xs[lo:hi] - x0, ys[lo:hi], picked].astype(np.float32))


def _plane(parts, noise, values, z, how):
    """Slice ``z`` of a volume-major block: its (x, y) planes, a few volumes
    at a time (each plane is contiguous there, where a strip along x of all
    volumes would read a few values per cache line)."""
    (inp, out), (sample, weights, sampled, slope) = values, how
    cx, cy, _, n = inp.shape
    dtype = _residual_dtype(inp, out)
    step = max(1, STRIP_BYTES // (cx * cy * dtype.itemsize))
    # one buffer for every group of planes: no allocation per step
    buf = np.empty((cx, cy, min(n, step)), dtype, order="F")
    acc = np.zeros(cx * cy)
    for v0 in range(0, n, step):
        v1 = min(n, v0 + step)
        r = _slice_residuals(inp[:, :, z, v0:v1], out[:, :, z, v0:v1], slope,
                             buf[:, :, :v1 - v0])
        r2 = np.square(r, out=r).reshape(cx * cy, v1 - v0, order="F")
        parts.sq[v0:v1, z] += r2.sum(axis=0, dtype=np.float64)
        acc += r2 @ weights[v0:v1].astype(dtype)
    noise[:, :, z] = np.sqrt(acc).reshape(cx, cy, order="F")
    keys, (xs, ys, which) = sample
    lo, hi = np.searchsorted(keys, [z * cx, (z + 1) * cx])
    if hi > lo:
        idx = (xs[lo:hi], ys[lo:hi], z, sampled[which[lo:hi]])
        parts.sample.append(_slice_residuals(inp[idx], out[idx], slope).astype(np.float32))


def _residual_dtype(inp, out) -> np.dtype:
    """float32 where both sides' values are float32 numbers (float32 data,
    16-bit integers): residuals, squares and their sums over a few volumes
    in float32 are 2.3x faster than in float64 (the report's cost on an
    HCP-sized run) and within 1e-6 of them, the sums over voxels are kept in
    float64; float64 for anything wider."""
    narrow = all(np.can_cast(a.dtype, np.float32, "safe") for a in (inp, out))
    return np.dtype(np.float32 if narrow else np.float64)


def _slice_residuals(inp, out, slope, into=None):
    """Input minus output values of one slice of all volumes, in the block's
    layout (one copy: one slice at a time keeps it small), into ``into`` if
    given, else a new array of :func:`_residual_dtype`."""
    dtype = into.dtype if into is not None else _residual_dtype(inp, out)
    if slope != 1.0:
        out = np.multiply(out, slope, dtype=dtype)
    return np.subtract(inp, out, out=into, dtype=dtype)


def _mosaic_pieces(parts, inner, out, origin, z, spec, slope):
    """The block's part of slice ``origin z + z`` of each shown volume."""
    if int(origin[2]) + z not in spec.slices:
        return
    for v in spec.mosaic_volumes:
        # copies: a view would keep the whole block alive until the report
        parts.pieces.append((int(v), int(origin[2]) + z, int(origin[0]), int(origin[1]),
                             np.array(inner[:, :, z, v], np.float32),
                             (np.asarray(out[:, :, z, v], np.float64) * slope
                              ).astype(np.float32)))


def merge(*items: QcParts) -> QcParts:
    """The union of some summaries (a new object: the items are unchanged).

    Sums add over the slices each covers; pieces and samples are kept.
    """
    z0 = min(p.z0 for p in items)
    z1 = max(p.z0 + p.sq.shape[1] for p in items)
    n = items[0].sq.shape[0]
    sq = np.zeros((n, z1 - z0))
    voxels = np.zeros(z1 - z0, np.int64)
    merged = QcParts(z0, sq, voxels)
    for p in items:
        sl = slice(p.z0 - z0, p.z0 - z0 + p.sq.shape[1])
        sq[:, sl] += p.sq
        voxels[sl] += p.voxels
        merged.noise += p.noise
        merged.sample += p.sample
        merged.pieces += p.pieces
    return merged


def to_arrays(parts: QcParts) -> dict:
    """One block's summaries as plain arrays (for the work store's ``.npz``,
    read back without pickle by :func:`from_arrays`)."""
    (origin, noise), = parts.noise
    index = np.array([p[:4] for p in parts.pieces], np.int64).reshape(-1, 4)
    shape = noise.shape[:2]
    original = np.array([p[4] for p in parts.pieces], np.float32).reshape(-1, *shape)
    denoised = np.array([p[5] for p in parts.pieces], np.float32).reshape(-1, *shape)
    sample = np.concatenate(parts.sample) if parts.sample else np.zeros(0, np.float32)
    return {"z0": np.array(parts.z0), "sq": parts.sq, "voxels": parts.voxels,
            "origin": np.array(origin, np.int64), "noise": noise, "sample": sample,
            "piece_index": index, "piece_original": original, "piece_denoised": denoised}


def from_arrays(arrays: dict) -> QcParts:
    """The :class:`QcParts` that :func:`to_arrays` wrote."""
    pieces = [(*map(int, idx), o, d) for idx, o, d in
              zip(arrays["piece_index"], arrays["piece_original"], arrays["piece_denoised"])]
    return QcParts(int(arrays["z0"]), np.asarray(arrays["sq"], np.float64),
                   np.asarray(arrays["voxels"], np.int64),
                   [(tuple(int(o) for o in arrays["origin"]), arrays["noise"])],
                   [arrays["sample"]], pieces)
