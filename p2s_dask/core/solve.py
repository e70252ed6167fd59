"""Leave-one-volume-out regressions of one group, solved from its statistics.

For volume ``v`` of a group, the regressors ``K`` are all features except the
``P`` features of ``v`` itself (the block ``J_v``), and the target ``t`` is
``v``'s centre feature. With ``A = S + lam I``:

    coef_v = (A[K, K])^-1 S[K, t],   intercept_v = mean[t] - mean[K] . coef_v

'ols' is ``lam = 1e-10`` and 'ridge' is ``lam = alpha`` (scikit-learn's
``Ridge`` with an intercept penalises the unnormalised centred sum of squares,
which is ``S``). Writing ``B = A^-1``, the block identity ``A[K,K] B[K,J] +
A[K,J] B[J,J] = 0`` gives ``coef_v = -B[K, J] B[J, J]^-1 e_c`` (``e_c`` picks
the centre of ``J``), so all volumes cost one inverse of ``A`` plus a ``P x P``
solve each. :func:`fit_direct` keeps the plain per-volume solve as a reference.

Ill-posed fits (fewer fitting voxels than features, duplicated or constant
volumes) make ``A`` singular or nearly so. The predictions are still defined:
fitted values do not depend on the part of ``coef`` the data cannot see.
Features that never vary get a zero coefficient; when the condition estimate
of the shared factorisation says it cannot be trusted, each volume is solved
on its own from an eigendecomposition of ``S[K, K]``, dropping the directions
the data does not span (the minimum-norm solution a least-squares solver
returns).
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.lapack

from .stats import Stats

OLS_LAMBDA = 1e-10
MODELS = ("ols", "ridge", "lasso")
# Below this reciprocal condition number (of the unit-diagonal A) the block
# formula loses the digits the predictions need: solve volume by volume.
RCOND_MIN = 1e-10
# Eigenvalues under this fraction of the largest are rounding noise in
# directions the data does not span (the rounding of S is ~1e-14 of it).
EIG_RTOL = 1e-12
# A feature whose variance is under this fraction of the largest is constant
# up to rounding (e.g. a constant volume): it cannot inform any regression.
DEAD_RTOL = 1e-24

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearModel:
    """Regressors of one group: ``prediction = features @ weights + intercept``.

    Attributes
    ----------
    weights : ndarray, shape (m * P, m)
        Column ``v`` holds volume ``v``'s coefficients, zero on its own rows.
    intercept : ndarray, shape (m,), or None
        None: the products alone (:meth:`products_only`).
    patch_size : int
        ``P``, the number of patch offsets.
    """

    weights: np.ndarray
    intercept: np.ndarray
    patch_size: int

    @property
    def n_volumes(self) -> int:
        return self.weights.shape[1]

    def shifted(self, offset) -> "LinearModel":
        """The model with a per-volume ``offset`` added to its intercept, in
        float64 (e.g. the intensity shift: it rides along with the intercept,
        one pass over the values instead of two); itself for None."""
        if offset is None:
            return self
        intercept = np.asarray(self.intercept, np.float64) + np.asarray(offset, np.float64)
        return LinearModel(self.weights, intercept, self.patch_size)

    def products_only(self) -> "LinearModel":
        """The model without intercept: a prediction adds nothing to its
        products (not even zeros: ``-0 + 0`` is ``+0``), so that the
        intercept added later gives the same bits as adding it at once."""
        return LinearModel(self.weights, None, self.patch_size)


@dataclass(frozen=True)
class Solver:
    """How every volume of a group is fitted: a plain value for the tasks.

    Attributes
    ----------
    kind : {'ridge', 'lasso', 'cd'}
        'ridge': closed form with penalty ``lam`` on the scatter (OLS is a
        tiny ``lam``, ``LinearRegression`` is ``lam = 0``). 'lasso': the
        converged lasso / elastic-net optimum. 'cd': scikit-learn's cyclic
        coordinate descent for ``Lasso`` / ``ElasticNet`` with its stopping
        rule and iteration cap, run on the statistics.
    lam : float
        Ridge penalty ('ridge').
    alpha, l1_ratio : float
        scikit-learn's penalty and mix ('lasso', 'cd').
    fit_intercept : bool
        False fits on the uncentred statistics, with a zero intercept.
    max_iter : int
        Sweeps of coordinate descent ('cd').
    tol : float
        scikit-learn's tolerance ('cd').
    screening : bool
        Gap-safe screening, as scikit-learn >= 1.8 does ('cd').
    label : str
        How the user named the model, for messages.
    """

    kind: str
    lam: float = OLS_LAMBDA
    alpha: float = 1.0
    l1_ratio: float = 1.0
    fit_intercept: bool = True
    max_iter: int = 1000
    tol: float = 1e-4
    screening: bool = True
    label: str = ""


def ridge_lambda(model: str, alpha: float) -> float:
    """Penalty on the centred scatter for 'ols' and 'ridge'."""
    return OLS_LAMBDA if model == "ols" else float(alpha)


def as_solver(model, alpha: float = 1.0) -> Solver:
    """The :class:`Solver` of a model name ('ols', 'ridge', 'lasso') or itself."""
    if isinstance(model, Solver):
        return model
    name = str(model).lower()
    if name == "lasso":
        return Solver("lasso", alpha=float(alpha), label=name)
    if name in ("ols", "ridge"):
        return Solver("ridge", lam=ridge_lambda(name, alpha), label=name)
    raise ValueError(f"unknown model {model!r}: use one of {', '.join(MODELS)}")


def interpolates(model, alpha: float = 1.0) -> bool:
    """Whether ``model`` is an (almost) unpenalised least-squares fit."""
    solver = as_solver(model, alpha)
    return solver.kind == "ridge" and solver.lam <= OLS_LAMBDA


def _own_rows(v: int, patch_size: int) -> slice:
    return slice(v * patch_size, (v + 1) * patch_size)


def _intercepts(stats: Stats, weights: np.ndarray, patch_size: int) -> np.ndarray:
    m = weights.shape[1]
    centres = np.arange(m) * patch_size + patch_size // 2
    return stats.mean[centres] - stats.mean @ weights


def uncentred(stats: Stats) -> Stats:
    """Statistics about zero instead of the mean: a fit without intercept.

    ``S + N mu mu^T`` adds two positive semidefinite terms, so nothing
    cancels; the zero mean makes every intercept zero.
    """
    scatter = stats.scatter + stats.count * np.outer(stats.mean, stats.mean)
    return Stats(stats.count, np.zeros_like(stats.mean), scatter)


def live_features(scatter: np.ndarray) -> np.ndarray:
    """Features that vary over the fitting voxels (mask over features)."""
    diag = np.diag(scatter)
    top = diag.max() if diag.size else 0.0
    return diag > DEAD_RTOL * top if top > 0 else np.zeros(diag.shape, bool)


def _shared_inverse(a: np.ndarray, lam: float = 0.0):
    """Inverse of the symmetric positive definite ``a + lam I`` and its
    condition, in the memory of ``a``.

    Scaling to a diagonal of about one first makes the Cholesky factorisation
    insensitive to the very different magnitudes of b0 and DWI intensities;
    the scale factors are powers of two, so scaling is exact. LAPACK's
    estimate of the reciprocal condition number (``dpocon``, from the factor,
    O(F^2)) decides whether the inverse can be trusted. Every step works in
    place (``dpotrf``, then ``dpotri``): with a patch, ``F`` is in the
    thousands and each F x F copy is hundreds of MB (``F = 8073`` for 300
    volumes at ``r = 1``: 521 MB).

    Returns
    -------
    inverse : ndarray or None
        ``a`` holding the inverse; None when ``a + lam I`` is not numerically
        positive definite or its reciprocal condition number is under
        :data:`RCOND_MIN`: then ``a`` holds its input again, made exactly
        symmetric from the triangle LAPACK leaves alone (the scaling is
        exact), so a caller that lent its only copy still has it for the
        fallback.
    rcond : float
    """
    diag = np.diag(a).copy()
    a[np.diag_indices_from(a)] += lam
    # powers of two near sqrt(diag): the scaled diagonal lies in [1/4, 1)
    _, exponent = np.frexp(np.sqrt(np.diag(a)))
    d = np.ldexp(1.0, exponent)
    _scale_both(a, d)
    anorm = _max_column_sum(a)
    # a is symmetric: its transpose, Fortran-ordered, is the same matrix, so
    # LAPACK works on it in place (on its lower triangle only)
    lower = a.T if a.flags.c_contiguous else a
    lapack = scipy.linalg.lapack
    inv, rcond = None, 0.0
    factor, info = lapack.dpotrf(lower, lower=1, clean=0, overwrite_a=1)
    if info == 0:
        rcond, info = lapack.dpocon(factor, anorm, uplo="L")
        rcond = float(rcond) if info == 0 else 0.0
    if info == 0 and rcond >= RCOND_MIN:
        inv, info = lapack.dpotri(factor, lower=1, overwrite_c=1)
    if inv is None or info != 0:
        _restore(lower, d, diag)
        return None, rcond
    _mirror_lower(inv)
    _scale_both(inv, d)
    return inv, rcond


def _restore(lower, d, diag):
    """Undo a failed :func:`_shared_inverse` on the Fortran-ordered ``lower``:
    its untouched upper triangle back onto the lower, the scaling undone, the
    original diagonal put back."""
    _mirror_lower(lower.T)  # the transpose's lower triangle is our upper
    _scale_both(lower, 1.0 / d)
    lower[np.diag_indices_from(lower)] = diag


_ROWS = 256  # rows per step of the in-place helpers: a small temporary


def _scale_both(a, d):
    """``a / outer(d, d)`` in place, a band of rows at a time."""
    for i in range(0, a.shape[0], _ROWS):
        a[i:i + _ROWS] /= np.outer(d[i:i + _ROWS], d)


def _max_column_sum(a) -> float:
    """The 1-norm of ``a`` (largest column sum of absolute values)."""
    sums = np.zeros(a.shape[1])
    for i in range(0, a.shape[0], _ROWS):
        sums += np.abs(a[i:i + _ROWS]).sum(axis=0)
    return float(sums.max()) if sums.size else 0.0


def _mirror_lower(a):
    """Copy the lower triangle of a square ``a`` onto its upper, in place."""
    n = a.shape[0]
    for i in range(0, n, _ROWS):
        j = min(n, i + _ROWS)
        # the band's own diagonal block, then the columns right of it
        block = a[i:j, i:j]
        block[...] = np.tril(block) + np.tril(block, -1).T
        a[i:j, j:] = a[j:, i:j].T


def _block_weights(inv: np.ndarray, idx: np.ndarray, m: int, patch_size: int):
    """Every volume's coefficients from the inverse over the features ``idx``.

    ``coef_v = -B[K, J] B[J, J]^-1 e_c`` with ``J`` the live features of
    volume ``v``; a volume whose centre feature is dead is predicted by its
    mean (zero coefficients).
    """
    owner = idx // patch_size
    weights = np.zeros((idx.size, m))
    for v in range(m):
        own = np.flatnonzero(owner == v)
        centre = np.flatnonzero(idx[own] == v * patch_size + patch_size // 2)
        if centre.size == 0:
            continue
        e = np.zeros(own.size)
        e[centre[0]] = 1.0
        g = np.linalg.solve(inv[np.ix_(own, own)], e)
        col = -(inv[:, own] @ g)
        col[own] = 0.0
        weights[:, v] = col
    return weights


def _eigen_solve(s: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
    """``(s + lam I)^-1 b`` on the directions ``s`` spans (minimum norm).

    Directions with eigenvalues under :data:`EIG_RTOL` of the largest are
    not seen by the data: ``b`` has no component there but rounding, so they
    get none in the solution either.
    """
    evals, evecs = scipy.linalg.eigh(s, check_finite=False, driver="evd")
    top = evals[-1] if evals.size else 0.0
    keep = evals > EIG_RTOL * top
    if top <= 0 or not keep.any():
        return np.zeros(s.shape[0])
    u = evecs[:, keep]
    return u @ ((u.T @ b) / (evals[keep] + lam))


def _stable_weights(s: np.ndarray, idx: np.ndarray, f: int, patch_size: int, lam: float,
                    count: int) -> np.ndarray:
    """Each volume solved on its own (ill-conditioned statistics).

    With fewer fitting voxels than regressors (``count`` bounds the rank of
    ``S``), one eigendecomposition gives a factor ``L`` (``F x r``) with
    ``S = L L'``, and each volume is a ridge regression on ``r`` virtual
    samples, solved in kernel form ``c = L_K (L_K' L_K + lam)^+ L_t``
    (``r x r``). Otherwise each volume's normal equations ``S[K, K]`` are
    solved in eigen form. Both give the minimum-norm solution.

    ``s`` is the scatter of the live features ``idx`` (of ``f`` features).
    """
    m = f // patch_size
    owner = idx // patch_size
    factor = _range_factor(s) if count < f - patch_size else None
    weights = np.zeros((f, m))
    for v in range(m):
        t = np.flatnonzero(idx == v * patch_size + patch_size // 2)
        if t.size == 0:
            continue  # a dead target is predicted by its mean
        k = owner != v
        if factor is not None:
            lk = factor[k]
            col = lk @ _eigen_solve(lk.T @ lk, factor[t[0]], lam)
        else:
            col = _eigen_solve(s[np.ix_(k, k)], s[k, t[0]], lam)
        weights[idx[k], v] = col
    return weights


def _range_factor(s: np.ndarray) -> np.ndarray:
    """``L`` with ``s = L L'`` over the directions ``s`` spans (``F x r``)."""
    evals, evecs = scipy.linalg.eigh(s, check_finite=False, driver="evd")
    top = evals[-1] if evals.size else 0.0
    seen = evals > EIG_RTOL * top if top > 0 else np.zeros(evals.shape, bool)
    return evecs[:, seen] * np.sqrt(evals[seen])


def fit_ridge(stats: Stats, patch_size: int, lam: float, overwrite: bool = False) -> LinearModel:
    """All leave-one-out ridge regressions of a group.

    One inverse serves all volumes while it is well conditioned; otherwise
    (rank-deficient statistics) each volume is solved in eigen form and one
    line goes to the log.

    Parameters
    ----------
    stats : Stats
        Statistics of the group's features (``m * patch_size`` of them).
    patch_size : int
    lam : float
        Ridge penalty on the centred scatter (``1e-10`` for 'ols').
    overwrite : bool, optional
        The caller gives ``stats`` up: its scatter becomes the inverse
        instead of being copied first (one F x F matrix instead of two).

    Returns
    -------
    LinearModel
    """
    f = stats.n_features
    m = f // patch_size
    live = live_features(stats.scatter)
    idx = np.flatnonzero(live)
    whole = idx.size == f
    scatter = stats.scatter
    borrowed = overwrite and whole and (scatter.flags.c_contiguous or scatter.flags.f_contiguous)
    # the scatter itself when the caller gives it up (with a patch it is
    # hundreds of MB), else one copy
    a = scatter if borrowed else (scatter.copy() if whole else scatter[np.ix_(idx, idx)])
    inv, rcond = _shared_inverse(a, lam)
    if inv is None:
        logger.info(
            "ill-conditioned statistics (%d features, %d fitting voxels, reciprocal "
            "condition %.1e): each of the %d volumes is solved on its own in eigen form",
            f, stats.count, rcond, m)
        # ``a`` is the live statistics again (borrowed or a copy: the same
        # symmetric restoration either way)
        weights = _stable_weights(a, idx, f, patch_size, lam, stats.count)
    else:
        weights = np.zeros((f, m))
        weights[idx] = _block_weights(inv, idx, m, patch_size)
    return LinearModel(weights, _intercepts(stats, weights, patch_size), patch_size)


def fit_direct(stats: Stats, patch_size: int, lam: float) -> LinearModel:
    """Reference: one explicit solve of ``A[K, K]`` per volume (slow, plain)."""
    f = stats.n_features
    m = f // patch_size
    weights = np.zeros((f, m))
    for v in range(m):
        keep = np.ones(f, dtype=bool)
        keep[_own_rows(v, patch_size)] = False
        t = v * patch_size + patch_size // 2
        a = stats.scatter[np.ix_(keep, keep)] + lam * np.eye(int(keep.sum()))
        weights[keep, v] = scipy.linalg.solve(a, stats.scatter[keep, t],
                                              assume_a="pos")
    return LinearModel(weights, _intercepts(stats, weights, patch_size), patch_size)


def fit_lasso(stats: Stats, patch_size: int, alpha: float, *, tol: float = 1e-10,
              max_iter: int = 20000) -> LinearModel:
    """All leave-one-out lasso regressions of a group from its statistics.

    Minimises scikit-learn's objective ``(1/2N) ||y - X w - b||^2 + alpha ||w||_1``
    with an unpenalised intercept, i.e. ``(1/2) w' G w - c' w + alpha ||w||_1``
    on the covariance ``G = S / N``, ``c = S[:, t] / N``, with the volume's own
    features held at zero. All volumes are solved together by ADMM (one
    Cholesky factorisation shared by all), then each solution is polished by
    solving the optimality conditions exactly on its support.
    """
    f = stats.n_features
    m = f // patch_size
    n = max(stats.count, 1)
    g = stats.scatter / n
    centres = np.arange(m) * patch_size + patch_size // 2
    c = g[:, centres].copy()
    free = np.ones((f, m), dtype=bool)
    for v in range(m):
        free[_own_rows(v, patch_size), v] = False

    # Work on unit-diagonal features: the l1 penalty scales with each feature's
    # norm, so this is a change of variables, not of the problem.
    d = np.sqrt(np.diag(g)).copy()
    d[d == 0] = 1.0
    gs = g / np.outer(d, d)
    cs = c / d[:, None]
    alpha_s = alpha / d[:, None]
    rho = 1.0
    factor = scipy.linalg.cho_factor(gs + rho * np.eye(f), lower=True)
    z = np.zeros((f, m))
    u = np.zeros((f, m))
    for _ in range(max_iter):
        w = scipy.linalg.cho_solve(factor, cs + rho * (z - u))
        z_old = z
        z = w + u
        z = np.sign(z) * np.maximum(np.abs(z) - alpha_s / rho, 0.0)
        z[~free] = 0.0
        u += w - z
        primal = np.linalg.norm(w - z)
        dual = rho * np.linalg.norm(z - z_old)
        scale = max(np.linalg.norm(z), 1e-300)
        if primal <= tol * scale and dual <= tol * scale:
            break
    weights = np.zeros((f, m))
    for v in range(m):
        weights[:, v] = _polish_lasso(gs, cs[:, v], alpha_s[:, 0], z[:, v],
                                      free[:, v]) / d
    return LinearModel(weights, _intercepts(stats, weights, patch_size), patch_size)


def _polish_lasso(g, c, alpha, w, free):
    """Exact lasso solution on the support of ``w`` if it meets the KKT test."""
    support = (w != 0) & free
    if not support.any():
        return w
    sign = np.sign(w[support])
    try:
        ws = np.linalg.solve(g[np.ix_(support, support)], c[support] - alpha[support] * sign)
    except np.linalg.LinAlgError:
        return w
    if np.any(np.sign(ws) != sign):
        return w
    exact = np.zeros_like(w)
    exact[support] = ws
    grad = c - g @ exact
    off = free & ~support
    if np.all(np.abs(grad[off]) <= alpha[off] * (1 + 1e-9)):
        return exact
    return w


class _CoordinateDescent:
    """scikit-learn's cyclic coordinate descent for every volume of a group.

    scikit-learn minimises ``(1/2)||y - X w||^2 + l1 ||w||_1 + (l2/2)||w||^2``
    with ``l1 = alpha * l1_ratio * N`` and ``l2 = alpha * (1 - l1_ratio) * N``
    on the centred features. Each coordinate step needs only ``X_j' y``,
    ``||X_j||^2`` and ``X_j' X w``: entries of the scatter and one product
    with the current weights (where scikit-learn updates its residual). All
    volumes step through the same coordinate together (row ``v`` of every
    array is volume ``v``); a volume's own features are not in its ``X``.
    """

    def __init__(self, scatter, patch_size, l1, l2):
        f = scatter.shape[0]
        m = f // patch_size
        centres = np.arange(m) * patch_size + patch_size // 2
        self.g, self.l1, self.l2 = scatter, l1, l2
        self.norm2 = np.diag(scatter).copy()
        self.q = scatter[centres].copy()               # X' y, (m, F)
        self.yy = self.norm2[centres].copy()           # y' y
        self.inx = np.ones((m, f), dtype=bool)         # feature j is in X_v
        for v in range(m):
            self.inx[v, _own_rows(v, patch_size)] = False
        self.w = np.zeros((m, f))
        self.active = self.inx & (self.norm2 > 0)

    def gap(self):
        """Duality gap (formulation A) and ``||X' theta||_inf`` per volume."""
        gw = self.w @ self.g                           # X' X w
        xta = self.q - gw - self.l2 * self.w
        dual_norm = np.where(self.inx, np.abs(xta), 0.0).max(axis=1)
        qw = np.einsum("ij,ij->i", self.q, self.w)
        r2 = self.yy + np.einsum("ij,ij->i", self.w, gw) - 2.0 * qw
        ry = self.yy - qw
        ridge = self.l2 * np.einsum("ij,ij->i", self.w, self.w)
        primal = 0.5 * (r2 + ridge) + self.l1 * np.abs(self.w).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(dual_norm > self.l1, self.l1 / dual_norm, 1.0)
        dual = -0.5 * scale ** 2 * (r2 + ridge) + scale * ry
        return primal - dual, dual_norm, xta

    def screen(self, rows, gap, dual_norm, xta):
        """Gap-safe screening of the volumes ``rows``: drop the features whose
        optimum is provably 0 (and zero their weights)."""
        if not rows.any():
            return
        theta = xta / np.maximum(self.l1, dual_norm)[:, None]
        dist = (1.0 - np.abs(theta)) / np.sqrt(self.norm2 + self.l2)
        radius = np.sqrt(2.0 * np.maximum(gap, 0.0)) / self.l1
        drop = self.active & (dist > radius[:, None]) & rows[:, None]
        self.w[drop] = 0.0
        self.active &= ~drop

    def sweep(self, running):
        """One pass over the coordinates; the largest step and weight."""
        d_max = np.zeros(self.w.shape[0])
        w_max = np.zeros(self.w.shape[0])
        steppers = self.active & running[:, None]
        for j in np.flatnonzero(steppers.any(axis=0)):
            on = steppers[:, j]
            old = self.w[:, j].copy()
            tmp = self.q[:, j] - self.w @ self.g[j] + old * self.norm2[j]
            new = np.sign(tmp) * np.maximum(np.abs(tmp) - self.l1, 0.0) \
                / (self.norm2[j] + self.l2)
            new = np.where(on, new, old)
            step = new - old
            self.w[:, j] = new
            np.maximum(d_max, np.where(on, np.abs(step), 0.0), out=d_max)
            np.maximum(w_max, np.where(on, np.abs(new), 0.0), out=w_max)
        return d_max, w_max


def fit_enet_cd(stats: Stats, patch_size: int, solver: Solver) -> LinearModel:
    """scikit-learn's ``Lasso`` / ``ElasticNet`` fit, capped as it caps it.

    The same iterations as scikit-learn's dense coordinate descent (cyclic
    order, the same stopping rule on the largest step and on the duality
    gap ``<= tol * y'y``, gap-safe screening when ``solver.screening``), run
    on the statistics, so ``max_iter`` stops where scikit-learn stops; only
    the rounding differs. Volumes that reach ``max_iter`` without meeting
    the tolerance give one convergence warning for the group.
    """
    n = max(stats.count, 1)
    l1 = solver.alpha * solver.l1_ratio * n
    l2 = solver.alpha * (1.0 - solver.l1_ratio) * n
    cd = _CoordinateDescent(stats.scatter, patch_size, l1, l2)
    tol_gap = solver.tol * cd.yy
    gap, dual_norm, xta = cd.gap()
    running = ~(gap <= tol_gap)
    if solver.screening:
        cd.screen(running, gap, dual_norm, xta)
    for it in range(solver.max_iter):
        if not running.any():
            break
        d_max, w_max = cd.sweep(running)
        with np.errstate(divide="ignore", invalid="ignore"):
            small = (w_max == 0) | (d_max / w_max <= solver.tol)
        check = running & (small | (it == solver.max_iter - 1))
        if check.any():
            gap, dual_norm, xta = cd.gap()
            running &= ~(check & (gap <= tol_gap))
            if solver.screening:
                cd.screen(check & running, gap, dual_norm, xta)
    if running.any():
        _warn_not_converged(int(running.sum()), running.size, solver)
    weights = np.ascontiguousarray(cd.w.T)
    return LinearModel(weights, _intercepts(stats, weights, patch_size), patch_size)


def _warn_not_converged(count: int, total: int, solver: Solver) -> None:
    # scikit-learn's own category when it is loaded (it is, for an estimator
    # model), so a filter written for DIPY's scikit-learn fits applies here
    exceptions = sys.modules.get("sklearn.exceptions")
    category = getattr(exceptions, "ConvergenceWarning", UserWarning)
    warnings.warn(
        f"Objective did not converge for {count} of {total} volumes within "
        f"max_iter={solver.max_iter} ({solver.label or 'coordinate descent'}); "
        "increase max_iter, or use model='lasso' for the converged solution",
        category, stacklevel=2)


def fit(stats: Stats, patch_size: int, model="ols", alpha: float = 1.0,
        overwrite: bool = False) -> LinearModel:
    """Fit all volumes of one group.

    Parameters
    ----------
    stats : Stats
    patch_size : int
    model : {'ols', 'ridge', 'lasso'} or Solver
        A name, or a :class:`Solver` (from a scikit-learn estimator).
    alpha : float
        Penalty of a named 'ridge' or 'lasso' (ignored for a Solver).
    overwrite : bool, optional
        ``stats`` may be spent (see :func:`fit_ridge`).
    """
    solver = as_solver(model, alpha)
    if not solver.fit_intercept:
        stats, overwrite = uncentred(stats), True  # a fresh copy
    if solver.kind == "cd":
        return fit_enet_cd(stats, patch_size, solver)
    if solver.kind == "lasso":
        return fit_lasso(stats, patch_size, solver.alpha)
    return fit_ridge(stats, patch_size, solver.lam, overwrite)
