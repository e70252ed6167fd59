"""Exactness against the reference Patch2Self (DIPY's patch extraction plus
scikit-learn, per volume) on a ground-truth phantom and on real data."""

import hashlib

import numpy as np
import pytest

from p2s_dask import patch2self
from p2s_dask.datasets import load_example
from p2s_dask.testing.phantom import make_phantom
from p2s_dask.testing.reference import reference_patch2self

TOL = 1e-6  # of the data range (max - min)


@pytest.fixture(scope="module")
def phantom():
    ph = make_phantom(shape=(18, 22, 12), nvols=24, nb0=4, seed=3)
    return ph["dwi"].astype(np.float64), np.asarray(ph["bvals"], float), ph


@pytest.fixture(scope="module")
def real():
    data, bvals, _, _ = load_example()
    return data, bvals


def real_crop(real, radius):
    """The per-volume reference is slow (minutes on the whole set for r = 1):
    a centre crop, and for r = 1 the b0s and the b=500 and b=1000 shells."""
    data, bvals = real
    if radius == 0:
        return data[32:96, 32:96], bvals
    keep = np.flatnonzero(bvals <= 1000)
    return data[44:76, 44:76, 6:12][..., keep], bvals[keep]


CASES = [(model, radius) for model in ("ols", "ridge") for radius in (0, 1)]


_REFERENCES = {}


def reference(data, bvals, **kw):
    """The reference is slow: compute each case once per session."""
    # keyed by content: the id of a freed temporary is reused by later ones,
    # which would hand a test another test's reference
    digest = hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest()
    key = (data.shape, data.dtype.str, digest, tuple(sorted(kw.items())),
           hashlib.sha1(np.ascontiguousarray(bvals).tobytes()).hexdigest())
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_patch2self(data, bvals, **kw)
    return _REFERENCES[key]


def check(data, bvals, model, radius, **kw):
    ours = patch2self(data, bvals, model=model, alpha=2.0, patch_radius=radius,
                      version=1, **kw)
    ref = reference(data, bvals, model=model, alpha=2.0, patch_radius=radius, **kw)
    err = np.abs(ours - ref).max() / np.ptp(data)
    assert ours.dtype == np.float64
    assert err <= TOL, f"max error {err:.2e} of the data range"
    return ours, ref


@pytest.mark.parametrize("model,radius", CASES)
def test_phantom_matches_reference(phantom, model, radius):
    data, bvals, _ = phantom
    check(data, bvals, model, radius, shift_intensity=(radius == 0))


@pytest.mark.parametrize("model,radius", CASES)
def test_real_data_matches_reference(real, model, radius):
    data, bvals = real_crop(real, radius)
    check(data, bvals, model, radius)


def test_real_data_clip_negative(real):
    data, bvals = real_crop(real, 0)
    check(data - 0.5 * data.mean(), bvals, "ols", 0, shift_intensity=False,
          clip_negative_vals=True)


def test_lasso_matches_scikit_learn(phantom):
    data, bvals, _ = phantom
    ours = patch2self(data, bvals, model="lasso", alpha=0.5, version=1,
                      shift_intensity=False)
    ref = reference_patch2self(data, bvals, model="lasso", alpha=0.5,
                               shift_intensity=False)
    assert np.abs(ours - ref).max() / np.ptp(data) <= 1e-3


@pytest.mark.parametrize("radius", [0, 1])
def test_released_dipy_differs_by_one_constant_per_volume(phantom, radius):
    """DIPY 1.12.1 predicts from centred features (and its shift is a no-op):
    it equals the reference minus one constant per volume."""
    from dipy.denoise.patch2self import patch2self as dipy_patch2self

    data, bvals, _ = phantom
    released = dipy_patch2self(data, bvals, version=1, patch_radius=radius,
                               shift_intensity=True)  # a no-op in 1.12.1
    ref = reference(data, bvals, model="ols", alpha=2.0, patch_radius=radius,
                    shift_intensity=False)
    ours = patch2self(data, bvals, version=1, patch_radius=radius,
                      shift_intensity=False)
    diff = (ours - released).reshape(-1, data.shape[-1])
    spread = (diff.max(0) - diff.min(0)) / np.ptp(data)
    assert spread.max() <= TOL
    assert np.abs(diff.mean(0)).max() > 1e-3 * np.ptp(data)  # the offset is real
    ref_diff = (ref - released).reshape(-1, data.shape[-1])
    assert (ref_diff.max(0) - ref_diff.min(0)).max() / np.ptp(data) <= TOL


def test_quality_against_ground_truth():
    """Denoising removes noise: the error to the noise-free signal drops (48
    volumes: with too few, Patch2Self has little to regress on)."""
    ph = make_phantom(shape=(22, 26, 14), nvols=48, nb0=4, seed=5)
    data, bvals = ph["dwi"].astype(np.float64), ph["bvals"]
    mask = ph["mask"]
    clean = ph["clean"].astype(np.float64)
    den = patch2self(data, bvals, version=1, shift_intensity=False)
    before = np.sqrt(np.mean((data[mask] - clean[mask]) ** 2))
    after = np.sqrt(np.mean((den[mask] - clean[mask]) ** 2))
    assert after < 0.75 * before


@pytest.mark.parametrize("radius", [0, 1])
def test_float32_data_uses_float32_and_stays_close(phantom, radius):
    """float32 data (DIPY's usual input) is predicted in float32 by default:
    the result is the reference up to float32 rounding."""
    data, bvals, _ = phantom
    data32 = data.astype(np.float32)
    ours = patch2self(data32, bvals, patch_radius=radius, version=1)
    ref = reference(data32.astype(np.float64), bvals, model="ols", alpha=1.0,
                    patch_radius=radius)
    assert ours.dtype == np.float32
    err = np.abs(ours - ref).max() / np.ptp(data)
    assert err <= 2e-6, f"max error {err:.2e} of the data range"


def test_int16_output_from_float32_arithmetic(real):
    """int16 in, int16 out (the common scanner case): float32 arithmetic
    rounds to the same integers as the float64 reference except, rarely, at
    a half-integer, and never by more than one unit."""
    data, bvals = real_crop(real, 0)
    ints = np.rint(data * (20000 / data.max())).astype(np.int16)
    ref = reference(ints.astype(np.float64), bvals, model="ols", alpha=1.0,
                    patch_radius=0)
    want = np.clip(np.rint(ref), -32768, 32767)
    ours = patch2self(ints, bvals, version=1)
    diff = np.abs(ours.astype(np.float64) - want)
    assert ours.dtype == np.int16
    assert diff.max() <= 1
    assert np.mean(diff > 0) < 1e-3
    # float64 arithmetic gives exactly the rounded reference
    exact = patch2self(ints, bvals, version=1, precision="float64")
    np.testing.assert_array_equal(exact, want)
