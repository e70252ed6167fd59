"""scikit-learn estimators given as ``model=``, mapped to our solves.

DIPY's ``patch2self`` accepts an estimator object as ``model`` and fits a
copy per volume. p2s_dask fits from the statistics of the features, so it
takes the estimators whose fit those statistics determine, with their own
parameters:

* ``LinearRegression(fit_intercept=...)``: least squares (minimum norm when
  the fit is rank-deficient, as scikit-learn's ``lstsq``);
* ``Ridge(alpha=..., fit_intercept=...)``: the exact ridge solution (what
  its direct solvers compute; the iterative ones approximate it);
* ``Lasso`` and ``ElasticNet`` (``alpha``, ``l1_ratio``, ``fit_intercept``,
  ``max_iter``, ``tol``): scikit-learn's own coordinate descent, run on the
  statistics with its stopping rule, so ``max_iter`` caps it where
  scikit-learn caps it (``Lasso(alpha=a, max_iter=50)`` is DIPY's 'lasso').

They are recognised by class name and module, without importing
scikit-learn (a test dependency only). ``fit_intercept=False`` uses the
uncentred statistics. Anything else is refused with one line.
"""

from __future__ import annotations

import numbers
import sys

import numpy as np

from ..core.solve import Solver
from ..errors import InputError
from .options import spell

SUPPORTED = ("LinearRegression", "Ridge", "Lasso", "ElasticNet")
_MODULE = "sklearn.linear_model"
# scikit-learn 1.8 added gap-safe screening to its coordinate descent, which
# changes the iterates (not the optimum), so a capped fit follows the version
SCREENING_SINCE = (1, 8)


def accepted() -> str:
    """What ``model=`` accepts, for messages."""
    return ("'ols', 'ridge', 'lasso' or a scikit-learn "
            + ", ".join(SUPPORTED[:-1]) + " or " + SUPPORTED[-1] + " estimator")


def is_estimator(model) -> bool:
    """Duck typing: an object with scikit-learn's ``get_params`` and ``fit``."""
    return callable(getattr(model, "get_params", None)) and callable(
        getattr(model, "fit", None))


def solver_from_estimator(model) -> Solver:
    """The :class:`~p2s_dask.core.solve.Solver` that fits as ``model`` does.

    Raises
    ------
    InputError
        For estimators other than :data:`SUPPORTED` (subclasses included:
        they may fit differently) and for options the statistics cannot
        honour (``positive=True``, ``selection='random'``, array ``alpha``).
    """
    cls = type(model)
    name = cls.__name__
    if not (is_estimator(model) and name in SUPPORTED
            and str(cls.__module__).startswith(_MODULE)):
        raise InputError(f"{spell('model')} must be {accepted()}; got {_short(model)}")
    params = model.get_params(deep=False)
    label = _short(model)
    if params.get("positive", False):
        raise InputError(f"{spell('model')} {name}(positive=True) is not supported: "
                         "p2s_dask solves unconstrained regressions")
    fit_intercept = bool(params.get("fit_intercept", True))
    if name == "LinearRegression":
        return Solver("ridge", lam=0.0, fit_intercept=fit_intercept, label=label)
    alpha = _alpha(params.get("alpha", 1.0), name)
    if name == "Ridge":
        return Solver("ridge", lam=alpha, fit_intercept=fit_intercept, label=label)
    return _coordinate_descent(name, params, alpha, fit_intercept, label)


def _coordinate_descent(name, params, alpha, fit_intercept, label) -> Solver:
    l1_ratio = 1.0 if name == "Lasso" else float(params.get("l1_ratio", 0.5))
    if params.get("selection", "cyclic") != "cyclic":
        raise InputError(f"{spell('model')} {name}(selection={params['selection']!r}) is "
                         "not supported: use the default selection='cyclic'")
    if not 0.0 <= l1_ratio <= 1.0 or alpha * l1_ratio == 0.0:
        raise InputError(f"{spell('model')} {name} needs alpha > 0 and 0 < l1_ratio <= 1 "
                         f"(got alpha={alpha}, l1_ratio={l1_ratio}); without an l1 "
                         "penalty use Ridge or LinearRegression")
    max_iter, tol = params.get("max_iter", 1000), params.get("tol", 1e-4)
    if not isinstance(max_iter, numbers.Integral) or max_iter < 1:
        raise InputError(f"{spell('model')} {name}: max_iter must be a positive "
                         f"integer; got {max_iter!r}")
    return Solver("cd", alpha=alpha, l1_ratio=l1_ratio, fit_intercept=fit_intercept,
                  max_iter=int(max_iter), tol=float(tol), screening=_screens(),
                  label=label)


def _alpha(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not np.isfinite(value) or value < 0:
        raise InputError(f"{spell('model')} {name}: alpha must be one finite number "
                         f">= 0; got {value!r}")
    return float(value)


def _screens() -> bool:
    """Whether the loaded scikit-learn screens coordinates (>= 1.8)."""
    sklearn = sys.modules.get("sklearn")
    version = str(getattr(sklearn, "__version__", ""))
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return True
    return parts >= SCREENING_SINCE if len(parts) == 2 else True


def _short(model) -> str:
    text = repr(model)
    return text if len(text) <= 60 and "\n" not in text else type(model).__name__
