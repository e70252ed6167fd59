"""A run's QC from its merged summaries: residual statistics, flagged volumes.

:func:`finish` turns the merged :class:`~.summaries.QcParts` of every block
into a :class:`QcResult`: the residual RMS per volume and per volume and
slice, the noise map, the histogram's sample, the mosaics' slices and the
volumes flagged by :func:`flag_volumes`. Plain NumPy.

The flag rule compares each volume with the other volumes of its shell in its
group (volumes regressed together with about the same b-value, and so about
the same residual level: a b=1000 volume leaves larger residuals than a
b=2000 one, whose signal is lower), slice by slice: a dropped or darkened
slice leaves a residual the size of the signal in that slice of that volume
only, far above what the shell's other volumes leave in the same slice. A
robust z-score (median and MAD over the shell's volumes) and a ratio to the
median must both be large (see :func:`flag_volumes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .summaries import (FLAG_MIN_VOLUMES, FLAG_RATIO, FLAG_SLICE_RATIO, FLAG_Z, MAD_FLOOR,
                        MAD_TO_SIGMA, SHELL_ROUNDING, QcParts, QcSpec)

# a slice whose median residual RMS is below this share of the group's
# typical volume RMS is compared with that floor instead (slices of zeros)
QUIET_SLICE = 1e-3


@dataclass
class QcResult:
    """What the report shows of one run.

    Attributes
    ----------
    bvals : ndarray (n,)
    groups : list of (name, indices, denoised)
    rms_volume : ndarray (n,)
        Residual RMS of each volume.
    rms_slice : ndarray (n, z)
        Residual RMS of each volume in each axial slice (NaN: no voxel).
    noise : ndarray (x, y, z) float32
        The residuals' RMS over the noise volumes, per voxel.
    noise_volumes : tuple of int
    sample : ndarray float32
        Residuals sampled uniformly over the image and the denoised volumes.
    slices : tuple of int
        The axial slices of the mosaics.
    mosaics : dict
        ``{volume: (original, denoised)}``, each ``(x, y, len(slices))``.
    flagged : list of dict
        See :func:`flag_volumes`.
    """

    bvals: np.ndarray
    groups: list
    rms_volume: np.ndarray
    rms_slice: np.ndarray
    noise: np.ndarray
    noise_volumes: tuple
    sample: np.ndarray
    slices: tuple
    mosaics: dict = field(default_factory=dict)
    flagged: list = field(default_factory=list)

    @property
    def flagged_volumes(self) -> list:
        """The flagged volumes' indices (0-based, in the order of the b-values)."""
        return [f["volume"] for f in self.flagged]

    def as_json(self) -> dict:
        """The numbers of the report as JSON-ready data (``--report-json``)."""
        return {"flagged_volumes": self.flagged_volumes, "flagged": self.flagged,
                "rms_per_volume": [round(float(v), 6) for v in self.rms_volume],
                "noise_volumes": list(self.noise_volumes),
                "noise_median": float(np.median(self.noise)) if self.noise.size else 0.0,
                "residual_mean": float(self.sample.mean()) if self.sample.size else 0.0,
                "residual_std": float(self.sample.std()) if self.sample.size else 0.0,
                "flag_rule": {"z": FLAG_Z, "slice_ratio": FLAG_SLICE_RATIO,
                              "volume_ratio": FLAG_RATIO, "min_volumes": FLAG_MIN_VOLUMES}}


def finish(parts: QcParts, spec: QcSpec, bvals, groups) -> QcResult:
    """The :class:`QcResult` of the merged summaries of every block.

    Parameters
    ----------
    parts : QcParts
        All blocks merged (:func:`~.summaries.merge`).
    spec : QcSpec
    bvals : array-like (n,)
    groups : list of Group

    Returns
    -------
    QcResult
    """
    x, y, z, n = spec.shape
    sq = np.zeros((n, z))
    voxels = np.zeros(z, np.int64)
    sq[:, parts.z0:parts.z0 + parts.sq.shape[1]] = parts.sq
    voxels[parts.z0:parts.z0 + parts.voxels.size] = parts.voxels
    with np.errstate(invalid="ignore", divide="ignore"):
        rms_slice = np.where(voxels > 0, np.sqrt(sq / np.maximum(voxels, 1)), np.nan)
    rms_volume = np.sqrt(sq.sum(axis=1) / max(1, int(voxels.sum())))
    # in NIfTI's (Fortran) order, so that it is written without a copy; each
    # piece is let go once placed: the map and its pieces are never all held
    noise = np.zeros((x, y, z), np.float32, order="F")
    while parts.noise:
        origin, piece = parts.noise.pop()
        noise[tuple(slice(o, o + s) for o, s in zip(origin, piece.shape))] = piece
    sample = np.concatenate(parts.sample) if parts.sample else np.zeros(0, np.float32)
    spec_groups = [(g.name, tuple(int(i) for i in g.indices), bool(g.denoise)) for g in groups]
    result = QcResult(np.asarray(bvals, float), spec_groups, rms_volume, rms_slice, noise,
                      spec.noise_volumes, sample, spec.slices, _mosaics(parts, spec))
    result.flagged = flag_volumes(rms_slice, rms_volume, comparison_sets(spec_groups, bvals),
                                  result.bvals)
    return result


def comparison_sets(groups, bvals) -> list:
    """``(name, indices)`` of the volumes compared with each other: the
    shells (b-values rounded to :data:`~.summaries.SHELL_ROUNDING`) of each
    denoised group."""
    shells = np.round(np.asarray(bvals, float) / SHELL_ROUNDING) * SHELL_ROUNDING
    sets = []
    for name, indices, denoised in groups:
        if not denoised:
            continue
        idx = np.asarray(indices, int)
        for b in np.unique(shells[idx]):
            sets.append((f"{name}, b={b:g}", tuple(int(v) for v in idx[shells[idx] == b])))
    return sets


def _mosaics(parts: QcParts, spec: QcSpec) -> dict:
    x, y = spec.shape[:2]
    k = len(spec.slices)
    where = {s: i for i, s in enumerate(spec.slices)}
    out = {v: (np.zeros((x, y, k), np.float32), np.zeros((x, y, k), np.float32))
           for v in spec.mosaic_volumes}
    for v, s, x0, y0, original, denoised in parts.pieces:
        region = (slice(x0, x0 + original.shape[0]), slice(y0, y0 + original.shape[1]),
                  where[s])
        out[v][0][region] = original
        out[v][1][region] = denoised
    return out


def robust_scores(values: np.ndarray, floor: float):
    """Robust z-scores and ratios to the median of ``values`` along axis 0.

    Parameters
    ----------
    values : ndarray (m, k)
        One row per volume of a group (NaN: not measured).
    floor : float
        The smallest median (and so MAD scale) a column is given.

    Returns
    -------
    (ndarray, ndarray)
        ``(values - median) / (1.4826 MAD)`` and ``values / median``, with
        the median at least ``floor`` and the MAD scale at least
        :data:`~.summaries.MAD_FLOOR` times the median.
    """
    with np.errstate(invalid="ignore"):
        med = np.maximum(np.nanmedian(values, axis=0), floor)
        mad = np.nanmedian(np.abs(values - med), axis=0)
        scale = np.maximum(MAD_TO_SIGMA * mad, MAD_FLOOR * med)
        return (values - med) / scale, values / med


def flag_volumes(rms_slice, rms_volume, sets, bvals=None) -> list:
    """The volumes whose residuals stand out from those of their set.

    Two tests, each over a set (:func:`comparison_sets`) of at least
    :data:`~.summaries.FLAG_MIN_VOLUMES` volumes, each needing a robust
    z-score above :data:`~.summaries.FLAG_Z` (median and MAD over the set's
    volumes) and a ratio to the median:

    * a slice: the volume's residual RMS in the slice over its RMS in the
      whole volume (its slice profile, which a volume's overall residual level
      does not move: gradient directions along a bundle leave larger residuals
      everywhere), more than :data:`~.summaries.FLAG_SLICE_RATIO` times the
      set's median profile in that slice;
    * the volume: its residual RMS more than
      :data:`~.summaries.FLAG_RATIO` times the set's median.

    Parameters
    ----------
    rms_slice : ndarray (n, z)
    rms_volume : ndarray (n,)
    sets : list of (name, indices)
    bvals : ndarray (n,), optional

    Returns
    -------
    list of dict
        One per flagged volume, in volume order: ``volume``, ``bval``,
        ``group`` (its set), ``slices`` (the flagged slices), ``z`` and
        ``ratio`` (of its most outlying slice, or of the volume).
    """
    flags = []
    with np.errstate(invalid="ignore", divide="ignore"):
        profile = rms_slice / rms_volume[:, None]
    for name, indices in sets:
        idx = list(indices)
        if len(idx) < FLAG_MIN_VOLUMES:
            continue
        z_s, r_s = robust_scores(profile[idx], QUIET_SLICE)
        z_v, r_v = robust_scores(rms_volume[idx][:, None],
                                 QUIET_SLICE * float(np.median(rms_volume[idx])))
        with np.errstate(invalid="ignore"):
            bad_s = (z_s > FLAG_Z) & (r_s > FLAG_SLICE_RATIO)
            bad_v = (z_v[:, 0] > FLAG_Z) & (r_v[:, 0] > FLAG_RATIO)
        for i, v in enumerate(idx):
            if bad_s[i].any() or bad_v[i]:
                flags.append(_flag(v, name, bvals, (bad_s[i], z_s[i], r_s[i]),
                                   (z_v[i, 0], r_v[i, 0])))
    return sorted(flags, key=lambda f: f["volume"])


def _flag(v, name, bvals, by_slice, whole) -> dict:
    """One flagged volume's entry (see :func:`flag_volumes`): ``by_slice``
    is (flagged, z-scores, ratios) of its slices, ``whole`` (z-score, ratio)
    of the volume."""
    bad, z_slices, r_slices = by_slice
    slices = [int(s) for s in np.flatnonzero(bad)]
    if slices:
        worst = slices[int(np.argmax(z_slices[slices]))]
        z, ratio = z_slices[worst], r_slices[worst]
    else:
        z, ratio = whole
    return {"volume": int(v), "group": name,
            "bval": None if bvals is None else float(bvals[v]), "slices": slices,
            "z": round(float(z), 2), "ratio": round(float(ratio), 3)}
