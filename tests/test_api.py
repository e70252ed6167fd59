"""The patch2self API: argument checks, chunk invariance, dtypes, dask in/out."""

import warnings

import dask.array as da
import numpy as np
import pytest

from p2s_dask import InputError, patch2self
from p2s_dask.testing.reference import reference_patch2self


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(42)
    shape = (14, 13, 9)
    anat = 800 + 300 * np.sin(np.linspace(0, 3, shape[0]))[:, None, None] * \
        np.cos(np.linspace(0, 2, shape[1]))[None, :, None] * np.ones(shape)
    bvals = np.array([0, 0, 0, 5] + [1000] * 8 + [2000] * 6, dtype=float)
    atten = np.where(bvals > 50, rng.uniform(0.2, 0.6, bvals.size), 1.0)
    data = anat[..., None] * atten + rng.normal(0, 40, shape + (bvals.size,))
    return data, bvals


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("kwargs,needle", [
    (dict(patch_radius=-1), "non-negative"),
    (dict(patch_radius=1.5), "non-negative integers"),
    (dict(patch_radius=(1, 1)), "three"),
    (dict(model="svm"), "unknown model"),
    (dict(model=object()), "model must be"),
    (dict(alpha=-0.1, model="ridge"), "alpha"),
    (dict(version=2), "version"),
    (dict(version=3, patch_radius=1), "version=3"),
    (dict(out_dtype="banana"), "out_dtype"),
])
def test_bad_options_raise_one_line(small, kwargs, needle):
    data, bvals = small
    with pytest.raises(InputError) as excinfo:
        patch2self(data, bvals, **kwargs)
    assert needle in one_line(excinfo)


def test_bad_shapes_and_bvals(small):
    data, bvals = small
    with pytest.raises(InputError) as excinfo:
        patch2self(data[..., 0], bvals)
    assert "4D" in one_line(excinfo)
    with pytest.raises(InputError) as excinfo:
        patch2self(data, bvals[:-1])
    assert "17 values but the data has 18 volumes" in one_line(excinfo)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_reported_with_count_and_first_index(small, bad):
    data, bvals = small
    data = data.copy()
    data[3, 4, 5, 6] = bad
    data[7, 1, 2, 0] = bad
    with pytest.raises(InputError) as excinfo:
        patch2self(data, bvals)
    msg = one_line(excinfo)
    assert "2 NaN or Inf" in msg and "(3, 4, 5, 6)" in msg
    lazy = patch2self(da.from_array(data, chunks=(5, 5, 5, 18)), bvals)
    with pytest.raises(InputError) as excinfo:
        lazy.compute()
    assert "2 NaN or Inf" in one_line(excinfo) and "(3, 4, 5, 6)" in str(excinfo.value)


def test_few_volumes_warn_and_single_b0_passes_through(small, caplog):
    import logging
    data, bvals = small
    sub = data[..., 3:12]  # one b0 (bval 5) and eight DWIs
    # DIPY's warning for few volumes; the pass-through goes to the log, as
    # DIPY is silent about it
    with pytest.warns(UserWarning, match="less than 10 3D volumes"), \
            caplog.at_level(logging.INFO, logger="p2s_dask"):
        out = patch2self(sub, bvals[3:12], version=1)
    assert any("single volume" in r.getMessage() for r in caplog.records)
    # shift of a pass-through volume is zero, so it is copied exactly
    np.testing.assert_array_equal(out[..., 0], sub[..., 0])


def test_no_b0_at_all(small):
    data, bvals = small
    dwi = data[..., 4:]
    out = patch2self(dwi, bvals[4:], version=1, shift_intensity=False)
    ref = reference_patch2self(dwi, bvals[4:], shift_intensity=False)
    assert np.abs(out - ref).max() <= 1e-6 * np.ptp(dwi)


def test_b0_denoising_false_keeps_b0(small):
    data, bvals = small
    out = patch2self(data, bvals, b0_denoising=False, shift_intensity=False)
    np.testing.assert_array_equal(out[..., :4], data[..., :4])
    assert not np.allclose(out[..., 4:], data[..., 4:])


@pytest.mark.parametrize("radius", [0, 1])
def test_chunk_invariance(small, radius):
    data, bvals = small
    results = [patch2self(data, bvals, version=1, patch_radius=radius, chunks=c)
               for c in [None, (14, 13, 9), (5, 4, 3), (3, 13, 2), (7, 1, 9)]]
    scale = np.abs(results[0]).max()
    for other in results[1:]:
        assert np.abs(other - results[0]).max() <= 1e-9 * scale


@pytest.mark.parametrize("radius", [0, 1])
def test_dask_in_gives_lazy_dask_out(small, radius):
    data, bvals = small
    eager = patch2self(data, bvals, version=1, patch_radius=radius)
    lazy = patch2self(da.from_array(data, chunks=(4, 6, 5, 6)), bvals, version=1,
                      patch_radius=radius)
    assert isinstance(lazy, da.Array) and lazy.dtype == data.dtype
    np.testing.assert_allclose(lazy.compute(), eager, rtol=0, atol=1e-9 * np.abs(eager).max())


def test_integer_output_rounds_and_clips(small):
    data, bvals = small
    ints = np.clip(np.rint(data / 8), 0, 255).astype(np.uint8)
    out = patch2self(ints, bvals, shift_intensity=False)
    ref = reference_patch2self(ints.astype(np.float64), bvals, shift_intensity=False)
    assert out.dtype == np.uint8
    want = np.clip(np.rint(ref), 0, 255)
    # rounding may differ only where the float result sits at a half integer
    assert np.abs(out.astype(float) - want).max() <= 1
    assert np.mean(out.astype(float) == want) > 0.999
    # a float output requested from integer input is not rounded
    flt = patch2self(ints, bvals, shift_intensity=False, out_dtype=np.float64)
    assert np.abs(flt - ref).max() <= 1e-6 * 255


def test_clip_and_shift_conflict_warns_and_clips(small):
    data, bvals = small
    shifted = data - 900.0  # plenty of negative values
    with pytest.warns(UserWarning, match="clipping"):
        out = patch2self(shifted, bvals, clip_negative_vals=True, shift_intensity=True)
    assert out.min() == 0.0


def test_shift_intensity_matches_original_minima(small):
    data, bvals = small
    out = patch2self(data, bvals, version=1)
    np.testing.assert_allclose(out.reshape(-1, 18).min(0), data.reshape(-1, 18).min(0),
                               rtol=1e-12)


def test_mask_fits_on_mask_voxels_only(small):
    data, bvals = small
    mask = np.zeros(data.shape[:3], bool)
    mask[2:12, 3:10, 1:8] = True
    out = patch2self(data, bvals, mask=mask, shift_intensity=False, version=1)
    ref = reference_patch2self(data, bvals, mask=mask, shift_intensity=False)
    assert np.abs(out - ref).max() <= 1e-6 * np.ptp(data)
    with pytest.raises(InputError, match="mask has shape"):
        patch2self(data, bvals, mask=mask[:-1])


def test_explicit_groups(small):
    data, bvals = small
    labels = np.array([0] * 4 + [1] * 8 + [2] * 6)
    out = patch2self(data, bvals, groups=labels, shift_intensity=False, version=1)
    # group 2 alone equals the DWI of a run on those volumes alone
    sub = patch2self(data[..., 12:], bvals[12:], shift_intensity=False, version=1)
    np.testing.assert_allclose(out[..., 12:], sub, atol=1e-9 * np.ptp(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keep = patch2self(data, bvals, groups=np.where(labels == 0, -1, labels),
                          shift_intensity=False)
    np.testing.assert_array_equal(keep[..., :4], data[..., :4])
    with pytest.raises(InputError, match="groups must be"):
        patch2self(data, bvals, groups=labels[:-1])
