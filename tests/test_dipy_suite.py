"""DIPY's own patch2self tests, run against p2s_dask.

The tests shipped in the installed DIPY wheel
(``dipy/denoise/tests/test_patch2self.py``) are imported, not copied, and
run with ``dipy.denoise.patch2self.patch2self`` replaced by
``p2s_dask.patch2self`` (the module attribute those tests call). Where we
differ from DIPY on purpose, the test is marked here with the reason and
``strict=True``, and a test of our own shows the difference (README, Python
API section).
"""

import inspect
import warnings

import numpy as np
import pytest

import p2s_dask

dipy = pytest.importorskip("dipy")
pytest.importorskip("sklearn")
wheel = pytest.importorskip("dipy.denoise.tests.test_patch2self")
import dipy.denoise.patch2self as dipy_p2s  # noqa: E402

# the wheel's tests, as shipped with DIPY 1.12.1 (a new DIPY with other
# tests should be looked at, not run blindly)
WHEEL_TESTS = (
    "test_patch2self_boundary",
    "test_patch2self_random_noise",
    "test_patch2self_v3_preserves_out_dtype_and_precision_invariance",
    "test_phantom",
    "test_single_slice_data",
    "test_validate_patch_radius_and_version",
)
# name -> why we differ on purpose; none of the wheel's tests needs one
DIFFERENCES = {}


def test_the_wheel_ships_the_tests_we_run():
    assert dipy.__version__ == "1.12.1"
    found = tuple(sorted(n for n, f in vars(wheel).items()
                         if n.startswith("test_") and callable(f)))
    assert found == WHEEL_TESTS


def _params():
    out = []
    for name in WHEEL_TESTS:
        marks = []
        if name in DIFFERENCES:
            marks.append(pytest.mark.xfail(strict=True, reason=DIFFERENCES[name]))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def _skip_reason(func):
    """The reason of a true ``skipif`` mark of the wheel's test, if any."""
    for mark in getattr(func, "pytestmark", []):
        if mark.name == "skipif" and mark.args and mark.args[0]:
            return mark.kwargs.get("reason", "skipped by DIPY")
    return None


@pytest.mark.parametrize("name", _params())
def test_dipy_wheel_test_passes_with_p2s_dask(name, monkeypatch, pytestconfig):
    func = getattr(wheel, name)
    reason = _skip_reason(func)
    if reason:
        pytest.skip(reason)
    calls = []

    def ours(*args, **kwargs):
        calls.append(kwargs.get("version", 3))
        return p2s_dask.patch2self(*args, **kwargs)

    monkeypatch.setattr(dipy_p2s, "patch2self", ours)
    with warnings.catch_warnings():
        # DIPY's tests use tiny arrays: the warning that least squares
        # interpolates the noise is ours alone (tests/test_dropin.py)
        warnings.filterwarnings("ignore", message=".*interpolates the noise")
        # DIPY's test functions take pytest's config when they draw random
        # numbers (its set_random_number_generator decorator)
        if "pytestconfig" in inspect.signature(func).parameters:
            func(pytestconfig)
        else:
            func()
    assert calls, "the wheel's test did not call patch2self"


def test_every_call_reaches_p2s_dask(monkeypatch):
    """The replacement is what the wheel's tests call: a sentinel proves it."""
    monkeypatch.setattr(dipy_p2s, "patch2self", lambda *a, **k: "ours")
    assert wheel.p2s.patch2self(np.zeros((2, 2, 2, 2)), np.zeros(2)) == "ours"
