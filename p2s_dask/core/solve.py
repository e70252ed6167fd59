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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .stats import Stats

OLS_LAMBDA = 1e-10
MODELS = ("ols", "ridge", "lasso")


@dataclass(frozen=True)
class LinearModel:
    """Regressors of one group: ``prediction = features @ weights + intercept``.

    Attributes
    ----------
    weights : ndarray, shape (m * P, m)
        Column ``v`` holds volume ``v``'s coefficients, zero on its own rows.
    intercept : ndarray, shape (m,)
    patch_size : int
        ``P``, the number of patch offsets.
    """

    weights: np.ndarray
    intercept: np.ndarray
    patch_size: int

    @property
    def n_volumes(self) -> int:
        return self.weights.shape[1]


def ridge_lambda(model: str, alpha: float) -> float:
    """Penalty on the centred scatter for 'ols' and 'ridge'."""
    return OLS_LAMBDA if model == "ols" else float(alpha)


def _own_rows(v: int, patch_size: int) -> slice:
    return slice(v * patch_size, (v + 1) * patch_size)


def _intercepts(stats: Stats, weights: np.ndarray, patch_size: int) -> np.ndarray:
    m = weights.shape[1]
    centres = np.arange(m) * patch_size + patch_size // 2
    return stats.mean[centres] - stats.mean @ weights


def _symmetric_inverse(a: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive (semi)definite matrix, equilibrated.

    Scaling to unit diagonal first makes the Cholesky factorisation insensitive
    to the very different magnitudes of b0 and DWI intensities.
    """
    d = np.sqrt(np.diag(a))
    d[d == 0] = 1.0
    scaled = a / np.outer(d, d)
    try:
        factor = scipy.linalg.cho_factor(scaled, lower=True, check_finite=False)
        inv = scipy.linalg.cho_solve(factor, np.eye(a.shape[0]), check_finite=False)
    except np.linalg.LinAlgError:
        # Numerically singular (e.g. 'ols' on duplicated volumes): the
        # minimum-norm solution is what a least-squares solver returns too.
        inv = scipy.linalg.pinvh(scaled)
    return inv / np.outer(d, d)


def fit_ridge(stats: Stats, patch_size: int, lam: float) -> LinearModel:
    """All leave-one-out ridge regressions of a group from one inverse.

    Parameters
    ----------
    stats : Stats
        Statistics of the group's features (``m * patch_size`` of them).
    patch_size : int
    lam : float
        Ridge penalty on the centred scatter (``1e-10`` for 'ols').

    Returns
    -------
    LinearModel
    """
    f = stats.n_features
    m = f // patch_size
    a = stats.scatter + lam * np.eye(f)
    b = _symmetric_inverse(a)
    weights = np.zeros((f, m))
    c = patch_size // 2
    for v in range(m):
        own = _own_rows(v, patch_size)
        e = np.zeros(patch_size)
        e[c] = 1.0
        g = np.linalg.solve(b[own, own], e)
        col = -(b[:, own] @ g)
        col[own] = 0.0
        weights[:, v] = col
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


def fit(stats: Stats, patch_size: int, model: str = "ols",
        alpha: float = 1.0) -> LinearModel:
    """Fit all volumes of one group with 'ols', 'ridge' or 'lasso'."""
    if model == "lasso":
        return fit_lasso(stats, patch_size, alpha)
    return fit_ridge(stats, patch_size, ridge_lambda(model, alpha))
