"""The NumPy core against plain NumPy references (no Dask, no DIPY)."""

import numpy as np
import pytest

from p2s_dask.core import (
    Stats, block_stats, features, fit_direct, fit_lasso, fit_ridge, merge,
    merge_all, patch_size, predict_block, rows_stats,
)
from p2s_dask.core.predict import combine
from p2s_dask.core.postprocess import cast


def padded(vol, r):
    return np.pad(vol, [(r[0], r[0]), (r[1], r[1]), (r[2], r[2]), (0, 0)])


def brute_features(vol, r):
    """Features by explicit loops over voxels and offsets (independent code)."""
    nx, ny, nz, m = vol.shape
    pad = padded(vol, r)
    rows = []
    for x in range(nx):
        for y in range(ny):
            for z in range(nz):
                row = []
                for u in range(m):
                    for dx in range(-r[0], r[0] + 1):
                        for dy in range(-r[1], r[1] + 1):
                            for dz in range(-r[2], r[2] + 1):
                                row.append(pad[x + r[0] + dx, y + r[1] + dy,
                                               z + r[2] + dz, u])
                rows.append(row)
    return np.array(rows)


@pytest.fixture
def vol():
    rng = np.random.default_rng(3)
    base = rng.normal(500, 100, (6, 5, 4, 1))
    return base + rng.normal(0, 20, (6, 5, 4, 5))


@pytest.mark.parametrize("r", [(0, 0, 0), (1, 1, 1), (1, 0, 2)])
def test_features_match_explicit_loops(vol, r):
    np.testing.assert_array_equal(features(padded(vol, r), r), brute_features(vol, r))


def test_rows_stats_matches_numpy_covariance(vol):
    x = vol.reshape(-1, vol.shape[-1])
    st = rows_stats(x)
    assert st.count == x.shape[0]
    np.testing.assert_allclose(st.mean, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(st.scatter, np.cov(x.T) * (x.shape[0] - 1), rtol=1e-11)


def test_merge_is_exact_and_order_free():
    rng = np.random.default_rng(0)
    # large offset, small spread: a raw-moment formula would lose most digits
    x = 1e6 + rng.normal(0, 1, (3000, 4))
    parts = np.split(x, [10, 1000, 1001, 2500])
    whole = rows_stats(x)
    left = merge_all(rows_stats(p) for p in parts)
    right = merge(rows_stats(parts[0]), merge(merge(rows_stats(parts[1]), rows_stats(parts[2])),
                                              merge(rows_stats(parts[3]), rows_stats(parts[4]))))
    for st in (left, right):
        assert st.count == whole.count
        np.testing.assert_allclose(st.mean, whole.mean, rtol=1e-14)
        np.testing.assert_allclose(st.scatter, whole.scatter, rtol=1e-9,
                                   atol=1e-9 * whole.scatter.diagonal().max())
    assert merge(Stats.empty(4), whole) is whole


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("r", [(0, 0, 0), (1, 1, 1)])
def test_block_stats_walks_sub_boxes_and_masks(vol, r, wide, monkeypatch):
    # wide: the path for many features (block mean first, then accumulation)
    monkeypatch.setattr("p2s_dask.core.stats.SMALL_F", 0 if wide else 10**6)
    rng = np.random.default_rng(1)
    mask = rng.random(vol.shape[:3]) > 0.3
    x = brute_features(vol, r)
    want = rows_stats(x[mask.reshape(-1)])
    # a tiny byte budget forces many sub-boxes of single rows
    got = block_stats(padded(vol, r), r, mask, max_bytes=1, min_rows=1)
    assert got.count == want.count
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-12)
    np.testing.assert_allclose(got.scatter, want.scatter, rtol=1e-9, atol=1e-6)


def lstsq_reference(x, v, p, lam=0.0):
    """Leave-volume-out regression with intercept by NumPy least squares."""
    m = x.shape[1] // p
    keep = np.ones(x.shape[1], bool)
    keep[v * p:(v + 1) * p] = False
    y = x[:, v * p + p // 2]
    xk = x[:, keep]
    mu, ym = xk.mean(0), y.mean()
    # ridge as an augmented least-squares problem on centred data
    a = np.vstack([xk - mu, np.sqrt(lam) * np.eye(xk.shape[1])])
    b = np.concatenate([y - ym, np.zeros(xk.shape[1])])
    coef = np.linalg.lstsq(a, b, rcond=None)[0]
    full = np.zeros(x.shape[1])
    full[keep] = coef
    return full, ym - mu @ coef, m


@pytest.mark.parametrize("r,lam", [((0, 0, 0), 1e-10), ((0, 0, 0), 50.0),
                                   ((1, 1, 1), 1e-10), ((1, 0, 1), 3.0)])
def test_ridge_and_direct_solves_match_lstsq(r, lam):
    rng = np.random.default_rng(7)
    base = rng.normal(1000, 200, (8, 7, 6, 1))
    vol = base * rng.uniform(0.5, 1.0, (1, 1, 1, 6)) + rng.normal(0, 30, (8, 7, 6, 6))
    p = patch_size(r)
    x = features(padded(vol, r), r)
    st = rows_stats(x)
    fast = fit_ridge(st, p, lam)
    slow = fit_direct(st, p, lam)
    for v in range(6):
        coef, icpt, _ = lstsq_reference(x, v, p, lam)
        pred_ref = x @ coef + icpt
        for model in (fast, slow):
            pred = x @ model.weights[:, v] + model.intercept[v]
            assert np.abs(pred - pred_ref).max() <= 1e-8 * np.ptp(vol)
        assert np.all(fast.weights[v * p:(v + 1) * p, v] == 0)


def test_lasso_matches_scikit_learn():
    from sklearn.linear_model import Lasso
    rng = np.random.default_rng(11)
    base = rng.normal(1000, 200, (10, 10, 8, 1))
    vol = base * rng.uniform(0.5, 1.0, (1, 1, 1, 8)) + rng.normal(0, 30, (10, 10, 8, 8))
    x = vol.reshape(-1, 8)
    alpha = 5.0
    model = fit_lasso(rows_stats(x), 1, alpha)
    for v in range(8):
        others = np.delete(np.arange(8), v)
        ref = Lasso(alpha=alpha, tol=1e-12, max_iter=1_000_000).fit(x[:, others], x[:, v])
        ours = x @ model.weights[:, v] + model.intercept[v]
        rel = np.abs(ours - ref.predict(x[:, others])).max() / np.ptp(x)
        assert rel <= 1e-3
        np.testing.assert_allclose(model.weights[others, v], ref.coef_, rtol=1e-3,
                                   atol=1e-6)


@pytest.mark.parametrize("r", [(0, 0, 0), (1, 1, 1)])
def test_predict_block_equals_feature_product(vol, r):
    rng = np.random.default_rng(5)
    p = patch_size(r)
    x = features(padded(vol, r), r)
    st = rows_stats(x)
    model = fit_ridge(st, p, 1e-10)
    want = (x @ model.weights + model.intercept).reshape(vol.shape)
    got = predict_block(padded(vol, r), r, model, max_bytes=1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-9)
    # combining with a pass-through group copies those volumes exactly
    full = combine([model, None], [range(5), [5]], 6, p)
    vol6 = np.concatenate([vol, rng.normal(size=vol.shape[:3] + (1,))], axis=-1)
    got6 = predict_block(padded(vol6, r), r, full)
    np.testing.assert_array_equal(got6[..., 5], vol6[..., 5])
    np.testing.assert_allclose(got6[..., :5], want, rtol=1e-12, atol=1e-9)


def test_cast_rounds_and_clips_integers():
    vals = np.array([-3.6, -0.4, 0.5, 1.49, 254.6, 300.0, 70000.0])
    np.testing.assert_array_equal(cast(vals, np.uint8), [0, 0, 0, 1, 255, 255, 255])
    np.testing.assert_array_equal(cast(vals, np.int16), [-4, 0, 0, 1, 255, 300, 32767])
    assert cast(vals, np.float32).dtype == np.float32
