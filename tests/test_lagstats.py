"""Lag statistics (core.lagstats) against the direct scatter of patch features.

``lag_block_stats`` must return what ``block_stats`` returns for the same
block with its halo: the same count, and mean and scatter within 1e-9 of the
direct ones relative to their largest entry.
"""

import threading
import time
import weakref

import numpy as np
import pytest

from p2s_dask.core import block_stats, features, merge, merge_all
from p2s_dask.core import lagstats
from p2s_dask.core.lagstats import lag_block_stats

TOL = 1e-9
RADII = [(1, 1, 1), (1, 1, 0), (2, 2, 2)]
IMAGE = (10, 9, 8)
M = 3


def assert_same(got, want, tol=TOL, symmetric=True):
    assert got.count == want.count
    assert got.mean.shape == want.mean.shape
    assert got.scatter.shape == want.scatter.shape
    if want.count == 0:
        assert not got.scatter.any() and not got.mean.any()
        return
    scale = np.abs(want.scatter).max()
    assert np.abs(got.scatter - want.scatter).max() <= tol * scale
    assert np.abs(got.mean - want.mean).max() <= tol * np.abs(want.mean).max()
    if symmetric:  # as the direct scatter of one block
        np.testing.assert_array_equal(got.scatter, got.scatter.T)


def make_image(kind, shape=IMAGE, m=M, seed=0):
    """A smooth anatomy times per-volume contrasts plus noise."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    anat = 1 + 0.5 * np.sin(3 * grid[0]) * np.cos(2 * grid[1]) + 0.3 * grid[2]
    contrast = rng.uniform(0.5, 1.0, m)
    if kind == "int16":
        # near the type's limits: up to +-20000 with a few extreme voxels
        vals = 12000 * anat[..., None] * contrast + rng.normal(0, 800, shape + (m,))
        vals[rng.random(shape + (m,)) < 0.03] = 20000
        vals[rng.random(shape + (m,)) < 0.03] = -20000
        return np.clip(np.rint(vals), -20000, 20000).astype(np.int16)
    if kind == "float32":
        return (800 * anat[..., None] * contrast
                + rng.normal(0, 30, shape + (m,))).astype(np.float32)
    # a large offset and a small spread: a raw-moment formula loses the digits
    return 1e4 + anat[..., None] * contrast + rng.normal(0, 0.5, shape + (m,))


def make_mask(kind, shape=IMAGE, seed=1):
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    if kind == "holes":
        # an ellipsoid inside the image with holes, one voxel off the border
        mask = (grid[0] / 0.85) ** 2 + (grid[1] / 0.8) ** 2 + (grid[2] / 0.9) ** 2 < 1
        mask &= rng.random(shape) > 0.2
        return mask
    if kind == "border":
        # a blob cut by the image border on several faces
        mask = (grid[0] + 0.3) ** 2 + (grid[1] - 0.4) ** 2 + grid[2] ** 2 < 1.1
        mask &= rng.random(shape) > 0.1
        return mask
    return None


def block_of(img, radius, region):
    """The block of ``region`` (three (start, stop)) with its halo: zeros
    beyond the image, neighbours inside it."""
    pad = np.pad(img, [(r, r) for r in radius] + [(0, 0)])
    return pad[tuple(slice(a, b + 2 * r) for (a, b), r in zip(region, radius))]


def mask_of(mask, region):
    return None if mask is None else mask[tuple(slice(a, b) for a, b in region)]


REGIONS = {
    "border": ((0, 6), (0, 5), (0, 4)),      # halo zero on the low faces
    "interior": ((2, 8), (2, 7), (2, 6)),    # halo all neighbours (r <= 2)
    "far": ((5, 10), (3, 9), (4, 8)),        # halo zero on the high faces
    "whole": ((0, 10), (0, 9), (0, 8)),
}


def thin_region(radius, axis):
    """A block as thin as the radius along ``axis`` (and through the image
    along the next axis)."""
    region = [(2, 7), (0, 9), (3, 6)]
    t = max(1, radius[axis])
    region[axis] = (4, 4 + t)
    return tuple(region)


def arrange(block, layout):
    if layout == "C":
        return np.ascontiguousarray(block)
    if layout == "F":
        return np.asfortranarray(block)
    # volume-major volumes spaced apart: a slice of a larger F-ordered block
    wide = np.zeros(block.shape[:3] + (block.shape[3] + 2,), dtype=block.dtype, order="F")
    wide[..., 1:-1] = block
    return wide[..., 1:-1]


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("kind", ["int16", "float32", "float64"])
@pytest.mark.parametrize("mask_kind", [None, "holes", "border"])
@pytest.mark.parametrize("where", ["border", "interior", "far"])
def test_matches_direct(radius, kind, mask_kind, where):
    img = make_image(kind)
    mask = make_mask(mask_kind)
    region = REGIONS[where]
    block = block_of(img, radius, region)
    bmask = mask_of(mask, region)
    want = block_stats(block, radius, bmask)
    assert want.count > 0
    for layout in ("C", "F"):
        assert_same(lag_block_stats(arrange(block, layout), radius, bmask), want)


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("mask_kind", [None, "border"])
def test_blocks_as_thin_as_the_radius(radius, axis, mask_kind):
    img = make_image("float64", seed=axis)
    region = thin_region(radius, axis)
    block = block_of(img, radius, region)
    bmask = mask_of(make_mask(mask_kind), region)
    want = block_stats(block, radius, bmask)
    for layout in ("C", "F", "spaced"):
        assert_same(lag_block_stats(arrange(block, layout), radius, bmask), want)


@pytest.mark.parametrize("radius,kind", [((1, 1, 1), "int16"), ((1, 1, 0), "float64"),
                                         ((2, 2, 2), "float64")])
@pytest.mark.parametrize("mask_kind", [None, "holes"])
def test_walked_in_slabs(radius, mask_kind, kind):
    # max_bytes=1: the working copy holds one plane (+ 2 r) at a time
    img = make_image(kind, seed=5)
    region = REGIONS["whole"]
    block = block_of(img, radius, region)
    bmask = mask_of(make_mask(mask_kind), region)
    want = block_stats(block, radius, bmask)
    geo = lagstats._Geometry(block.shape[:3], radius, M)
    three = (3 + 2 * geo.r[0]) * geo.sz * (M + 1) * 8   # slabs of three planes
    assert len(geo.chunks(three)) > 1
    for max_bytes in ((1, three) if max(radius) < 2 else (three,)):
        assert_same(lag_block_stats(block, radius, bmask, max_bytes=max_bytes), want)


@pytest.mark.parametrize("classes,radius", [
    (1, (1, 1, 1)),         # every pattern its own class
    (10**9, (1, 1, 1)),     # no classes: signed corrections only
    (4, (1, 1, 0)),
    (4, (2, 2, 2)),
    (10**9, (2, 2, 2)),
])
def test_mask_paths(classes, radius, monkeypatch):
    # the class threshold changes the work, never the result
    monkeypatch.setattr(lagstats, "BIG_CLASS", classes)
    img = make_image("float32", seed=3)
    region = REGIONS["whole"]
    block = block_of(img, radius, region)
    for mask_kind in ("holes", "border"):
        bmask = make_mask(mask_kind, seed=4)
        assert_same(lag_block_stats(block, radius, bmask), block_stats(block, radius, bmask))


CHUNKINGS = [
    ((10,), (9,), (8,)),
    ((4, 4, 2), (5, 4), (3, 3, 2)),
    ((6, 4), (2, 7), (8,)),
    ((2, 2, 2, 2, 2), (9,), (4, 2, 2)),
]


def split(img, mask, radius, chunks):
    """Blocks with halos cut from the zero-padded image, and their masks."""
    pad = np.pad(img, [(r, r) for r in radius] + [(0, 0)])
    edges = [np.concatenate(([0], np.cumsum(c))) for c in chunks]
    for i in range(len(chunks[0])):
        for j in range(len(chunks[1])):
            for k in range(len(chunks[2])):
                region = [(e[a], e[a + 1]) for e, a in zip(edges, (i, j, k))]
                block = pad[tuple(slice(a, b + 2 * r) for (a, b), r in zip(region, radius))]
                yield block, mask_of(mask, region)


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("mask_kind", [None, "border"])
@pytest.mark.parametrize("kind", ["int16", "float64"])
def test_merged_blocks_give_the_whole_image(radius, mask_kind, kind):
    img = make_image(kind, seed=9)
    mask = make_mask(mask_kind, seed=9)
    whole = np.pad(img, [(r, r) for r in radius] + [(0, 0)])
    want = block_stats(whole, radius, mask)
    for chunks in CHUNKINGS[2:3] if max(radius) > 1 else CHUNKINGS:
        if any(min(c) < r for c, r in zip(chunks, radius)):
            continue  # the engine keeps blocks at least as thick as the radius
        parts = [lag_block_stats(b, radius, m) for b, m in split(img, mask, radius, chunks)]
        got = merge_all(p for p in parts if p.count)
        assert_same(got, want, symmetric=False)  # merges round asymmetrically


def test_integers_are_exact():
    # the int16 path forms the scatter from exact integer sums: it is the true
    # scatter rounded (not only close to the direct float computation)
    radius = (1, 1, 1)
    img = make_image("int16", seed=11)
    region = REGIONS["border"]
    block = block_of(img, radius, region)
    for bmask in (None, mask_of(make_mask("holes"), region)):
        x = features(block, radius).astype(np.int64)
        if bmask is not None:
            x = x[bmask.reshape(-1)]
        n = x.shape[0]
        sums = x.sum(axis=0)
        n_scatter = n * (x.T @ x) - np.outer(sums, sums)   # exact in int64 here
        got = lag_block_stats(block, radius, bmask)
        assert got.count == n
        np.testing.assert_array_equal(got.mean, sums / n)
        exact = n_scatter / n
        assert np.abs(got.scatter - exact).max() <= 4e-16 * np.abs(exact).max()


def test_integers_beyond_the_exact_range(monkeypatch):
    # past the exact bound (forced here) integers take the centred float path
    monkeypatch.setattr(lagstats, "_EXACT", 1)
    radius = (1, 1, 1)
    img = make_image("int16", seed=12)
    for where in ("border", "interior"):
        block = block_of(img, radius, REGIONS[where])
        bmask = mask_of(make_mask("border"), REGIONS[where])
        for mm in (None, bmask):
            assert_same(lag_block_stats(block, radius, mm), block_stats(block, radius, mm))


def test_degenerate_masks_and_radius_zero():
    radius = (1, 1, 1)
    img = make_image("float64", seed=13)
    region = REGIONS["interior"]
    block = block_of(img, radius, region)
    shape = tuple(b - a for a, b in region)
    full = np.ones(shape, bool)
    assert_same(lag_block_stats(block, radius, full), block_stats(block, radius))
    empty = lag_block_stats(block, radius, np.zeros(shape, bool))
    assert empty.count == 0 and empty.scatter.shape == (27 * M, 27 * M)
    one = np.zeros(shape, bool)
    one[2, 3, 1] = True
    got = lag_block_stats(block, radius, one)
    want = block_stats(block, radius, one)
    assert got.count == 1 and not want.scatter.any()
    # one voxel: the scatter is zero (up to the rounding of the centring)
    assert np.abs(got.scatter).max() <= 1e-12 * np.abs(got.mean).max() ** 2
    np.testing.assert_allclose(got.mean, want.mean, rtol=1e-15)
    flat = block_of(img, (0, 0, 0), region)
    assert_same(lag_block_stats(flat, (0, 0, 0)), block_stats(flat, (0, 0, 0)))
    with pytest.raises(ValueError):
        lag_block_stats(block, radius, np.ones((2, 2, 2), bool))


def test_when_lags_pay_off():
    # no mask: always for r > 0; with a mask: for groups large enough
    assert lagstats.lags_pay_off(10, (1, 1, 1), masked=False)
    assert not lagstats.lags_pay_off(160, (0, 0, 0), masked=False)
    assert lagstats.lags_pay_off(160, (1, 1, 1), masked=True)
    assert not lagstats.lags_pay_off(10, (1, 1, 1), masked=True)
    assert not lagstats.lags_pay_off(24, (2, 2, 2), masked=True)


# ----------------------------------------------------------------------------
# sums over several blocks (the engine's lanes)


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("kind", ["int16", "float32", "float64"])
@pytest.mark.parametrize("mask_kind", [None, "holes", "border"])
def test_lag_sum_of_blocks_is_their_merge(radius, kind, mask_kind):
    """Blocks summed into one LagSum give the merged direct statistics."""
    img = make_image(kind, seed=5)
    mask = make_mask(mask_kind)
    cuts = (0, 3, 5, 8) if max(radius) == 1 else (0, 4, 8)
    regions = [((0, 10), (0, 9), (a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
    total = lagstats.LagSum(M, radius)
    parts = []
    for region in regions:
        block = block_of(img, radius, region)
        total.add(arrange(block, "F"), mask_of(mask, region))
        parts.append(block_stats(block, radius, mask_of(mask, region)))
    got = total.stats()
    assert_same(got, merge_all(parts))
    assert total.cross is None  # spent: its matrix is the result's


def test_lag_sum_of_nothing():
    radius = (1, 1, 1)
    total = lagstats.LagSum(M, radius)
    assert total.stats().count == 0
    block = block_of(make_image("float32"), radius, REGIONS["interior"])
    total.add(block, np.zeros((6, 5, 4), bool))  # an empty block adds nothing
    total.add(block)
    assert_same(total.stats(), block_stats(block, radius))


def test_merge_in_place_is_the_same_merge():
    img = make_image("float64", seed=2)
    a = block_stats(block_of(img, (1, 1, 1), ((0, 10), (0, 9), (0, 4))), (1, 1, 1))
    b = block_stats(block_of(img, (1, 1, 1), ((0, 10), (0, 9), (4, 8))), (1, 1, 1))
    want = merge(a, b)
    frozen = a.scatter.copy()
    frozen.flags.writeable = False
    kept = merge(type(a)(a.count, a.mean, frozen), b, overwrite_a=True)
    np.testing.assert_array_equal(kept.scatter, want.scatter)  # read-only: a copy
    got = merge(a, b, overwrite_a=True)
    assert got.scatter is a.scatter
    np.testing.assert_array_equal(got.scatter, want.scatter)
    np.testing.assert_array_equal(got.mean, want.mean)


def _engine_case(m=8, shape=(9, 8, 10), seed=4):
    from p2s_dask.config.groups import make_groups
    img = make_image("float32", shape=shape, m=m, seed=seed)
    bvals = np.array([0] * 2 + [1000] * (m - 2))
    return img, make_groups(bvals, m)


@pytest.mark.parametrize("mask_kind", [None, "holes"])
def test_lanes_give_the_statistics_of_the_whole_image(monkeypatch, mask_kind):
    """The pass in lanes (any number, any method) equals the direct
    statistics of the whole image; bad values are still counted."""
    import dask
    from p2s_dask.graph import engine
    img, groups = _engine_case()
    mask = None if mask_kind is None else make_mask("holes", shape=img.shape[:3])
    radius = (1, 1, 1)
    pad = np.pad(img, [(1, 1)] * 3 + [(0, 0)])
    want = [block_stats(pad[..., list(g.indices)], radius, mask) for g in groups]
    # lanes for any scatter larger than this test's
    monkeypatch.setattr(engine, "SMALL_SCATTER_BYTES", 1)
    arr = engine.as_chunked(img, (9, 8, 3), radius)
    for lanes, method in [(1, "auto"), (2, "auto"), (3, "direct"), (9, "lag")]:
        got = dask.compute(engine.summarize(arr, groups, radius, mask, method=method,
                                            lanes=lanes), scheduler="threads")[0]
        for g, st, w in zip(groups, got.stats, want):
            assert_same(st, w, symmetric=False)
    bad = img.copy()
    bad[4, 2, 7, 1] = np.nan
    bad[1, 1, 8, 0] = np.inf
    arr = engine.as_chunked(bad, (9, 8, 3), radius)
    got = dask.compute(engine.summarize(arr, groups, radius, lanes=2), scheduler="threads")[0]
    assert got.nonfinite == 2 and got.first_nonfinite == (1, 1, 8, 0) and not got.stats


def test_lane_runs_balance_the_voxels():
    from p2s_dask.graph.engine import _lane_runs
    assert [list(r) for r in _lane_runs([12] * 6 + [4], 2)] == [[0, 1, 2], [3, 4, 5, 6]]
    assert [list(r) for r in _lane_runs([5] * 3, 8)] == [[0], [1], [2]]
    assert [list(r) for r in _lane_runs([5] * 4, 1)] == [[0, 1, 2, 3]]


def test_statistics_method_is_switchable():
    import dask
    from p2s_dask.graph import engine
    img, groups = _engine_case()
    arr = engine.as_chunked(img, (9, 8, 5), (1, 1, 1))
    seen = []
    real = engine._group_stats

    def spy(block, indices, radius, mask, method="auto", into=None, origin=None):
        seen.append(method)
        return real(block, indices, radius, mask, method, into, origin)

    engine._group_stats = spy
    try:
        with engine.statistics_method("direct"):
            dask.compute(engine.summarize(arr, groups, (1, 1, 1)), scheduler="sync")
        assert seen and set(seen) == {"direct"}
        seen.clear()
        dask.compute(engine.summarize(arr, groups, (1, 1, 1)), scheduler="sync")
        assert set(seen) == {"auto"}
    finally:
        engine._group_stats = real
    with pytest.raises(ValueError):
        engine.summarize(arr, groups, (1, 1, 1), method="fast")


def test_patch_blocks_are_thick_where_the_budget_allows():
    """With a patch the lanes of statistics come first: one per thread while
    they (each its compact lag parts and the lag products' working copies) and the
    threads' thinnest blocks fit the budget beside the process, at least one.
    Blocks get what the lanes leave: at least PATCH_PLANES planes per unit
    of radius where that allows, never past it or a thread's share of the
    prediction pass. Patch-less runs are as they were."""
    from p2s_dask.core.lagparts import lane_pieces
    from p2s_dask.planning import chunking
    shape = (81, 106, 76, 160)
    plain = chunking.chunk_policy(shape, 8, 4 << 30, 2)
    patch = chunking.chunk_policy(shape, 8, 4 << 30, 2, (1, 1, 1))
    assert plain == (81, 106, 6) and patch == (81, 106, chunking.PATCH_PLANES)
    assert chunking.chunk_policy(shape, 8, 4 << 30, 2, (1, 1, 0)) == plain  # no z halo
    for memory, threads in [(256 << 20, 2), (512 << 20, 16), (2 << 30, 2), (8 << 30, 4)]:
        for radius in [(1, 1, 1), (2, 2, 2)]:
            got = chunking.chunk_policy(shape, 8, memory, threads, radius)
            n_features = shape[3] * (2 * radius[0] + 1) ** 3
            # a lane: its compact lag parts (no F x F scatter) and the lag
            # products' working copies, at least 1 + 2 r planes (padded by r)
            # of all volumes and a volume of ones
            plane = (shape[0] + 2 * radius[0]) * (shape[1] + 2 * radius[1]) * (shape[3] + 1)
            slab = max(64 << 20, (1 + 2 * radius[2]) * plane * 8)
            parts = lane_pieces(radius) * (shape[3] + 1) ** 2 * 8
            assert parts < 8 * n_features ** 2 / 3
            lane = parts + chunking.LANE_WORKING_COPIES * slab
            thinnest = np.prod(shape[:2]) * (1 + 2 * radius[2]) * shape[3] * 4
            work = memory - chunking.PROCESS_BYTES
            room = work - threads * chunking.PATCH_BLOCKS_PER_THREAD * thinnest
            lanes = chunking.patch_lanes(shape, radius, memory, threads)
            assert 1 <= lanes <= threads
            assert lanes == 1 or lanes * lane <= room
            assert lanes == threads or (lanes + 1) * lane > room
            share = min(max(0, work - lanes * lane) // (chunking.PATCH_BLOCKS_PER_THREAD * lanes),
                        work // (chunking.BLOCKS_PER_THREAD * threads))
            block = np.prod(got) * shape[3] * 8
            assert block <= max(share, chunking.MIN_BLOCK_BYTES) or got[2] == radius[2]
            thick = min(radius[2] * chunking.PATCH_PLANES, shape[2])
            assert got[2] >= thick or np.prod(shape[:2]) * thick * shape[3] * 8 > share
    # the in-memory API's lanes have memory of their own: blocks by its budget
    api = chunking.chunk_policy(shape, 8, 512 << 20, 2, (1, 1, 1), lanes_apart=True)
    assert np.prod(api) * shape[3] * 8 <= (512 << 20) // (chunking.PATCH_BLOCKS_PER_THREAD * 2)


# ----------------------------------------------------------------------------
# compact lane sums (core.lagparts): the engine's lanes

PARTS_TOL = 1e-12


def blocks_with_origins(img, mask, radius, chunks):
    """``(block, mask block, origin)`` of every block of a chunk grid."""
    edges = [np.concatenate(([0], np.cumsum(c))) for c in chunks]
    starts = [(i, j, k) for i in edges[0][:-1] for j in edges[1][:-1] for k in edges[2][:-1]]
    for (block, bmask), origin in zip(split(img, mask, radius, chunks), starts):
        yield block, bmask, tuple(int(o) for o in origin)


def lane_parts(img, mask, radius, chunks, lanes=1, layout="C", max_bytes=64 << 20):
    """The blocks of a chunk grid summed along ``lanes`` runs of consecutive
    blocks (as the engine cuts them), each a LagParts, then merged."""
    from p2s_dask.core.lagparts import LagParts
    shape = None if mask is not None else img.shape[:3]
    blocks = list(blocks_with_origins(img, mask, radius, chunks))
    runs = np.array_split(np.arange(len(blocks)), lanes)
    parts = [LagParts(img.shape[3], radius, shape) for _ in runs]
    for lane, run in zip(parts, runs):
        for i in run:
            block, bmask, origin = blocks[i]
            lane.add(arrange(block, layout), bmask, origin, max_bytes=max_bytes)
    total = parts[0]
    for lane in parts[1:]:
        total = total.merge(lane)
    return total


def usable(chunkings, radius):
    # the engine keeps blocks at least as thick as the radius
    return [c for c in chunkings if all(min(a) >= r for a, r in zip(c, radius))]


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("kind", ["int16", "float32", "float64"])
@pytest.mark.parametrize("mask_kind", [None, "holes", "border"])
def test_lag_parts_give_the_whole_image(radius, kind, mask_kind):
    """Lanes of compact parts, merged, give the direct statistics of the whole
    image and today's F x F lane sum, for chunkings that do and do not
    divide the image, in one lane or several."""
    img = make_image(kind, seed=9)
    mask = make_mask(mask_kind, seed=9)
    want = block_stats(np.pad(img, [(r, r) for r in radius] + [(0, 0)]), radius, mask)
    chunkings = usable(CHUNKINGS, radius)
    if max(radius) > 1:
        chunkings = chunkings[-1:]
    for chunks in chunkings:
        old = lagstats.LagSum(M, radius)
        for block, bmask, _ in blocks_with_origins(img, mask, radius, chunks):
            old.add(block, bmask)
        old = old.stats()
        for lanes in (1, 3):
            got = lane_parts(img, mask, radius, chunks, lanes).stats()
            assert_same(got, want, PARTS_TOL)
            # LagSum merges blocks centred on their own means: 1.5e-12 off
            # (against a longdouble reference, where the parts are within
            # 1e-15) for the masked 1e4 + noise image, whose blocks hold few voxels
            assert_same(got, old, 10 * PARTS_TOL, symmetric=False)


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("mask_kind", [None, "holes"])
def test_lag_parts_of_integers_are_exact(radius, mask_kind):
    """int16 data: the scatter is the exact integer one rounded (lanes with
    their own references included: merging moves one onto the other's)."""
    img = make_image("int16", seed=11)
    mask = make_mask(mask_kind, seed=3)
    x = features(np.pad(img, [(r, r) for r in radius] + [(0, 0)]), radius).astype(np.int64)
    if mask is not None:
        x = x[mask.reshape(-1)]
    n = x.shape[0]
    sums = x.sum(axis=0)
    exact = (n * (x.T @ x) - np.outer(sums, sums)) / n   # exact in int64 here
    for chunks in usable(CHUNKINGS[1:], radius):
        total = lane_parts(img, mask, radius, chunks, lanes=3)
        assert total.exact
        got = total.stats()
        assert got.count == n
        np.testing.assert_array_equal(got.mean, sums / n)
        assert np.abs(got.scatter - exact).max() <= 4e-16 * np.abs(exact).max()


def test_lag_parts_of_integers_beyond_the_exact_range(monkeypatch):
    # past the bound (forced here) the sums are rounded as float sums are
    from p2s_dask.core import lagparts
    monkeypatch.setattr(lagparts, "_EXACT", 1)
    radius = (1, 1, 1)
    img = make_image("int16", seed=12)
    for mask in (None, make_mask("border")):
        want = block_stats(np.pad(img, [(1, 1)] * 3 + [(0, 0)]), radius, mask)
        total = lane_parts(img, mask, radius, CHUNKINGS[1], lanes=2)
        assert not total.exact
        assert_same(total.stats(), want, PARTS_TOL)


@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("mask_kind", [None, "border"])
def test_lag_parts_in_any_layout_and_slab(radius, mask_kind):
    """Block layouts, blocks as thin as the radius along each axis (the fast
    axis split too: its halo then holds image voxels) and working copies of
    one plane at a time give the same statistics."""
    img = make_image("float64", seed=6)
    mask = make_mask(mask_kind, seed=6)
    want = block_stats(np.pad(img, [(r, r) for r in radius] + [(0, 0)]), radius, mask)
    for axis in range(3):
        t = max(1, radius[axis])
        chunks = [(10,), (9,), (8,)]
        size = img.shape[axis]
        chunks[axis] = (t,) * (size // t) + ((size % t,) if size % t else ())
        chunks = tuple(chunks)
        if any(min(c) < r for c, r in zip(chunks, radius)):
            continue
        for layout, max_bytes in (("C", 64 << 20), ("F", 1), ("spaced", 64 << 20)):
            got = lane_parts(img, mask, radius, chunks, 2, layout, max_bytes)
            assert_same(got.stats(), want, PARTS_TOL)


def test_lag_parts_merge_in_any_order():
    radius = (1, 1, 1)
    img = make_image("float32", seed=7)
    chunks = CHUNKINGS[1]
    blocks = list(blocks_with_origins(img, None, radius, chunks))
    from p2s_dask.core.lagparts import LagParts

    def lane(indices):
        total = LagParts(M, radius, img.shape[:3])
        for i in indices:
            total.add(*blocks[i])
        return total

    n = len(blocks)
    first, second, third = range(0, n // 3), range(n // 3, n // 2), range(n // 2, n)
    a = lane(first).merge(lane(second)).merge(lane(third))
    b = lane(third).merge(lane(first).merge(lane(second)))
    assert_same(a.stats(), b.stats(), PARTS_TOL, symmetric=False)


def test_lag_parts_refuse_what_they_cannot_sum():
    from p2s_dask.core.lagparts import LagParts
    radius = (1, 1, 1)
    img = make_image("float64", seed=8)
    part = LagParts(M, radius, img.shape[:3])
    assert part.stats().count == 0   # nothing added: the empty statistics
    block, _, origin = next(blocks_with_origins(img, None, radius, CHUNKINGS[1]))
    part.add(block, None, origin)
    with pytest.raises(ValueError, match="merge every lane"):
        part.stats()   # owned voxels of a part of the image: no statistic
    with pytest.raises(ValueError, match="no mask"):
        part.add(block, make_mask("holes")[:4, :5, :3], origin)
    with pytest.raises(ValueError, match="another group or form"):
        part.merge(lane_parts(img, make_mask("holes"), radius, CHUNKINGS[1]))
    windows = LagParts(M, radius)
    windows.add(block, np.zeros((4, 5, 3), bool))   # no fitting voxel: nothing
    assert windows.ref is None and windows.stats().count == 0


def test_lag_parts_hold_no_scatter():
    """A lane holds its pieces (at most chunking.lane_pieces of them) and one
    block's working copy with small transients, never an F x F matrix; the
    scatter is formed once, from the merged parts."""
    import tracemalloc
    from p2s_dask.core.lagparts import LagParts
    from p2s_dask.planning import chunking
    m, radius, shape = 40, (1, 1, 1), (24, 20, 18)
    img = make_image("float32", shape=shape, m=m, seed=2)
    f = 27 * m
    piece = (m + 1) ** 2 * 8
    chunks = ((24,), (20,), (6, 6, 6))
    blocks = list(blocks_with_origins(img, None, radius, chunks))
    slab = 3 * 22 * 26 * (m + 1) * 8   # one plane and its halo: max_bytes=1
    lanes = [LagParts(m, radius, shape) for _ in range(2)]
    tracemalloc.start()
    try:
        for lane, run in zip(lanes, (blocks[:2], blocks[2:])):
            for block, _, origin in run:
                tracemalloc.reset_peak()
                before = tracemalloc.get_traced_memory()[0]
                lane.add(block, None, origin, max_bytes=1)
                peak = tracemalloc.get_traced_memory()[1] - before
                assert len(lane.parts) <= chunking.lane_pieces(radius)
                # the new pieces, the working copy and transients (measured:
                # about 1.2 copies beside the pieces)
                assert peak <= len(lane.parts) * piece \
                    + chunking.LANE_WORKING_COPIES * slab
                assert peak < f * f * 8 / 2
    finally:
        tracemalloc.stop()
    assert lanes[0].nbytes == len(lanes[0].parts) * piece
    assert lanes[0].nbytes < f * f * 8 / 4
    got = lanes[0].merge(lanes[1]).stats()
    assert_same(got, block_stats(np.pad(img, [(1, 1)] * 3 + [(0, 0)]), radius), PARTS_TOL)


class _CountingReads:
    """An array whose chunks, as read, are counted while they live."""

    def __init__(self, data):
        self.data, self.live, self.most = data, 0, 0
        self.shape, self.dtype, self.ndim = data.shape, data.dtype, data.ndim
        self.lock = threading.Lock()

    def __getitem__(self, index):
        chunk = np.array(self.data[index])
        with self.lock:
            self.live += 1
            self.most = max(self.most, self.live)
        weakref.finalize(chunk, self._gone)
        return chunk

    def _gone(self):
        with self.lock:
            self.live -= 1


def test_lanes_in_sequence_read_no_block_far_ahead(monkeypatch):
    """Lanes run as one task each (file runs on this process's threads)
    read a block when they reach it: at any time only the chunks of each
    lane's current block and its halo's neighbours are alive; the statistics
    are the same bits as the plain graph's. (The plain graph held too many
    blocks on real runs, not on this small one: measured on the 96x96x60x300
    .nii.gz at radius 1 and 1 GiB, statistics peak 1.30 GiB before, 0.76
    after; see the README.)"""
    import dask
    import dask.array as da

    from p2s_dask.config.groups import make_groups
    from p2s_dask.graph import engine
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (6, 5, 60, 12)).astype(np.float32)
    groups = make_groups(np.r_[0, 0, [1000] * 10], 12, b0_threshold=50)
    real = engine._block_summary

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "_block_summary", slow)
    monkeypatch.setattr(engine, "SMALL_SCATTER_BYTES", 0)
    source = _CountingReads(data)
    arr = da.from_array(source, chunks=(6, 5, 2, 12))
    with engine.lanes_in_sequence():
        graph = engine.summarize(arr, groups, (1, 1, 1), lanes=2)
    got = dask.compute(graph, scheduler="threads", num_workers=2)[0]
    # per lane: a block and its two neighbours, and the next block's
    assert source.most <= 2 * 4
    ref = engine.summarize(da.from_array(data, chunks=(6, 5, 2, 12)), groups, (1, 1, 1),
                           lanes=2)
    want = dask.compute(ref, scheduler="sync")[0]
    for a, b in zip(got.stats, want.stats):
        np.testing.assert_array_equal(a.scatter, b.scatter)
