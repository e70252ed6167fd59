"""Exact K-fold cross-validation of the patch radius and the ridge penalty.

Statistics add over voxels, so the fitting voxels are split into ``K`` spatial
folds (whole blocks or slabs) and each fold's ``(N_k, mu_k, S_k)`` is kept
besides the total. For fold ``k`` the training statistics are the total minus
the fold (:func:`unmerge`, the Chan merge reversed), from which volume ``v``'s
leave-one-volume-out fit ``c, b`` follows as in :mod:`.solve`. Its squared
error on the held-out fold is a quadratic form in the fold's own statistics:
with ``a = [-c; 1]`` over the features ``K + t``,

    E_k(v) = a^T S_k[K+t, K+t] a + N_k (mu_k[t] - mu_k[K] . c - b)^2,

exact, with no pass over the data. The sum over folds and over a group's
volumes is the K-fold error of one *setting* (radius, model, penalty). The
features of a radius ``r <= R`` are a sub-block of radius ``R``'s (the offsets
with ``|d_i| <= r_i``, :func:`sub_features`), so one radius-``R`` statistics
pass scores every smaller radius, and for ridge one eigendecomposition of a
training matrix serves the whole penalty grid.

No leakage: volume ``v``'s model never sees volume ``v`` among its features, so
a held-out target's noise never enters training, even where patches straddle
folds (J-invariance, as in Noise2Self). Whole slabs also keep spatially
correlated noise (parallel imaging, interpolation) from linking a held-out
voxel to its training neighbours. The K-fold error estimates the error against
the noise-free signal plus the noise variance, so it ranks settings as the
truth does, with one caveat. Patch2Self denoises the very voxels it fits (each voxel's own
target is in its model's fit), and the variance such an in-sample prediction
carries is about ``sigma^2 p / N`` for ``p`` regressors, where a held-out
voxel's is about ``sigma^2 p / (N_train - p)``. With many fitting voxels per
regressor (real data: ``N`` in the hundreds of thousands, ``p`` in the
thousands) the two agree; with few (a small image or mask, many volumes,
``r = 1``) the K-fold error overstates the cost of the larger model, and the
choice leans to the smaller radius or the larger penalty. Each row of the
table carries ``regressors`` and the table ``train_voxels`` (the smallest
training set) so a caller can see that ratio.

Entry points
------------
- folds: :func:`slab_folds` (a fold label per voxel, for in-memory data and
  tests), :func:`block_folds` (a fold per block of a chunk grid, for a run),
  :func:`merge_by_fold`, :func:`fold_statistics` (in-memory reference);
- statistics: :func:`unmerge`, :func:`sub_features`;
- settings: :class:`Setting`, :func:`candidate_radii`, :func:`penalty_grid`;
- scores: :func:`score_group` (one group's fold statistics), :func:`score`
  (all groups), :func:`choose` (the setting with the least error). Every
  result is plain data (``json.dumps`` takes it).

How a run uses it
-----------------
1. The statistics pass runs at the largest radius ``R`` the user allows. Each
   block gets its fold from :func:`block_folds` of the plan's chunk grid (by
   block index along z: whole z-slabs of blocks, interleaved, so every fold
   spans the brain); the tree (or a lane) merges per fold instead of into one
   total: a ``Summary`` holds ``K`` statistics per group where it held one
   (:func:`merge_by_fold` is the same reduction for a plain list of
   ``(fold, Stats)``). With lag statistics, keep ``K`` lag sums and form a
   fold's ``F x F`` only while it is scored: :func:`score_group` takes
   zero-argument callables for the folds and the merged ``total`` directly.
2. :func:`score` of the groups' fold statistics, then :func:`choose` (one
   radius for all groups, as the API has one ``patch_radius``; the penalty
   per group, or one shared absolute penalty with ``shared_penalty=True``).
3. The chosen setting's fit is the ordinary solve of the total statistics of
   its radius: ``total.subset(sub_features(R, r, m))`` and
   :func:`.solve.fit` — no second statistics pass. The table goes into the
   run's report as it is.

Plain NumPy/SciPy; no Dask and no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas

from .lagstats import lag_block_stats, lags_pay_off
from .patches import patch_offsets, patch_size
from .solve import OLS_LAMBDA, RCOND_MIN, fit_ridge
from .stats import Stats, block_stats, merge, merge_all

DEFAULT_FOLDS = 5
# ridge penalties relative to the scatter's scale (see penalty_grid)
PENALTY_EXPONENTS = tuple(range(-6, 1))
# errors within this fraction of the best are ties (rounding), settled for the
# simpler setting
TIE_RTOL = 1e-9
# with more penalties than this per training matrix, one eigendecomposition
# serves them all; with fewer, each penalty is one solve.fit_ridge. Measured
# on one thread (r = 1, 87 volumes, F = 2349): the eigendecomposition 1.87 s,
# then 0.06 s a penalty, against 0.37 s a fit_ridge: even at about 6
# penalties (F = 1080: 4.4); the default grid and 'ols' are 8
EIGEN_MIN_PENALTIES = 5


# -- folds ---------------------------------------------------------------------

def slab_folds(shape, n_folds: int = DEFAULT_FOLDS, slab: int = 1, axis: int = 2) -> np.ndarray:
    """Fold label of every voxel: slabs of ``slab`` planes, dealt in turn.

    Plane ``i`` along ``axis`` is in fold ``(i // slab) % n_folds``, so every
    fold spans the whole field of view (interleaved slabs) and holds about
    the same number of voxels.

    Parameters
    ----------
    shape : tuple of 3 int
        Spatial shape of the image.
    n_folds : int
    slab : int
        Planes per slab.
    axis : int
        Axis the slabs are stacked along (2: z, NIfTI's slowest axis).

    Returns
    -------
    ndarray of int, shape ``shape``
    """
    if n_folds < 2 or slab < 1:
        raise ValueError(f"need n_folds >= 2 and slab >= 1, got {n_folds} and {slab}")
    plane = (np.arange(int(shape[axis])) // slab) % n_folds
    view = [1, 1, 1]
    view[axis] = -1
    return np.broadcast_to(plane.reshape(view), tuple(int(s) for s in shape)).copy()


def block_folds(numblocks, n_folds: int = DEFAULT_FOLDS, axis: int = 2) -> np.ndarray:
    """Fold of every block of a chunk grid (a fold is a set of whole blocks).

    Blocks are dealt by their index along ``axis`` when the grid has at least
    ``n_folds`` blocks that way (whole slabs of blocks); otherwise by their
    C-order index, so a grid of few z-blocks still gives ``n_folds`` folds.

    Parameters
    ----------
    numblocks : tuple of 3 int
        Blocks along each spatial axis (dask's ``numblocks[:3]``).
    n_folds : int
    axis : int

    Returns
    -------
    ndarray of int, shape ``numblocks``
    """
    numblocks = tuple(int(n) for n in numblocks[:3])
    if int(np.prod(numblocks)) < n_folds:
        raise ValueError(f"{int(np.prod(numblocks))} blocks cannot make {n_folds} folds")
    if numblocks[axis] >= n_folds:
        return slab_folds(numblocks, n_folds, 1, axis)
    return np.arange(int(np.prod(numblocks))).reshape(numblocks) % n_folds


def merge_by_fold(items, n_folds: int, n_features: int) -> list[Stats]:
    """Merge ``(fold, Stats)`` pairs into one :class:`Stats` per fold."""
    folds = [Stats.empty(n_features) for _ in range(n_folds)]
    for k, st in items:
        folds[k] = merge(folds[k], st)
    return folds


def _boxes(shape, chunks):
    """The boxes of a chunk grid over ``shape`` (the whole image if None)."""
    chunks = shape if chunks is None else chunks
    starts = [range(0, s, c) for s, c in zip(shape, chunks)]
    for x0 in starts[0]:
        for y0 in starts[1]:
            for z0 in starts[2]:
                yield tuple(slice(a, min(a + c, s)) for a, c, s in
                            zip((x0, y0, z0), chunks, shape))


def _stats(block, radius, mask):
    """The core's statistics of a block: lag products where they pay off."""
    if lags_pay_off(block.shape[-1], radius, mask is not None):
        return lag_block_stats(block, radius, mask)
    return block_stats(block, radius, mask)


def fold_statistics(data: np.ndarray, radius, folds: np.ndarray,
                    mask: np.ndarray | None = None, chunks=None) -> list[Stats]:
    """Statistics of each fold's fitting voxels (an in-memory reference).

    Parameters
    ----------
    data : ndarray, shape (x, y, z, m)
        One group's volumes (any dtype the core takes).
    radius : tuple of 3 int
        The largest radius to be scored.
    folds : ndarray of int, shape (x, y, z)
        Fold of each voxel (``0 .. K-1``; negative: not fitted), e.g. from
        :func:`slab_folds`.
    mask : ndarray of bool, shape (x, y, z), optional
        Fitting voxels (all if None).
    chunks : tuple of 3 int, optional
        Walk the image in blocks of this shape (each read with its halo, zero
        beyond the image); folds need not align with them.

    Returns
    -------
    list of Stats
        One per fold, features as :func:`.patches.features` orders them.
    """
    radius = tuple(int(r) for r in radius)
    folds = np.asarray(folds)
    n_folds = int(folds.max()) + 1
    pad = [(r, r) for r in radius] + [(0, 0)]
    padded = np.pad(data, pad)  # zero padding, as DIPY's
    fitting = folds >= 0 if mask is None else (folds >= 0) & np.asarray(mask, bool)
    pairs = []
    for box in _boxes(folds.shape, chunks):
        halo = tuple(slice(b.start, b.stop + 2 * r) for b, r in zip(box, radius))
        block = padded[halo]
        for k in np.unique(folds[box][fitting[box]]):
            pairs.append((int(k), _stats(block, radius, fitting[box] & (folds[box] == k))))
    n_features = data.shape[-1] * patch_size(radius)
    return merge_by_fold(pairs, n_folds, n_features)


# -- statistics algebra --------------------------------------------------------

def unmerge(total: Stats, part: Stats) -> Stats:
    """Statistics of the voxels of ``total`` that are not in ``part``.

    The Chan merge reversed: with ``N_t = N - N_k``,
    ``mu_t = mu - (mu_k - mu) N_k / N_t`` and
    ``S_t = S - S_k - (mu_k - mu)(mu_k - mu)^T N N_k / N_t``.

    Every term is centred, so the subtraction cancels only digits of the
    size of the scatter itself: the rounding error is about
    ``eps ||S|| = eps ||S_t|| N / N_t``, the order of the rounding already in
    ``S``. Uncentred sums would cancel ``N mu mu^T`` against ``X^T X`` and
    lose ``(mu / sd)^2`` more (DWI intensities sit far from zero). Reversing
    the merge also needs only the total and one fold at a time, so a fold's
    ``F x F`` exists only while it is scored.
    """
    n_t = total.count - part.count
    if part.count == 0:
        return total
    if n_t <= 0:
        raise ValueError(f"cannot remove {part.count} voxels from {total.count}")
    delta = part.mean - total.mean
    mean = total.mean - delta * (part.count / n_t)
    scatter = total.scatter - part.scatter
    # scaled first, so that d_i d_j == d_j d_i keeps the result symmetric
    d = delta * math.sqrt(total.count * part.count / n_t)
    target = scatter if scatter.flags.f_contiguous else scatter.T
    scipy.linalg.blas.dger(-1.0, d, d, a=target, overwrite_a=1)
    return Stats(n_t, mean, scatter)


def sub_features(radius, sub, n_volumes: int) -> np.ndarray:
    """Indices of radius ``sub``'s features among radius ``radius``'s.

    Feature ``u * P + p`` is volume ``u`` at offset ``p`` (C order); the
    offsets with ``|d_i| <= sub_i`` keep their C order, so the indices come
    in the order radius ``sub``'s own statistics have.
    """
    radius = tuple(int(r) for r in radius)
    sub = tuple(int(r) for r in sub)
    if any(s > r for s, r in zip(sub, radius)):
        raise ValueError(f"radius {sub} is not within {radius}")
    offsets = patch_offsets(radius)
    inside = np.flatnonzero((np.abs(offsets) <= np.asarray(sub)).all(axis=1))
    p = offsets.shape[0]
    return (np.arange(n_volumes)[:, None] * p + inside[None, :]).reshape(-1)


# -- settings ------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """A candidate: patch radius and model ('ols', or 'ridge' with ``alpha``)."""

    radius: tuple[int, int, int]
    model: str = "ols"
    alpha: float | None = None

    @property
    def lam(self) -> float:
        """Penalty on the centred scatter (as :func:`.solve.ridge_lambda`)."""
        return OLS_LAMBDA if self.model == "ols" else float(self.alpha)

    def as_dict(self) -> dict:
        return {"radius": [int(r) for r in self.radius], "model": self.model,
                "alpha": None if self.alpha is None else float(self.alpha),
                "lam": self.lam}


def candidate_radii(radius) -> list[tuple[int, int, int]]:
    """Radii scored by default: ``min(j, R_i)`` per axis for ``j = 0 .. max(R)``."""
    radius = tuple(int(r) for r in radius)
    return [tuple(min(j, r) for r in radius) for j in range(max(radius) + 1)]


def penalty_grid(stats: Stats, n_offsets: int, exponents=PENALTY_EXPONENTS) -> np.ndarray:
    """Ridge penalties ``scale * 10**exponents`` for one group.

    ``scale`` is the mean diagonal of the scatter over the centre features,
    ``N`` times the mean variance of a volume (the same for every radius: a
    shifted copy of a volume has its variance, up to the border). It is the
    mean eigenvalue of ``S``; ridge shrinks the eigendirection of eigenvalue
    ``e`` by ``e / (e + alpha)``. The default exponents ``-6 .. 0`` run from
    far below the noise floor (pure-noise directions have eigenvalues of
    about ``N sigma^2``, over ``1e-4`` of the scale below an SNR of 100): OLS
    in effect, to shrinking every direction weaker than the average one
    (most of them, and much signal): over-smoothed. The right penalty lies
    between, and a decade apart is fine enough for the error, which is flat
    near its minimum.

    Parameters
    ----------
    stats : Stats
        A group's total statistics.
    n_offsets : int
        Patch offsets of its features (``P``).
    exponents : sequence of float

    Returns
    -------
    ndarray of float
    """
    scale = _scale(stats, n_offsets)
    if not scale > 0:
        raise ValueError("the statistics have no variance: no penalty scale")
    return scale * 10.0 ** np.asarray(exponents, dtype=np.float64)


def _scale(stats: Stats, n_offsets: int) -> float:
    """Mean diagonal of the scatter over the centre features."""
    centres = _targets(stats.n_features, n_offsets)
    return float(np.diag(stats.scatter)[centres].mean()) if centres.size else 0.0


# -- fitting and held-out errors ----------------------------------------------

def _targets(n_features: int, n_offsets: int) -> np.ndarray:
    m = n_features // n_offsets
    return np.arange(m) * n_offsets + n_offsets // 2


def _residual_weights(train: Stats, n_offsets: int, lam: float) -> np.ndarray:
    """``A`` (F x m): column ``v`` is ``a_v = [-c_v; 1]`` laid over all
    features (zero on ``v``'s other own features), from the production solve
    (:func:`.solve.fit_ridge`, with its handling of ill-posed statistics).
    ``train`` is spent: its scatter becomes the inverse."""
    model = fit_ridge(train, n_offsets, lam, overwrite=True)
    a = -model.weights
    a[_targets(train.n_features, n_offsets), np.arange(a.shape[1])] = 1.0
    return a


class _Eigen:
    """One eigendecomposition of a training scatter ``S = U diag(e) U^T``,
    serving every penalty.

    With ``B = (S + lam I)^-1 = U diag(g) U^T``, volume ``v``'s fit is
    ``a_v = B[:, J] B[J, J]^-1 e_c`` (the block identity of :mod:`.solve`):
    ``B[J, J]`` costs ``P^2 F`` and ``a_v`` an ``F x P`` product per volume,
    then one ``U Y`` (``F^2 m``) for all volumes: per penalty about
    ``F^2 (m + P)`` multiply-adds, where a fresh inverse costs ``F^3``.

    The scatter is decomposed in its own memory with LAPACK's MRRR driver
    (``evr``): ``O(F)`` workspace, where divide and conquer (``evd``) needs
    ``2 F^2`` more (0.9 GB at 300 volumes and radius 1) for 20% less time
    (measured at ``F = 2500``), so the decomposition holds the scatter and
    the eigenvectors, no more.
    """

    def __init__(self, scatter: np.ndarray, n_offsets: int):
        # symmetric: its transpose is the same matrix, and Fortran-ordered
        # LAPACK works on it in place (else it would be copied)
        own = scatter.T if scatter.flags.c_contiguous else scatter
        self.evals, self.evecs = scipy.linalg.eigh(own, overwrite_a=True,
                                                   check_finite=False, driver="evr")
        self.p = n_offsets

    def serves(self, lam: float) -> bool:
        """Whether ``S + lam I`` is conditioned well enough for the block
        formula (else the production solve, which handles ill-posed fits)."""
        top = self.evals[-1] + lam if self.evals.size else 0.0
        return top > 0 and self.evals[0] + lam >= RCOND_MIN * top

    def residual_weights(self, lam: float) -> np.ndarray:
        """``A`` as :func:`_residual_weights` gives it (one volume at a time:
        no temporary of the eigenvectors' size)."""
        f, p = self.evecs.shape[0], self.p
        m = f // p
        g = 1.0 / (self.evals + lam)
        e = np.zeros(p)
        e[p // 2] = 1.0
        y = np.empty((f, m))
        for v in range(m):
            rows = self.evecs[v * p:(v + 1) * p]          # U[J_v, :]
            scaled = rows * g
            h = np.linalg.solve(scaled @ rows.T, e)       # B[J_v, J_v]^-1 e_c
            y[:, v] = h @ scaled
        a = self.evecs @ y                                 # B[:, J] h, all v
        for v in range(m):  # exact on v's own rows: 1 at the target, else 0
            a[v * p:(v + 1) * p, v] = e
        return a


def _held_out(a: np.ndarray, train_mean: np.ndarray, fold: Stats) -> np.ndarray:
    """``E_k(v)`` for every column ``a_v`` of ``a``: the fold's residual
    scatter plus its mean residual squared. The intercept is
    ``b = a^T mu_train``, so the mean residual is ``a^T (mu_k - mu_train)``:
    a difference of means, with no large cancellation."""
    spread = np.einsum("fv,fv->v", a, fold.scatter @ a)
    bias = (fold.mean - train_mean) @ a
    return spread + fold.count * bias ** 2


def fold_errors(total: Stats, fold: Stats, n_offsets: int, lams) -> np.ndarray:
    """Held-out squared error of every volume for every penalty.

    Parameters
    ----------
    total, fold : Stats
        The statistics of all folds and the held-out fold's; the training
        statistics (:func:`unmerge`) are formed for each solve, which spends
        them: with the total and the fold, at most one more ``F x F`` (two
        with an eigendecomposition, which serves the penalties when there are
        more than :data:`EIGEN_MIN_PENALTIES`).
    n_offsets : int
        Patch offsets ``P`` of the features.
    lams : sequence of float
        Penalties on the centred scatter (``OLS_LAMBDA`` for 'ols').

    Returns
    -------
    ndarray, shape (len(lams), m)
    """
    m = total.n_features // n_offsets
    out = np.zeros((len(lams), m))
    if fold.count == 0:
        return out
    eigen = None
    for j, lam in enumerate(lams):
        if eigen is None and len(lams) > EIGEN_MIN_PENALTIES:
            train = unmerge(total, fold)
            mean, eigen = train.mean, _Eigen(train.scatter, n_offsets)
            del train
        if eigen is not None and eigen.serves(lam):
            a = eigen.residual_weights(lam)
        else:
            train = unmerge(total, fold)
            mean, a = train.mean, _residual_weights(train, n_offsets, lam)
            del train
        out[j] = _held_out(a, mean, fold)
    return out


# -- scores --------------------------------------------------------------------

def _settings(radii, penalties, ols) -> list[Setting]:
    settings = []
    for r in radii:
        if ols:
            settings.append(Setting(r, "ols"))
        settings.extend(Setting(r, "ridge", float(a)) for a in penalties)
    return settings


def _formed(fold):
    """A fold's statistics: given, or formed now by a zero-argument callable."""
    return fold() if callable(fold) else fold


def _subset(st: Stats, idx: np.ndarray) -> Stats:
    return st if idx.size == st.n_features else st.subset(idx)


def score_group(folds: Sequence[Stats | Callable[[], Stats]], radius, radii=None,
                penalties=None, ols: bool = True, total: Stats | None = None) -> dict:
    """K-fold errors of every setting for one group, from its fold statistics.

    Parameters
    ----------
    folds : sequence of Stats, or of callables returning Stats
        Each fold's statistics of the radius-``radius`` features (a callable
        is called when the fold is needed: its ``F x F`` need not be held
        between uses).
    radius : tuple of 3 int
        Radius ``R`` of the statistics.
    radii : sequence of tuple, optional
        Radii to score (each within ``R``); default :func:`candidate_radii`.
    penalties : sequence of float, optional
        Absolute ridge penalties; default :func:`penalty_grid` of the total.
        Empty: no ridge settings.
    ols : bool
        Score 'ols' too.
    total : Stats, optional
        The merged statistics of all folds, if at hand.

    Returns
    -------
    dict
        ``volumes``, ``radius``, ``count``, ``fold_counts``, ``train_voxels``,
        ``scale`` (of the penalty grid) and ``candidates``: per setting its
        :meth:`Setting.as_dict` plus ``regressors`` (per volume), ``error``
        (sum over folds and volumes), ``mse`` (per fitting voxel and volume),
        ``per_volume`` and ``per_fold``. No candidates for a group of one
        volume (nothing to regress it on: it is passed through).
    """
    radius = tuple(int(r) for r in radius)
    if total is None:
        total = merge_all(_formed(f) for f in folds)
    m = total.n_features // patch_size(radius)
    table = {"volumes": int(m), "radius": list(radius), "count": int(total.count)}
    if m < 2:
        return dict(table, fold_counts=[], train_voxels=0, scale=None, candidates=[])
    radii = candidate_radii(radius) if radii is None else [tuple(int(x) for x in r)
                                                           for r in radii]
    if penalties is None:
        penalties = penalty_grid(total, patch_size(radius))
    settings = _settings(radii, penalties, ols)
    errors, counts = _fold_errors_all(folds, total, radius, settings)
    rows = []
    for s, e in zip(settings, errors):
        rows.append(dict(s.as_dict(), regressors=(m - 1) * patch_size(s.radius),
                         error=float(e.sum()), mse=float(e.sum() / max(total.count * m, 1)),
                         per_volume=e.sum(axis=0).tolist(), per_fold=e.sum(axis=1).tolist()))
    scale = _scale(total, patch_size(radius)) if len(penalties) else None
    return dict(table, fold_counts=counts, train_voxels=int(total.count - max(counts)),
                scale=scale, candidates=rows)


def _fold_errors_all(folds, total: Stats, radius, settings):
    """Held-out errors ``(settings, folds, volumes)`` and the fold counts;
    each fold is formed once, and scored at every radius while held."""
    m = total.n_features // patch_size(radius)
    errors = np.zeros((len(settings), len(folds), m))
    counts = []
    radii = list(dict.fromkeys(s.radius for s in settings))
    for k, fold in enumerate(folds):
        fold = _formed(fold)
        counts.append(int(fold.count))
        if fold.count >= total.count:
            raise ValueError("cross-validation needs two non-empty folds: fold "
                             f"{k} holds all {total.count} fitting voxels")
        for r in radii:
            idx = sub_features(radius, r, m)
            rows = [i for i, s in enumerate(settings) if s.radius == r]
            sub_fold, sub_total = _subset(fold, idx), _subset(total, idx)
            errors[rows, k] = fold_errors(sub_total, sub_fold, patch_size(r),
                                          [settings[i].lam for i in rows])
    return errors, counts


def score(groups: Mapping[str, Sequence], radius, radii=None, penalties=None,
          ols: bool = True) -> dict:
    """:func:`score_group` for every group.

    Parameters
    ----------
    groups : mapping of name to fold statistics
        Groups of one volume (nothing to regress) are left out.
    radius, radii, ols
        As :func:`score_group`.
    penalties : sequence of float, mapping of name to sequence, or None
        Absolute penalties for every group, per group, or each group's own
        :func:`penalty_grid` (None).

    Returns
    -------
    dict
        ``{"n_folds": K, "radius": R, "groups": {name: table}}``.
    """
    tables = {}
    n_folds = 0
    for name, folds in groups.items():
        own = penalties.get(name) if isinstance(penalties, Mapping) else penalties
        n_folds = max(n_folds, len(folds))
        table = score_group(folds, radius, radii, own, ols)
        if table["candidates"]:
            tables[name] = table
    return {"n_folds": n_folds, "radius": [int(r) for r in radius], "groups": tables}


# -- the choice ----------------------------------------------------------------

def _simplest(rows, rtol):
    """The simplest row among those within ``rtol`` of the least error:
    smaller radius first (cheaper statistics, fewer coefficients to
    overfit), then the larger penalty (the more stable fit)."""
    best = min(r["error"] for r in rows)
    near = [r for r in rows if r["error"] <= best * (1.0 + rtol)]
    return min(near, key=lambda r: (sum(r["radius"]), r["radius"], -r["lam"]))


def _pick(row: dict) -> dict:
    return {k: row[k] for k in ("radius", "model", "alpha", "lam", "error", "mse")}


def choose(scores: dict, rtol: float = TIE_RTOL, shared_penalty: bool = False) -> dict:
    """The setting with the least K-fold error.

    The radius is one for all groups (the API has one ``patch_radius``):
    the one whose groups' best errors sum to the least. Each group then
    takes its best model and penalty at that radius; with
    ``shared_penalty`` one (radius, model, alpha) for all groups, by the
    sum of their errors (the groups must have been scored on the same
    absolute penalties). Errors within ``rtol`` of the least are ties, won
    by the smaller radius, then the larger penalty.

    Returns
    -------
    dict
        ``radius``, ``error`` (the sum over groups), ``groups`` (per group
        ``radius``, ``model``, ``alpha``, ``lam``, ``error``, ``mse``),
        ``rule`` and ``table`` (``scores`` itself).
    """
    tables = scores["groups"]
    if not tables:
        raise ValueError("no group to cross-validate")
    if shared_penalty:
        keyed = {}
        for t in tables.values():
            for row in t["candidates"]:
                key = (tuple(row["radius"]), row["model"], row["alpha"])
                keyed.setdefault(key, []).append(row)
        joint = [dict(_pick(rows[0]), error=sum(r["error"] for r in rows))
                 for rows in keyed.values() if len(rows) == len(tables)]
        if not joint:
            raise ValueError("no setting was scored for every group")
        best = _simplest(joint, rtol)
        groups = {name: _pick(next(r for r in t["candidates"]
                                   if (tuple(r["radius"]), r["model"], r["alpha"])
                                   == (tuple(best["radius"]), best["model"], best["alpha"])))
                  for name, t in tables.items()}
    else:
        groups = _per_group_choice(tables, rtol)
    radius = next(iter(groups.values()))["radius"]
    return {"radius": radius, "error": float(sum(g["error"] for g in groups.values())),
            "groups": groups, "rtol": rtol, "shared_penalty": bool(shared_penalty),
            "rule": "least K-fold error; ties within rtol go to the smaller radius, "
                    "then the larger penalty",
            "table": scores}


def _per_group_choice(tables: Mapping[str, dict], rtol: float) -> dict:
    """One radius for all groups, each group's own model and penalty."""
    radii = None
    for t in tables.values():
        own = {tuple(r["radius"]) for r in t["candidates"]}
        radii = own if radii is None else radii & own
    if not radii:
        raise ValueError("no radius was scored for every group")
    per_radius = []
    for r in radii:
        best = [_simplest([row for row in t["candidates"] if tuple(row["radius"]) == r], rtol)
                for t in tables.values()]
        per_radius.append({"radius": list(r), "lam": 0.0,
                           "error": sum(b["error"] for b in best)})
    radius = tuple(_simplest(per_radius, rtol)["radius"])
    return {name: _pick(_simplest([row for row in t["candidates"]
                                   if tuple(row["radius"]) == radius], rtol))
            for name, t in tables.items()}
