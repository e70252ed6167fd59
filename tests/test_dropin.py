"""p2s_dask.patch2self as a drop-in for DIPY's: what DIPY's main branch
checks beyond the wheel's tests (tmp_dir, gram, patch_radius), positional
arguments, warnings and logging side by side with DIPY 1.12.1, and
scikit-learn estimators as ``model=``."""

import logging
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from p2s_dask import InputError, patch2self
from p2s_dask.datasets import load_example

pytest.importorskip("dipy")
sklearn_linear = pytest.importorskip("sklearn.linear_model")
from dipy.denoise.patch2self import _extract_3d_patches  # noqa: E402
from dipy.denoise.patch2self import patch2self as dipy_patch2self  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import (ElasticNet, Lasso, LinearRegression,  # noqa: E402
                                  Ridge)

TOL = 1e-6  # of the data range
# DIPY's tiny test arrays with patches fit more regressors than voxels; the
# warning that says so is ours alone (tests/test_illposed.py)
pytestmark = pytest.mark.filterwarnings("ignore:.*interpolates the noise:UserWarning")


def noisy(shape, seed=0):
    rng = np.random.default_rng(seed)
    return 30 + 2 * rng.standard_normal(shape)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def real():
    """2304 voxels of the bundled acquisition, 45 volumes (5 b0, 40 DWI)."""
    data, bvals, _, _ = load_example()
    return data[52:76, 52:76, 7:11], bvals


def estimator_reference(data, bvals, estimator, radius=0, b0_threshold=50):
    """A fresh clone of ``estimator`` fitted and predicted per volume on
    DIPY's patch features (b0 and DWI groups; a group of one is copied)."""
    with threadpool_limits(1):  # many small fits: threads only compete
        return _estimator_reference(data, bvals, estimator, radius, b0_threshold)


def _estimator_reference(data, bvals, estimator, radius, b0_threshold):
    data = np.asarray(data, np.float64)
    out = data.copy()
    is_b0 = bvals <= b0_threshold
    for idx in (np.flatnonzero(is_b0), np.flatnonzero(~is_b0)):
        if idx.size < 2:
            continue
        group = data[..., idx]
        padded = np.pad(group, [(radius, radius)] * 3 + [(0, 0)])
        feats = _extract_3d_patches(padded, (radius,) * 3)
        p = feats.shape[1]
        for v in range(idx.size):
            x = np.delete(feats, v, axis=0).reshape((idx.size - 1) * p, -1).T
            fitted = clone(estimator).fit(x, feats[v, p // 2])
            out[..., idx[v]] = fitted.predict(x).reshape(group.shape[:3])
    return out


# -- tmp_dir, gram and patch_radius as DIPY's main branch checks them ---------

@pytest.mark.parametrize("version,where", [
    (3, "missing"), (1, "missing"), (1, "existing"), (3, "existing"), (3, None),
    (1, None)])
def test_tmp_dir_checked_as_dipy_does(tmp_path, version, where):
    """DIPY (1.12.1 and main alike) refuses any tmp_dir with version 1 and a
    missing one with version 3, with ValueError; so do we, in one line."""
    tmp_dir = {"missing": str(tmp_path / "nonexistent_dir"), "existing": str(tmp_path),
               None: None}[where]
    data, bvals = noisy((6, 6, 4, 12)), np.r_[0.0, 0.0, [1000.0] * 10]
    kw = dict(version=version, tmp_dir=tmp_dir)
    try:
        dipy_patch2self(data, bvals, **kw)
        dipy_raised = False
    except ValueError:
        dipy_raised = True
    if not dipy_raised:
        assert patch2self(data, bvals, **kw).shape == data.shape
        return
    with pytest.raises(InputError) as excinfo:  # InputError is a ValueError
        patch2self(data, bvals, **kw)
    needle = "does not exist" if version == 3 else "not supported for Patch2Self version 1"
    assert needle in one_line(excinfo)


def test_gram_is_accepted_and_changes_nothing():
    data, bvals = noisy((8, 7, 5, 12)), np.r_[0.0, 0.0, [1000.0] * 10]
    base = patch2self(data, bvals, version=1, patch_radius=1)
    for gram in (True, False):
        np.testing.assert_array_equal(
            patch2self(data, bvals, version=1, patch_radius=1, gram=gram), base)


@pytest.mark.parametrize("bad", [(1, 1), np.array([1, 1]), (1, 1, 1, 1)])
def test_patch_radius_length_refused_as_dipy_main_words_it(bad):
    data, bvals = noisy((5, 5, 5, 10)), np.zeros(10)
    with pytest.raises(ValueError, match="patch_radius must be a scalar or a 3-element array."):
        patch2self(data, bvals, patch_radius=bad, version=1)


def test_patch_radius_forms_dipy_main_accepts():
    """DIPY main accepts NumPy arrays; DIPY 1.12.1 fails on them (it tests
    the raw value against (0, 0, 0)): we follow main."""
    data, bvals = noisy((5, 6, 4, 12)), np.r_[0.0, 0.0, [1000.0] * 10]
    with pytest.raises(ValueError):
        dipy_patch2self(data, bvals, patch_radius=np.array([1, 1, 1]), version=1)
    want = patch2self(data, bvals, patch_radius=(1, 1, 1), version=1)
    for form in (1, np.array(1), np.array([1, 1, 1]), [1], [1, 1, 1]):
        np.testing.assert_array_equal(
            patch2self(data, bvals, patch_radius=form, version=1), want)


def test_patch_radius_zero_as_int_with_version_3():
    """DIPY 1.12.1 compares the raw patch_radius with (0, 0, 0), so
    patch_radius=0 fails with version 3; DIPY main normalises it first and
    accepts it, as we do (a deliberate difference from 1.12.1)."""
    data, bvals = noisy((6, 6, 4, 12)), np.r_[0.0, 0.0, [1000.0] * 10]
    with pytest.raises(ValueError, match="not supported for Patch2Self version 3"):
        dipy_patch2self(data, bvals, patch_radius=0, version=3)
    np.testing.assert_array_equal(patch2self(data, bvals, patch_radius=0, version=3),
                                  patch2self(data, bvals, version=3))


@pytest.mark.parametrize("bad", [1.5, -1])
def test_patch_radius_that_dipy_would_truncate_is_refused(bad):
    """DIPY main casts patch_radius with ``np.asarray(r, dtype=int)``, so
    1.5 becomes 1 silently; we refuse non-integers and negatives."""
    data, bvals = noisy((5, 5, 5, 10)), np.zeros(10)
    with pytest.raises(ValueError, match="non-negative integers"):
        patch2self(data, bvals, patch_radius=bad, version=1)


# -- what DIPY main's tests check beyond the wheel's ----------------------------

def test_few_volumes_warn_with_dipys_words_and_still_denoise():
    data, bvals = noisy((4, 4, 4, 5)), np.array([0, 1000, 1000, 1000, 1000.0])
    with pytest.warns(UserWarning, match="less than 10 3D volumes") as rec:
        out = patch2self(data, bvals, model="ols", version=3)
    assert out.shape == data.shape and np.all(np.isfinite(out))
    assert all("single" not in str(w.message) for w in rec)


@pytest.mark.parametrize("model", ["ols", "ridge", "lasso"])
def test_version1_models_with_verbose_log_and_print_nothing(model, capsys, caplog):
    data, bvals = np.random.default_rng(2026).random((5, 5, 5, 12)), \
        np.r_[0.0, 0.0, [1000.0] * 10]
    with caplog.at_level(logging.INFO, logger="p2s_dask"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*interpolates the noise")
        out = patch2self(data, bvals, model=model, version=1, alpha=0.5, verbose=True)
    assert out.shape == data.shape
    assert capsys.readouterr().out == ""
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("p2s_dask")]
    assert any("denoised" in m for m in messages)
    assert any("dwi group" in m for m in messages)


def test_b0_passthrough_with_b0_denoising_false_and_interleaved_b0s():
    data = noisy((6, 6, 4, 12), seed=2026)
    bvals = np.array([1000, 1000, 0] * 4, float)
    out = patch2self(data, bvals, version=3, b0_denoising=False, shift_intensity=False)
    b0 = bvals == 0
    np.testing.assert_array_equal(out[..., b0], data[..., b0])


@pytest.mark.parametrize("shape", [(6, 6, 4, 13), (10, 10, 10, 12)])
def test_every_volume_is_written(shape):
    """DIPY main fixed volume counts not divisible by 5 and tiny images in
    its version 3; every volume here is denoised and finite."""
    data = noisy(shape, seed=2026)
    out = patch2self(data, np.full(shape[3], 1000.0), version=3)
    assert np.all(np.isfinite(out))
    assert np.all(out.reshape(-1, shape[3]).std(axis=0) > 0)


# -- positional arguments, warnings and logging, side by side with DIPY --------

def _names_in(message):
    found = re.match(r"Pass (\[.*?\]) as keyword args", message)
    return found and found.group(1)


def test_positional_options_warn_as_dipy_does():
    data, bvals = noisy((8, 8, 6, 12)), np.r_[0.0, 0.0, [1000.0] * 10]
    args = (data, bvals, (0, 0, 0), "ridge", 50, None, 2.0, False, True, False, False,
            None, 1)
    with pytest.warns(UserWarning) as theirs:
        dipy_patch2self(*args)
    with pytest.warns(UserWarning, match=r"Pass \[.*\] as keyword args") as mine:
        out = patch2self(*args)
    [want] = [_names_in(str(w.message)) for w in theirs if _names_in(str(w.message))]
    [got] = [w for w in mine if _names_in(str(w.message))]
    assert _names_in(str(got.message)) == want and got.category is UserWarning
    assert got.filename == __file__  # points at the caller's line
    np.testing.assert_array_equal(out, patch2self(
        data, bvals, patch_radius=(0, 0, 0), model="ridge", alpha=2.0,
        shift_intensity=False, version=1))


def test_positional_misuse_is_a_type_error():
    """DIPY drops extra positional arguments and lets a positional value win
    over the same keyword; both are errors here."""
    data, bvals = noisy((6, 6, 4, 12)), np.r_[0.0, 0.0, [1000.0] * 10]
    with pytest.raises(TypeError, match="at most 13 positional"):
        patch2self(data, bvals, 0, "ols", 50, None, 1.0, False, True, False, True,
                   None, 1, True)
    with pytest.raises(TypeError, match="multiple values for argument 'patch_radius'"):
        patch2self(data, bvals, 0, patch_radius=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch2self(data=data, bvals=bvals, version=1)


KNOWN = [("few volumes", r"less than 10 3D volumes"),
         ("clip and shift", r"^Both `clip_negative_vals` and `shift_intensity`"),
         ("positional", r"^Pass \[.*\] as keyword args")]


def _warnings_of(call):
    """``(category, what)`` of every warning a call raises; scikit-learn's own
    (DIPY's fits) are left out, unknown messages are kept whole."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        call()
    out = []
    for w in rec:
        if w.category.__module__.startswith(("sklearn", "scipy")):
            continue
        text = str(w.message)
        what = next((k for k, pattern in KNOWN if re.search(pattern, text)), text)
        out.append((w.category, what))
    return sorted(out, key=repr)


@pytest.mark.parametrize("case", ["single b0, 9 volumes", "plain", "clip and shift",
                                  "positional", "b0 not denoised", "verbose"])
def test_same_warnings_as_dipy(case):
    rng = np.random.default_rng(3)
    n = 9 if case.startswith("single") else 12
    data = 30 + 2 * rng.standard_normal((8, 8, 6, n))
    bvals = np.r_[0.0, [1000.0] * (n - 1)] if n == 9 else np.r_[0.0, 0.0, [1000.0] * 10]
    args, kw = (data, bvals), dict(version=1)
    if case == "clip and shift":
        kw.update(clip_negative_vals=True)
    elif case == "positional":
        args = (data, bvals, (0, 0, 0), "ols")
    elif case == "b0 not denoised":
        kw.update(b0_denoising=False)
    elif case == "verbose":
        kw.update(verbose=True)
    theirs = _warnings_of(lambda: dipy_patch2self(*args, **kw))
    mine = _warnings_of(lambda: patch2self(*args, **kw))
    assert mine == theirs


def test_single_b0_goes_to_the_log_not_to_warnings(caplog):
    data, bvals = noisy((8, 8, 6, 12)), np.r_[0.0, [1000.0] * 11]
    with caplog.at_level(logging.INFO, logger="p2s_dask"), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = patch2self(data, bvals, version=1)
    np.testing.assert_array_equal(out[..., 0], data[..., 0])
    [line] = [r for r in caplog.records if "single volume" in r.getMessage()]
    assert line.levelno == logging.INFO and line.name.startswith("p2s_dask")
    assert line.getMessage().startswith("b0 denoising skipped")


def test_verbose_without_logging_configured_goes_to_stderr(monkeypatch, capsys):
    """With no handler anywhere, verbose=True adds one on stderr for the call
    (stdout stays clean) and leaves the logger as it found it."""
    log = logging.getLogger("p2s_dask")
    monkeypatch.setattr(log, "propagate", False)
    level = log.level
    data, bvals = noisy((8, 8, 6, 12)), np.r_[0.0, 0.0, [1000.0] * 10]
    patch2self(data, bvals, version=1, verbose=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "denoised" in captured.err
    assert log.level == level and not log.handlers
    patch2self(data, bvals, version=1)
    assert capsys.readouterr().err == ""


# -- scikit-learn estimators as model= ------------------------------------------

ESTIMATORS = [LinearRegression(), LinearRegression(fit_intercept=False), Ridge(alpha=3.0),
              Ridge(alpha=3.0, fit_intercept=False), Lasso(alpha=2.0),
              Lasso(alpha=1.0, max_iter=50), Lasso(alpha=1.0, fit_intercept=False),
              ElasticNet(alpha=2.0, l1_ratio=0.3)]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=repr)
def test_estimator_matches_scikit_learn(real, estimator):
    data, bvals = real
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = estimator_reference(data, bvals, estimator)
        ours = patch2self(data, bvals, model=estimator, version=1, shift_intensity=False,
                          alpha=100.0)  # an estimator's own alpha rules
    assert np.abs(ours - ref).max() <= TOL * np.ptp(data)


@pytest.mark.parametrize("estimator", [
    LinearRegression(positive=True), Ridge(positive=True), Lasso(positive=True)], ids=repr)
def test_positive_estimators_refused(estimator):
    data, bvals = noisy((6, 6, 4, 12)), np.r_[0.0, 0.0, [1000.0] * 10]
    with pytest.raises(InputError) as excinfo:
        patch2self(data, bvals, model=estimator)
    assert "positive=True" in one_line(excinfo)


class MyRidge(Ridge):
    """A subclass may fit differently: refused."""


@pytest.mark.parametrize("model", [
    "DummyRegressor", "SGDRegressor", "RidgeCV", MyRidge(), object(), Lasso(alpha=0.0),
    Lasso(selection="random")], ids=repr)
def test_other_models_refused_in_one_line(model):
    if isinstance(model, str):
        import sklearn.dummy
        model = getattr(sklearn.dummy, model, None) or getattr(sklearn_linear, model)
        model = model()
    data, bvals = noisy((6, 6, 4, 12)), np.r_[0.0, 0.0, [1000.0] * 10]
    with pytest.raises(InputError) as excinfo:
        patch2self(data, bvals, model=model)
    msg = one_line(excinfo)
    assert "LinearRegression, Ridge, Lasso or ElasticNet" in msg or "selection" in msg \
        or "l1_ratio" in msg


def test_scikit_learn_is_not_needed():
    """Estimators are recognised by name: p2s_dask imports no scikit-learn."""
    code = ("import sys; sys.modules['sklearn'] = None; import numpy as np; "
            "import p2s_dask; d = np.random.default_rng(0).random((6, 6, 4, 12)); "
            "p2s_dask.patch2self(d, np.r_[0, 0, [1000] * 10], version=1, model='lasso')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- lasso: converged by default, DIPY's cap on request -------------------------

def test_capped_lasso_matches_scikit_learn_on_dipys_settings(real):
    """DIPY's 'lasso' is scikit-learn's Lasso(alpha, max_iter=50) with the
    default tol; the same estimator here stops where scikit-learn stops, and
    warns (ConvergenceWarning) for as many volumes as scikit-learn does."""
    data, bvals = real
    capped = Lasso(alpha=1.0, max_iter=50)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        ref = estimator_reference(data, bvals, capped)
    with warnings.catch_warnings(record=True) as mine:
        warnings.simplefilter("always")
        ours = patch2self(data, bvals, model=capped, version=1, shift_intensity=False)
    assert np.abs(ours - ref).max() <= TOL * np.ptp(data)
    sklearn_count = sum(issubclass(w.category, ConvergenceWarning) for w in theirs)
    ours_count = sum(int(re.search(r"for (\d+) of", str(w.message)).group(1))
                     for w in mine if issubclass(w.category, ConvergenceWarning))
    assert ours_count == sklearn_count


def test_capped_lasso_with_patches(real):
    data, bvals = real
    data, bvals = data[8:16, 8:16, :3, :25], bvals[:25]
    capped = Lasso(alpha=1.0, max_iter=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = estimator_reference(data, bvals, capped, radius=1)
        ours = patch2self(data, bvals, model=capped, version=1, patch_radius=1,
                          shift_intensity=False)
    assert np.abs(ours - ref).max() <= TOL * np.ptp(data)


@pytest.mark.parametrize("radius", [0, 1])
def test_released_dipy_lasso_is_the_capped_fit(real, radius):
    """DIPY 1.12.1's model='lasso' (float64 data, so DIPY computes in float64)
    is our Lasso(alpha=1, max_iter=50) up to its per-volume constant (it
    predicts from centred features). Our default 'lasso' is the converged
    solution, which differs from it by more than that."""
    data, bvals = real
    if radius:
        data, bvals = data[8:16, 8:16, :3, :25], bvals[:25]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        released = dipy_patch2self(data, bvals, model="lasso", alpha=1.0, version=1,
                                   shift_intensity=False, patch_radius=radius)
        capped = patch2self(data, bvals, model=Lasso(alpha=1.0, max_iter=50), version=1,
                            shift_intensity=False, patch_radius=radius)
    n = data.shape[3]

    def spread(a):
        d = (a - released).reshape(-1, n)
        return (d.max(0) - d.min(0)).max() / np.ptp(data)
    assert spread(capped) <= TOL
    if radius == 0:  # (the converged fit with patches takes long on 192 voxels)
        converged = patch2self(data, bvals, model="lasso", alpha=1.0, version=1,
                               shift_intensity=False)
        assert spread(converged) > 100 * TOL
