"""Volume-major (Fortran) blocks, block-diagonal products and float32
prediction give the same numbers as the plain C-ordered float64 path."""

import numpy as np
import pytest

from p2s_dask.core import LinearModel, block_stats, predict_block
from p2s_dask.core.layout import voxel_rows
from p2s_dask.core.postprocess import cast, cast_into
from p2s_dask.core.predict import block_segments, prediction_minima
from p2s_dask.config.validate import check_precision
from p2s_dask.errors import InputError


@pytest.fixture
def block():
    rng = np.random.default_rng(11)
    signal = rng.uniform(200, 900, (9, 7, 5, 1)) * rng.uniform(0.3, 1.0, 12)
    return np.rint(signal + rng.normal(0, 25, signal.shape)).astype(np.int16)


def plain_stats(x):
    """Count, mean and centred scatter by the textbook formula."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    mu = x.mean(axis=0)
    return x.shape[0], mu, (x - mu).T @ (x - mu)


def model_for(m, rng, groups):
    w = np.zeros((m, m))
    for a, b in groups:
        w[a:b, a:b] = rng.normal(0, 0.1, (b - a, b - a))
    np.fill_diagonal(w, 0)
    return LinearModel(w, rng.normal(0, 5, m), 1)


def test_voxel_rows_are_views_in_either_order(block):
    c, f = np.ascontiguousarray(block), np.asfortranarray(block)
    rows_c, order_c = voxel_rows(c)
    rows_f, order_f = voxel_rows(f)
    assert (order_c, order_f) == ("C", "F")
    assert np.shares_memory(rows_c, c) and np.shares_memory(rows_f, f)
    # the same voxels, listed in a different order
    assert sorted(map(tuple, rows_c)) == sorted(map(tuple, rows_f))
    assert voxel_rows(block[:, :3])[0] is None  # strided: no silent copy


@pytest.mark.parametrize("order", ["C", "F"])
def test_block_stats_layouts_match_textbook(block, order):
    arranged = np.array(block, order=order)
    st = block_stats(arranged, (0, 0, 0), max_bytes=2000)  # many pieces
    n, mu, s = plain_stats(block)
    assert st.count == n
    np.testing.assert_allclose(st.mean, mu, rtol=1e-13)
    np.testing.assert_allclose(st.scatter, s, rtol=1e-10, atol=1e-8 * np.abs(s).max())


def test_block_stats_mask_in_fortran_order(block):
    mask = np.random.default_rng(2).random(block.shape[:3]) > 0.4
    st = block_stats(np.asfortranarray(block), (0, 0, 0), mask=mask)
    n, mu, s = plain_stats(block[mask])
    assert st.count == n
    np.testing.assert_allclose(st.scatter, s, rtol=1e-10, atol=1e-8 * np.abs(s).max())


@pytest.mark.parametrize("groups", [[(0, 12)], [(0, 3), (3, 12)], [(0, 1), (1, 12)]])
@pytest.mark.parametrize("order", ["C", "F"])
def test_prediction_layouts_and_segments_match_dense(block, order, groups):
    rng = np.random.default_rng(5)
    mdl = model_for(block.shape[-1], rng, groups)
    dense = block.reshape(-1, 12).astype(np.float64) @ mdl.weights + mdl.intercept
    out = predict_block(np.array(block, order=order), (0, 0, 0), mdl, max_bytes=3000)
    assert out.flags.f_contiguous == (order == "F")
    np.testing.assert_allclose(out.reshape(-1, 12), dense, rtol=1e-12,
                               atol=1e-9 * np.abs(dense).max())


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("max_bytes", [2000, 30000, 4 * 2**20])
def test_patch_prediction_layouts_match_dense_features(block, order, max_bytes):
    """Radius 1 in either layout, walked in sub-boxes of any size (one
    plane or less, several planes, the whole block): the dense features (by
    DIPY's extractor, zero-padded) times the weights, and the output keeps
    the block's layout."""
    from dipy.denoise.patch2self import _extract_3d_patches

    rng = np.random.default_rng(8)
    radius, p, m = (1, 1, 1), 27, block.shape[-1]
    mdl = LinearModel(rng.normal(0, 0.05, (m * p, m)), rng.normal(0, 5, m), p)
    padded = np.pad(block.astype(np.float64), [(1, 1)] * 3 + [(0, 0)])
    feats = _extract_3d_patches(np.pad(padded, [(1, 1)] * 3 + [(0, 0)]), radius)
    # (m, P, voxels) in C order over the padded block: keep the interior's
    inner = np.zeros(padded.shape[:3], bool)
    inner[1:-1, 1:-1, 1:-1] = True
    x = feats[:, :, inner.ravel()].reshape(m * p, -1).T
    dense = x @ mdl.weights + mdl.intercept
    out = predict_block(np.array(padded, order=order), radius, mdl, max_bytes=max_bytes)
    assert out.shape == block.shape and out.flags.f_contiguous == (order == "F")
    np.testing.assert_allclose(out.reshape(-1, m), dense, rtol=1e-12,
                               atol=1e-10 * np.abs(dense).max())


def test_block_segments_cover_groups():
    w = np.zeros((10, 10))
    w[:4, :4] = 1
    w[4:, 4:] = 1
    np.fill_diagonal(w, 0)
    assert block_segments(w) == [((0, 4), (0, 4)), ((4, 10), (4, 10))]
    assert block_segments(np.ones((10, 10))) == [((0, 10), (0, 10))]


@pytest.mark.parametrize("n", [6, 40])
def test_interleaved_groups_predict_like_dense(n):
    """b0s interleaved with DWIs: whatever the split, the products add up."""
    rng = np.random.default_rng(n)
    w = np.zeros((n, n))
    for idx in (np.arange(0, n, 5), np.setdiff1d(np.arange(n), np.arange(0, n, 5))):
        w[np.ix_(idx, idx)] = rng.normal(0, 0.1, (idx.size, idx.size))
    np.fill_diagonal(w, 0)
    segments = block_segments(w)
    assert sum(c1 - c0 for _, (c0, c1) in segments) == n
    mdl = LinearModel(w, rng.normal(0, 1, n), 1)
    x = rng.normal(100, 10, (4, 3, 2, n))
    for order in "CF":
        out = predict_block(np.array(x, order=order), (0, 0, 0), mdl)
        np.testing.assert_allclose(out.reshape(-1, n), x.reshape(-1, n) @ w + mdl.intercept,
                                   rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("order", ["C", "F"])
def test_float32_prediction_is_float32_close(block, order):
    rng = np.random.default_rng(8)
    mdl = model_for(12, rng, [(0, 12)])
    arranged = np.array(block, order=order)
    p64 = predict_block(arranged, (0, 0, 0), mdl)
    p32 = predict_block(arranged, (0, 0, 0), mdl, dtype=np.float32)
    assert p32.dtype == np.float32
    scale = np.abs(block).max() * np.abs(mdl.weights).sum(axis=0).max()
    assert np.abs(p32 - p64).max() <= 1e-6 * scale


def test_transform_sees_every_piece_before_it_is_stored(block):
    mdl = model_for(12, np.random.default_rng(1), [(0, 12)])
    seen = []
    res = predict_block(np.asfortranarray(block), (0, 0, 0), mdl, max_bytes=3000,
                        transform=lambda piece: seen.append(piece.min(axis=0)) or piece)
    full = predict_block(block, (0, 0, 0), mdl)
    assert len(seen) > 1  # walked in pieces
    np.testing.assert_allclose(np.min(seen, axis=0), full.reshape(-1, 12).min(axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(res, full, rtol=1e-12)


@pytest.mark.parametrize("radius", [(0, 0, 0), (1, 1, 0)])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_prediction_minima_are_those_of_the_prediction_bit_for_bit(block, order, dtype,
                                                                    radius):
    rng = np.random.default_rng(3)
    p = int(np.prod([2 * r + 1 for r in radius]))
    w = rng.normal(0, 0.1, (12 * p, 12))
    mdl = LinearModel(w, rng.normal(0, 50, 12), p)
    padded = np.pad(block, [(r, r) for r in radius] + [(0, 0)])
    arranged = np.array(padded, order=order)
    values = predict_block(arranged, radius, mdl, dtype=dtype, max_bytes=4000)
    got = prediction_minima(arranged, radius, mdl, dtype=dtype, max_bytes=4000)
    np.testing.assert_array_equal(got, values.reshape(-1, 12).min(axis=0))


def test_offset_is_added_with_the_intercept(block):
    rng = np.random.default_rng(4)
    mdl = model_for(12, rng, [(0, 4), (4, 12)])
    shift = rng.normal(0, 30, 12)
    for order in "CF":
        arranged = np.array(block, order=order)
        got = predict_block(arranged, (0, 0, 0), mdl.shifted(shift))
        np.testing.assert_allclose(got, predict_block(arranged, (0, 0, 0), mdl) + shift,
                                   rtol=1e-13, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.bool_, np.float32])
def test_cast_into_follows_cast(dtype):
    vals = np.array([[3e9, -3e9, 1.5, -2.5], [70000.0, 0.49, 0.5, 254.6]], dtype=np.float32)
    target = np.empty(vals.shape, dtype, order="F")
    cast_into(vals.copy(), target)
    # the rules written out: round half to even, clip to the range (its top
    # as the largest float32 not above it: 2**31 - 128 for int32); >= 0.5
    # for bool; a plain conversion for floats
    wide = vals.astype(np.float64)
    if dtype == np.bool_:
        want = wide >= 0.5
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        top = info.max if info.max < 2**24 else 2**31 - 128
        want = np.clip(np.rint(wide), info.min, top)
    else:
        want = vals
    np.testing.assert_array_equal(target, want.astype(dtype))
    np.testing.assert_array_equal(cast(vals.copy(), dtype), target)


def test_cast_into_never_overflows_integer_range():
    vals = np.array([3e9, -3e9, 1.5, -2.5, 70000.0], dtype=np.float32)
    for dtype in (np.int16, np.int32, np.uint16):
        info = np.iinfo(dtype)
        out = np.empty(vals.shape, dtype)
        cast_into(vals.copy(), out)
        assert out.min() >= info.min and out.max() <= info.max
        np.testing.assert_array_equal(out, cast(vals.copy(), dtype))
    assert cast(vals.copy(), np.int32)[0] > 2**31 - 200  # near the top, not wrapped


@pytest.mark.parametrize("data, out, expected", [
    (np.int16, np.int16, np.float32), (np.float32, None, np.float32),
    (np.uint8, np.float32, np.float32), (np.float64, np.float32, np.float64),
    (np.int16, np.float64, np.float64), (np.int32, np.int16, np.float64),
])
def test_precision_auto(data, out, expected):
    assert check_precision(None, data, out) == np.dtype(expected)
    assert check_precision("auto", data, out) == np.dtype(expected)


def test_precision_explicit_and_bad():
    assert check_precision("float64", np.int16, np.int16) == np.float64
    assert check_precision(np.float32, np.float64, None) == np.float32
    with pytest.raises(InputError, match="precision must be one of"):
        check_precision("half", np.int16, None)


def _exact_scatter(x):
    """Centred scatter of integer rows in exact rational arithmetic."""
    from fractions import Fraction
    x = [[int(v) for v in row] for row in np.asarray(x).T]
    n = len(x[0])
    sums = [sum(col) for col in x]
    return np.array([[float(Fraction(n * sum(a * b for a, b in zip(ci, cj)) - si * sj, n))
                      for cj, sj in zip(x, sums)] for ci, si in zip(x, sums)])


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.uint8, np.bool_])
@pytest.mark.parametrize("order", ["C", "F"])
def test_integer_statistics_are_exact_at_the_range_limits(dtype, order):
    from p2s_dask.core.stats import _exact_unit
    rng = np.random.default_rng(6)
    info = np.iinfo(np.uint8 if dtype == np.bool_ else dtype)
    unit = _exact_unit(dtype)
    # several units where they are small: one unit over all rows would overflow
    n = min(5 * unit // 2, 120000)
    # half the values at each end of the range: the largest possible scatter
    x = np.where(rng.random((n, 3)) < 0.5, info.min, info.max).astype(dtype)
    x[:, 2] = rng.integers(info.min, int(info.max) + 1, n)  # and an ordinary column
    block = np.array(x.reshape(n, 1, 1, 3), order=order)
    st = block_stats(block, (0, 0, 0))
    want = _exact_scatter(x)
    np.testing.assert_allclose(st.scatter, want, rtol=1e-14, atol=0)
    np.testing.assert_allclose(st.mean, x.astype(np.float64).mean(axis=0), rtol=1e-15)
