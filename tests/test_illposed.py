"""Ill-posed fits: the predictions still equal the reference's.

Fewer fitting voxels than features (radius 1 on small crops, a tiny mask),
duplicated volumes and an all-zero volume make the statistics singular. The
fitted values do not depend on the part of the solution the data cannot
see, so p2s_dask must still give the reference's predictions (DIPY's patch
extraction plus scikit-learn per volume), to 1e-6 of the data range.
"""

import hashlib
import logging
import warnings

import dask.array as da
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from p2s_dask import patch2self
from p2s_dask.datasets import load_example
from p2s_dask.testing.phantom import make_phantom
from p2s_dask.testing.reference import reference_patch2self

pytest.importorskip("dipy")
pytest.importorskip("sklearn")

TOL = 1e-6  # of the data range
ALPHA = 2.0
INTERPOLATES = "interpolates the noise"
_REFERENCES = {}


def reference(data, bvals, **kw):
    """Each reference once per session (keyed by content)."""
    key = (hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest(),
           hashlib.sha1(np.ascontiguousarray(bvals).tobytes()).hexdigest(),
           repr(sorted((k, v if np.isscalar(v) else hashlib.sha1(
               np.ascontiguousarray(v).tobytes()).hexdigest()) for k, v in kw.items())))
    if key not in _REFERENCES:
        # one BLAS thread: scikit-learn's many small solves run several
        # times faster than with threads competing for the cores
        with warnings.catch_warnings(), threadpool_limits(1):
            # scikit-learn says its own solves are ill-conditioned: they are
            warnings.simplefilter("ignore")
            _REFERENCES[key] = reference_patch2self(data, bvals, **kw)
    return _REFERENCES[key]


def ours(data, bvals, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{INTERPOLATES}")
        return patch2self(data, bvals, version=1, alpha=ALPHA, shift_intensity=False, **kw)


def error(data, bvals, **kw):
    """max |ours - reference| over the data range."""
    ref = reference(data, bvals, alpha=ALPHA, shift_intensity=False, **kw)
    return np.abs(ours(data, bvals, **kw) - ref).max() / np.ptp(data)


@pytest.fixture(scope="module")
def real_crop():
    """320 voxels, 45 volumes (5 b0, 40 DWI): with radius 1 the DWI group has
    39 * 27 = 1053 regressors per volume."""
    data, bvals, _, _ = load_example()
    return data[60:68, 60:68, 6:11], bvals


@pytest.fixture(scope="module")
def phantom_small():
    """8 x 8 x 5 = 320 voxels, 40 volumes: 35 * 27 = 945 DWI regressors."""
    ph = make_phantom(shape=(8, 8, 5), nvols=40, nb0=4, seed=11)
    return ph["dwi"].astype(np.float64), np.asarray(ph["bvals"], float)


@pytest.fixture(scope="module")
def phantom():
    """A well-posed phantom to break: 12 x 12 x 8 voxels, 24 volumes."""
    ph = make_phantom(shape=(12, 12, 8), nvols=24, nb0=4, seed=12)
    return ph["dwi"].astype(np.float64), np.asarray(ph["bvals"], float)


@pytest.mark.parametrize("model", ["ols", "ridge"])
@pytest.mark.parametrize("which", ["real_crop", "phantom_small"])
def test_fewer_voxels_than_features(request, which, model):
    data, bvals = request.getfixturevalue(which)
    assert error(data, bvals, model=model, patch_radius=1) <= TOL


def test_ols_interpolates_with_a_warning(real_crop, caplog):
    """Least squares with more regressors than voxels fits the noise: the DWI
    volumes come back unchanged, with one warning naming the group; the
    switch to per-volume solves is one line in the log."""
    data, bvals = real_crop
    dwi = bvals > 50
    with caplog.at_level(logging.INFO, logger="p2s_dask"), \
            pytest.warns(UserWarning, match=INTERPOLATES) as rec:
        out = patch2self(data, bvals, patch_radius=1, version=1, shift_intensity=False)
    hits = [w for w in rec if INTERPOLATES in str(w.message)]
    assert len(hits) == 1 and "dwi group" in str(hits[0].message)
    assert hits[0].filename == __file__  # points at the caller's line
    assert np.abs(out[..., dwi] - data[..., dwi]).max() <= TOL * np.ptp(data)
    lines = [r for r in caplog.records if "ill-conditioned" in r.getMessage()]
    assert len(lines) == 1 and lines[0].name.startswith("p2s_dask")
    # ridge shrinks instead: no warning
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=f".*{INTERPOLATES}")
        patch2self(data, bvals, patch_radius=1, version=1, model="ridge")


@pytest.mark.parametrize("model", ["ols", "ridge"])
def test_tiny_mask(phantom, model):
    """48 fitting voxels for 19 * 27 = 513 regressors; every voxel predicted
    (outside the mask the minimum-norm solution decides, as scikit-learn's)."""
    data, bvals = phantom
    mask = np.zeros(data.shape[:3], bool)
    mask[4:8, 4:8, 3:6] = True
    assert error(data, bvals, model=model, patch_radius=1, mask=mask) <= TOL


@pytest.mark.parametrize("model", ["ols", "ridge"])
@pytest.mark.parametrize("radius", [0, 1])
def test_two_identical_volumes(phantom, model, radius):
    data, bvals = phantom
    a, b = np.flatnonzero(bvals > 50)[3:5]
    data = data.copy()
    data[..., b] = data[..., a]
    assert error(data, bvals, model=model, patch_radius=radius) <= TOL


@pytest.mark.parametrize("model", ["ols", "ridge"])
@pytest.mark.parametrize("radius", [0, 1])
def test_one_all_zero_volume(phantom, model, radius):
    data, bvals = phantom
    zero = np.flatnonzero(bvals > 50)[5]
    data = data.copy()
    data[..., zero] = 0.0
    out = ours(data, bvals, model=model, patch_radius=radius)
    assert np.all(out[..., zero] == 0.0)
    assert error(data, bvals, model=model, patch_radius=radius) <= TOL


def test_well_posed_fits_keep_the_shared_inverse(phantom, caplog):
    data, bvals = phantom
    with caplog.at_level(logging.INFO, logger="p2s_dask"):
        patch2self(data, bvals, patch_radius=1, version=1)
    assert not [r for r in caplog.records if "ill-conditioned" in r.getMessage()]


def test_lazy_input_takes_the_same_solve(phantom):
    data, bvals = phantom
    a, b = np.flatnonzero(bvals > 50)[3:5]
    data = data.copy()
    data[..., b] = data[..., a]
    lazy = patch2self(da.from_array(data, chunks=(6, 6, 4, 24)), bvals, version=1,
                      patch_radius=1, shift_intensity=False).compute()
    ref = reference(data, bvals, alpha=ALPHA, shift_intensity=False, model="ols",
                    patch_radius=1)
    assert np.abs(lazy - ref).max() <= TOL * np.ptp(data)


def _stats(data, radius=1):
    from p2s_dask.core import block_stats
    return block_stats(np.pad(data, [(radius, radius)] * 3 + [(0, 0)]), (radius,) * 3)


def _copy(st):
    from p2s_dask.core.stats import Stats
    return Stats(st.count, st.mean.copy(), st.scatter.copy())


@pytest.mark.parametrize("case", ["well-posed", "duplicated volume", "few voxels"])
def test_spent_statistics_give_the_same_fit(phantom, phantom_small, case, caplog):
    """A fit that may overwrite its statistics (the inverse takes the
    scatter's memory) gives the same weights bit for bit; where the shared
    inverse fails, the scatter is given back for the fallback."""
    from p2s_dask.core.solve import fit
    data = (phantom_small if case == "few voxels" else phantom)[0].copy()
    if case == "duplicated volume":
        data[..., 9] = data[..., 8]
    kept = _stats(data)
    spent = _copy(kept)
    with caplog.at_level(logging.INFO, logger="p2s_dask"):
        a = fit(kept, 27, "ols")
        b = fit(spent, 27, "ols", overwrite=True)
    fell_back = [r for r in caplog.records if "ill-conditioned" in r.getMessage()]
    assert bool(fell_back) == (case != "well-posed")
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.intercept, b.intercept)
    if fell_back:
        # given back: one triangle of the original, bit for bit, mirrored
        restored, original = spent.scatter, kept.scatter
        np.testing.assert_array_equal(restored, restored.T)
        assert (np.array_equal(np.tril(restored), np.tril(original))
                or np.array_equal(np.triu(restored), np.triu(original)))
    else:
        assert not np.array_equal(spent.scatter, kept.scatter)  # it held the inverse


def test_spent_fit_holds_one_scatter():
    """With ``overwrite`` the fit allocates a small fraction of the F x F
    scatter (without it, a whole copy)."""
    import tracemalloc
    from p2s_dask.core.solve import fit
    from p2s_dask.core.stats import rows_stats
    rows = np.random.default_rng(3).normal(size=(3000, 1350))  # 50 volumes x 27
    st = rows_stats(rows)
    size = st.scatter.nbytes
    peaks = {}
    for overwrite in (False, True):
        s = _copy(st)
        tracemalloc.start()
        fit(s, 27, "ols", overwrite=overwrite)
        peaks[overwrite] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peaks[False] > size
    assert peaks[True] < 0.25 * size
