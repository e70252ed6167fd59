"""K-fold cross-validation from statistics (core.crossval).

The held-out errors computed from fold statistics must equal brute force:
explicitly extracted, zero-padded patch features (DIPY's own extractor), a
fit on the other folds with an independent solver (NumPy ``lstsq`` with an
intercept column for 'ols', scikit-learn ``Ridge`` for 'ridge'), squared
errors summed over the held-out voxels. On phantoms with a noise-free truth,
the setting the errors choose must denoise (almost) as well as the best one.
"""

import functools
import json

import numpy as np
import pytest

from p2s_dask import patch2self
from p2s_dask.core import Stats, crossval, merge_all, rows_stats
from p2s_dask.core.crossval import (
    block_folds, choose, fold_statistics, penalty_grid, score, score_group, slab_folds,
    sub_features, unmerge)

RTOL = 1e-9
R1 = (1, 1, 1)
R0 = (0, 0, 0)
IMAGE = (9, 8, 11)
M = 4
# fold layouts that line up with neither the image nor the blocks walked
LAYOUTS = {
    "z-slabs": dict(n_folds=3, slab=2, axis=2, chunks=(4, 3, 5)),
    "x-slabs": dict(n_folds=4, slab=2, axis=0, chunks=(5, 3, 4)),
}


def make_image(dtype, shape=IMAGE, m=M, seed=0):
    """A smooth anatomy times per-volume contrasts, plus noise."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    anat = 1 + 0.5 * np.sin(3 * grid[0]) * np.cos(2 * grid[1]) + 0.3 * grid[2]
    vals = 3000 * anat[..., None] * rng.uniform(0.4, 1.0, m) + rng.normal(0, 120, shape + (m,))
    if dtype == "int16":
        return np.rint(vals).astype(np.int16)
    return vals.astype(dtype)


def make_mask(shape=IMAGE, seed=1):
    """An ellipsoid with holes (voxels outside still give features)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = (grid[0] / 0.95) ** 2 + (grid[1] / 0.9) ** 2 + (grid[2] / 1.1) ** 2 < 1
    return inside & (rng.random(shape) > 0.15)


@functools.lru_cache(maxsize=8)
def _patches(data_bytes, shape, dtype, radius):
    """DIPY's patches of the zero-padded data: (m, P, voxels), float64."""
    from dipy.denoise.patch2self import _extract_3d_patches
    data = np.frombuffer(data_bytes, dtype=dtype).reshape(shape).astype(np.float64)
    pad = [(r, r) for r in radius] + [(0, 0)]
    return _extract_3d_patches(np.pad(data, pad), radius)


def _fit_predict(x_train, y_train, x_test, lam):
    """An independent fit: lstsq with an intercept column for 'ols',
    scikit-learn's Ridge (with its intercept) for 'ridge'."""
    from sklearn.linear_model import Ridge
    if lam <= crossval.OLS_LAMBDA:
        design = np.column_stack([x_train, np.ones(x_train.shape[0])])
        coef = np.linalg.lstsq(design, y_train, rcond=None)[0]
        return x_test @ coef[:-1] + coef[-1]
    return Ridge(alpha=lam).fit(x_train, y_train).predict(x_test)


def brute_errors(data, radius, folds, mask, lams):
    """Held-out squared error per penalty and volume, fitted and predicted
    on explicitly extracted features: ``(len(lams), m)``."""
    feats = _patches(data.tobytes(), data.shape, data.dtype.str, tuple(radius))
    m, p, n = feats.shape
    labels = folds.reshape(-1)
    fitting = labels >= 0 if mask is None else (labels >= 0) & mask.reshape(-1)
    out = np.zeros((len(lams), m))
    for v in range(m):
        x = np.delete(feats, v, axis=0).reshape((m - 1) * p, n).T
        y = feats[v, p // 2]
        for k in range(labels.max() + 1):
            train, test = fitting & (labels != k), fitting & (labels == k)
            for j, lam in enumerate(lams):
                pred = _fit_predict(x[train], y[train], x[test], lam)
                out[j, v] += np.sum((y[test] - pred) ** 2)
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "int16"])
def test_cv_errors_equal_brute_force(dtype, masked, layout):
    spec = LAYOUTS[layout]
    data = make_image(dtype)
    mask = make_mask() if masked else None
    folds = slab_folds(IMAGE, spec["n_folds"], spec["slab"], spec["axis"])
    fs = fold_statistics(data, R1, folds, mask, chunks=spec["chunks"])
    grid = penalty_grid(merge_all(fs), 27, [-4, -3, -2, -1, 0])
    # six penalties share one eigendecomposition; two go through fit_ridge
    assert len(grid) + 1 > crossval.EIGEN_MIN_PENALTIES >= 2
    checked = 0
    for penalties in (grid, grid[1:2]):
        table = score_group(fs, R1, penalties=penalties)
        assert table["count"] == (mask.sum() if masked else data[..., 0].size)
        for radius in (R0, R1):
            rows = [r for r in table["candidates"] if tuple(r["radius"]) == radius]
            want = brute_errors(data, radius, folds, mask, [r["lam"] for r in rows])
            for row, w in zip(rows, want):
                np.testing.assert_allclose(row["per_volume"], w, rtol=RTOL, atol=0)
                assert row["error"] == pytest.approx(w.sum(), rel=RTOL)
                checked += 1
    assert checked == 2 * (6 + 2)


@pytest.mark.parametrize("masked", [False, True])
def test_fold_statistics_do_not_depend_on_blocks(masked):
    data = make_image("float64", seed=3)
    mask = make_mask() if masked else None
    folds = slab_folds(IMAGE, 3, 1, 1)
    whole = fold_statistics(data, R1, folds, mask)
    blocks = fold_statistics(data, R1, folds, mask, chunks=(2, 5, 3))
    for a, b in zip(whole, blocks):
        assert a.count == b.count
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)
        scale = np.abs(a.scatter).max()
        assert np.abs(a.scatter - b.scatter).max() <= 1e-10 * scale


def test_sub_features_are_the_smaller_radius_statistics():
    data = make_image("float32", seed=4)
    folds = slab_folds(IMAGE, 2, 3)
    big = fold_statistics(data, R1, folds)
    for sub in [(0, 0, 0), (1, 1, 0), (0, 1, 0)]:
        own = fold_statistics(data, sub, folds)
        idx = sub_features(R1, sub, M)
        for a, b in zip(big, own):
            part = a.subset(idx)
            np.testing.assert_allclose(part.mean, b.mean, rtol=1e-12)
            scale = np.abs(b.scatter).max()
            assert np.abs(part.scatter - b.scatter).max() <= 1e-10 * scale
    with pytest.raises(ValueError):
        sub_features((1, 1, 0), (1, 1, 1), M)


def test_unmerge_reverses_the_merge():
    rng = np.random.default_rng(5)
    # far from zero, small spread: raw sums would lose the digits
    parts = [rows_stats(1e4 + rng.normal(size=(n, 6)) @ rng.normal(size=(6, 6)))
             for n in (50, 80, 65)]
    total = merge_all(parts)
    for k in range(3):
        want = merge_all([p for i, p in enumerate(parts) if i != k])
        got = unmerge(total, parts[k])
        assert got.count == want.count
        np.testing.assert_allclose(got.mean, want.mean, rtol=1e-14)
        assert np.abs(got.scatter - want.scatter).max() <= 1e-12 * np.abs(want.scatter).max()
        np.testing.assert_array_equal(got.scatter, got.scatter.T)
    assert unmerge(total, Stats.empty(6)) is total
    with pytest.raises(ValueError):
        unmerge(parts[0], parts[0])


def test_fold_layouts():
    labels = slab_folds((4, 3, 7), 3, 2)
    np.testing.assert_array_equal(labels[0, 0], [0, 0, 1, 1, 2, 2, 0])
    assert (labels == labels[:1, :1]).all()
    by_z = block_folds((2, 3, 7), 5)
    np.testing.assert_array_equal(by_z[1, 2], [0, 1, 2, 3, 4, 0, 1])
    few_z = block_folds((3, 3, 2), 5)  # too few z-blocks: dealt in C order
    np.testing.assert_array_equal(few_z.reshape(-1), np.arange(18) % 5)
    with pytest.raises(ValueError):
        block_folds((2, 1, 1), 3)
    with pytest.raises(ValueError):
        slab_folds((4, 4, 4), 1)


def test_penalty_grid_is_relative_to_the_centre_variance():
    data = make_image("float64", seed=6)
    st = fold_statistics(data, R1, np.zeros(IMAGE, int))[0]
    centre = data.reshape(-1, M)
    scale = np.mean(((centre - centre.mean(axis=0)) ** 2).sum(axis=0))
    np.testing.assert_allclose(penalty_grid(st, 27), scale * 10.0 ** np.arange(-6, 1),
                               rtol=1e-12)
    with pytest.raises(ValueError):
        penalty_grid(Stats.empty(2 * 27), 27)


def test_lazy_folds_single_volume_groups_and_json():
    data = make_image("float32", seed=7)
    folds = slab_folds(IMAGE, 3, 2)
    fs = fold_statistics(data, R1, folds)
    lone = fold_statistics(data[..., :1], R1, folds)
    eager = score({"dwi": fs, "b0": lone}, R1, penalties=[1e5, 1e7])
    lazy = score_group([functools.partial(lambda s: s, s) for s in fs], R1,
                       penalties=[1e5, 1e7], total=merge_all(fs))
    assert set(eager["groups"]) == {"dwi"}  # one b0: passed through, not scored
    assert lazy["candidates"] == eager["groups"]["dwi"]["candidates"]
    choice = choose(eager)
    assert json.loads(json.dumps(choice)) == choice
    with pytest.raises(ValueError, match="two non-empty folds"):
        score_group([merge_all(fs), Stats.empty(fs[0].n_features)], R1)


def _table(rows):
    """A scored group from (radius, model, alpha, error) rows."""
    cands = [dict(crossval.Setting((r,) * 3, model, alpha).as_dict(), error=e, mse=e)
             for r, model, alpha, e in rows]
    return {"candidates": cands}


def test_choose_breaks_ties_for_the_simpler_setting():
    tie = {"groups": {"dwi": _table([(1, "ols", None, 5.0), (0, "ridge", 10.0, 5.0),
                                     (0, "ridge", 100.0, 5.0), (0, "ols", None, 5.0)])}}
    got = choose(tie)["groups"]["dwi"]
    assert (got["radius"], got["alpha"]) == ([0, 0, 0], 100.0)
    # one radius for all groups: by the sum of each group's best at it
    scores = {"groups": {
        "b0": _table([(0, "ols", None, 10.0), (1, "ols", None, 4.0)]),
        "dwi": _table([(0, "ols", None, 20.0), (0, "ridge", 1.0, 19.0),
                       (1, "ols", None, 22.0), (1, "ridge", 1.0, 21.0)])}}
    choice = choose(scores)
    assert choice["radius"] == [1, 1, 1]  # 4 + 21 < 10 + 19
    assert choice["groups"]["dwi"]["alpha"] == 1.0 and choice["error"] == 25.0
    # within rtol the smaller radius wins
    assert choose(scores, rtol=0.2)["radius"] == [0, 0, 0]
    shared = choose(scores, shared_penalty=True)  # only 'ols' is in both groups
    assert shared["radius"] == [1, 1, 1] and shared["error"] == 26.0
    assert {g["model"] for g in shared["groups"].values()} == {"ols"}


# -- phantoms with a noise-free truth ----------------------------------------------

PHANTOMS = {
    # few volumes, low SNR: radius 1 wins
    "few": dict(shape=(32, 32, 24), nvols=16, nb0=2, shells=(1000.0,), snr=10.0, seed=3),
    # many volumes, three shells, higher SNR: radius 0 wins
    "many": dict(shape=(26, 26, 16), nvols=60, nb0=3, shells=(1000.0, 2000.0, 3000.0),
                 snr=40.0, seed=3),
}


@functools.lru_cache(maxsize=2)
def phantom(name):
    """The phantom and each group's fold statistics at radius 1 (the brain
    mask is the fitting set, of the denoising and of the folds alike)."""
    from p2s_dask.testing.phantom import make_phantom
    ph = make_phantom(**PHANTOMS[name])
    folds = slab_folds(ph["mask"].shape, 5, 2)
    b0 = ph["bvals"] <= 50
    groups = {g: fold_statistics(ph["dwi"][..., sel], R1, folds, ph["mask"])
              for g, sel in (("b0", b0), ("dwi", ~b0))}
    return ph, groups


def truth_rmse(ph, **kwargs):
    """RMSE of the denoised DW volumes against the truth, in the brain."""
    out = patch2self(ph["dwi"], ph["bvals"], version=1, shift_intensity=False,
                     mask=ph["mask"], **kwargs)
    dw, mask = ph["bvals"] > 50, ph["mask"]
    diff = out[..., dw][mask].astype(np.float64) - ph["clean"][..., dw][mask]
    return float(np.sqrt(np.mean(diff ** 2)))


@pytest.mark.parametrize("name, winner", [("few", 1), ("many", 0)])
def test_chosen_radius_denoises_as_well_as_the_best(name, winner):
    ph, groups = phantom(name)
    truth = {r: truth_rmse(ph, patch_radius=r) for r in (0, 1)}
    assert min(truth, key=truth.get) == winner  # the phantom is in its regime
    assert max(truth.values()) > 1.1 * min(truth.values())
    choice = choose(score(groups, R1, penalties=()))
    radius = choice["radius"][0]
    assert truth[radius] <= 1.02 * min(truth.values())
    assert radius == winner


@pytest.mark.parametrize("name, radius", [("few", 1), ("many", 0)])
def test_chosen_penalty_denoises_as_well_as_the_best(name, radius):
    ph, groups = phantom(name)
    r = (radius,) * 3
    # the DWI group alone: the API's alpha is one number for all groups
    scores = score({"dwi": groups["dwi"]}, R1, radii=[r], ols=False)
    rows = scores["groups"]["dwi"]["candidates"]
    assert len(rows) == len(crossval.PENALTY_EXPONENTS)
    truth = {row["alpha"]: truth_rmse(ph, patch_radius=radius, model="ridge",
                                      alpha=row["alpha"], b0_denoising=False)
             for row in rows}
    chosen = choose(scores)["groups"]["dwi"]["alpha"]
    assert truth[chosen] <= 1.02 * min(truth.values())
    assert max(truth.values()) > 1.03 * min(truth.values())  # the grid matters


# -- memory --------------------------------------------------------------------

def _wide_stats(f, n, seed):
    """Statistics of ``n`` random rows of ``f`` features (well posed)."""
    rng = np.random.default_rng(seed)
    return rows_stats(rng.normal(size=(n, f)) + rng.normal(size=f))


@pytest.mark.parametrize("lams, extra", [
    ((crossval.OLS_LAMBDA,), 1),                          # 'ols': the training matrix
    (tuple(10.0 ** np.arange(-3, 4)), 2),                 # a grid: and its eigenvectors
])
def test_scoring_holds_the_matrices_the_plan_counts(lams, extra):
    """Beside the total and the fold it is given, scoring one fold holds one
    F x F (the training statistics, inverted in place) or two with a grid of
    penalties (and the eigenvectors serving them): what
    ``plan.crossval_scatters`` counts with the total and the fold. Measured
    by tracemalloc, which sees NumPy's and LAPACK's work arrays."""
    import tracemalloc

    from p2s_dask.planning.plan import crossval_scatters

    p, m = 27, 80                       # radius 1: F = 2160, 37 MB each
    f = p * m
    fold = _wide_stats(f, 1500, 1)
    total = merge_all([fold, _wide_stats(f, 4000, 2)])
    square = 8 * f * f
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        errors = crossval.fold_errors(total, fold, p, lams)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert np.isfinite(errors).all() and (errors > 0).all()
    assert crossval_scatters(len(lams) > 1) == 2 + extra
    # the matrices counted, plus vectors, F x m pieces and the in-place
    # helpers' bands of 256 rows (together under a fifth of one here, a
    # twentieth at 300 volumes)
    assert peak <= (extra + 0.2) * square, f"{peak / square:.2f} F x F held"
