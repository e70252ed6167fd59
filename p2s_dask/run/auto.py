"""Letting the data choose the patch radius and the ridge penalty of a run.

``patch_radius='auto'`` (``--patch-radius auto``, up to ``max_patch_radius``)
and ``alpha='auto'`` (ridge) are exact K-fold cross-validation from the
statistics (:mod:`p2s_dask.core.crossval`):

1. the statistics pass runs at the largest radius ``R``, over the blocks of
   a fixed-radius run, merged per fold of whole blocks (``K = 5`` folds:
   z-slabs of blocks dealt in turn, :func:`fold_labels`) and into the total;
2. every candidate (radius ``0 .. R``; 'ols', the given ridge penalty, or
   every penalty of the grid) is scored from the total and one fold at a
   time, with no pass over the data, and one radius, model and penalty is
   chosen for the run (:func:`decide`: the least held-out error summed over
   the groups; ties go to the smaller radius, then the larger penalty);
3. the chosen setting is fitted from the total's sub-block of its features
   (:func:`chosen_stats`): the chosen radius's statistics exactly, with no
   second statistics pass; the prediction runs at the chosen radius.

What it costs
-------------
- one radius-``R`` statistics pass, whatever is chosen: when it picks
  radius 0 it still paid for radius ``R`` (about 27 times the radius-0
  statistics at ``R = 1``); the blocks are at most ``ceil(z / 2K)`` planes
  thick (:func:`~p2s_dask.planning.plan.fold_chunks`), so thin images pay
  some more halo;
- the folds: a file run writes each fold's statistics into its work store
  as it is merged (``K`` F x F float64 per group on disk, removed with the
  work store) and reads them back one at a time; the in-memory API keeps
  them when ``K +`` :func:`~p2s_dask.planning.plan.crossval_scatters` of
  them fit its budget, else computes each fold's statistics again when it
  is scored (a second statistics pass, one group at a time);
- the scoring, in this process: per fold and radius one training fit
  (:func:`~p2s_dask.core.solve.fit_ridge`; beyond 5 penalties one
  eigendecomposition serves them all), about ``K`` solves at radius ``R``;
- memory: the total, one fold and the training matrix its solve inverts
  in place (and the eigenvectors serving a grid of penalties):
  :func:`~p2s_dask.planning.plan.crossval_scatters` F x F of a group.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..config.options import spell
from ..config.validate import describe_nonfinite
from ..core import Stats, merge, patch_size
from ..core.crossval import block_folds, choose, penalty_grid, score_group, sub_features
from ..errors import DataError, InputError
from ..graph.engine import IN_MEMORY_BUDGET, Summary, fold_summaries, local_threads
from ..planning.plan import crossval_scatters, solve_threads
from .threads import solving_blas

__all__ = ["add_fold", "choice_line", "choose_in_memory", "chosen_stats", "decide",
           "fitted_setting", "fold_labels", "sidecar_record"]


# -- folds ---------------------------------------------------------------------

def fold_labels(numblocks, n_folds: int) -> np.ndarray:
    """The fold of every block of a chunk grid: no more folds than blocks,
    at least two (else one line naming ``chunks``)."""
    numblocks = tuple(int(n) for n in numblocks[:3])
    k = min(int(n_folds), math.prod(numblocks))
    if k < 2:
        raise InputError(f"cross-validation ('auto') needs at least two blocks to make "
                         f"folds; the image is one block: give smaller {spell('chunks')}")
    return block_folds(numblocks, k)


def _copy(st: Stats) -> Stats:
    return Stats(st.count, st.mean.copy(), st.scatter.copy(order="K"))


def add_fold(total: Summary | None, part: Summary) -> Summary:
    """``total`` with the fold ``part`` merged in (``total`` is spent,
    ``part`` left as it is: another may hold it)."""
    if total is None:
        return Summary([None if st is None else _copy(st) for st in part.stats],
                       part.minima.copy(), part.nonfinite, part.first_nonfinite)
    stats = [None if a is None else _copy(b) if a.count == 0 else merge(a, b, overwrite_a=True)
             for a, b in zip(total.stats, part.stats)]
    return Summary(stats, np.minimum(total.minima, part.minima),
                   total.nonfinite + part.nonfinite,
                   total.first_nonfinite or part.first_nonfinite)


# -- scores and the choice -----------------------------------------------------

def _penalties(auto, totals, n_offsets) -> tuple:
    """The penalties scored for every group: none ('ols'), the given one,
    or the union of the groups' grids (one alpha for all groups: each is
    scored on every group's grid)."""
    if auto.model == "ols":
        return ()
    if auto.alpha is not None:
        return (float(auto.alpha),)
    try:
        grids = [penalty_grid(st, n_offsets) for st in totals]
    except ValueError as exc:
        raise DataError(f"cross-validation: {exc}") from None
    return tuple(float(a) for a in np.unique(np.concatenate(grids))) if grids else ()


def _scores(auto, totals, fold_of, groups, n_folds) -> dict:
    """:func:`~p2s_dask.core.crossval.score_group` of every regressed group,
    its folds formed one at a time by ``fold_of(fold, group index)``."""
    fitted = [i for i, (g, st) in enumerate(zip(groups, totals))
              if st is not None and len(g.indices) > 1]
    penalties = _penalties(auto, [totals[i] for i in fitted], patch_size(auto.radius))
    tables = {}
    for i in fitted:
        folds = [functools.partial(fold_of, k, i) for k in range(n_folds)]
        try:
            tables[groups[i].name] = score_group(folds, auto.radius, auto.radii, penalties,
                                                 auto.model == "ols", total=totals[i])
        except ValueError as exc:  # e.g. a mask that lies within one fold
            raise DataError(f"cross-validation: {exc}") from None
    return {"n_folds": int(n_folds), "radius": list(auto.radius), "groups": tables}


def decide(auto, totals, fold_of, groups, n_folds: int) -> dict:
    """Score every candidate and choose one setting for the run.

    Parameters
    ----------
    auto : AutoSettings
    totals : list of Stats or None
        Each group's total statistics at ``auto.radius`` (None: passed
        through).
    fold_of : callable
        ``fold_of(k, i)``: group ``i``'s statistics of fold ``k``, formed
        when called (the scoring holds one at a time).
    groups : list of Group
    n_folds : int

    Returns
    -------
    dict
        :func:`~p2s_dask.core.crossval.choose`'s record (the table of
        held-out errors under ``table``) plus ``setting`` (the radius,
        model and alpha the run fits), ``chosen`` (what was left to the
        data) and ``n_folds``; plain JSON data.
    """
    scores = _scores(auto, totals, fold_of, groups, n_folds)
    if not scores["groups"]:  # every group passed through: nothing depends on it
        setting = {"radius": list(auto.radii[0]), "model": auto.model, "alpha": auto.alpha}
        return {"setting": setting, "chosen": auto.chosen, "n_folds": int(n_folds),
                "note": "no group is regressed: nothing to score", "table": scores}
    choice = choose(scores, shared_penalty=True)
    picked = next(iter(choice["groups"].values()))
    setting = {"radius": [int(r) for r in choice["radius"]], "model": picked["model"],
               "alpha": picked["alpha"]}
    return dict(choice, setting=setting, chosen=auto.chosen, n_folds=int(n_folds))


def fitted_setting(record: dict, alpha) -> tuple:
    """``(radius, model, alpha)`` to fit: the chosen ones (``alpha`` the
    run's own where the chosen model has none)."""
    s = record["setting"]
    penalty = s["alpha"] if s["alpha"] is not None else alpha
    return tuple(int(r) for r in s["radius"]), s["model"], \
        float(penalty) if isinstance(penalty, (int, float)) else 1.0


def chosen_stats(totals, radius, chosen) -> list:
    """Each group's statistics of the ``chosen`` radius's features: the
    sub-block of its radius-``radius`` total (the total itself when equal)."""
    out = []
    for st in totals:
        if st is None:
            out.append(None)
            continue
        idx = sub_features(radius, chosen, st.n_features // patch_size(radius))
        out.append(st if idx.size == st.n_features else st.subset(idx))
    return out


# -- the in-memory API ---------------------------------------------------------

def _holds_folds(groups, auto, n_folds) -> bool:
    """Whether every fold's statistics fit the in-memory budget beside the
    scoring's own matrices."""
    scatters = sum(8 * (len(g.indices) * patch_size(auto.radius)) ** 2
                   for g in groups if g.denoise)
    return (n_folds + crossval_scatters(auto.penalty_grid)) * scatters <= IN_MEMORY_BUDGET


def _checked(summary: Summary) -> Summary:
    if summary.nonfinite:
        raise InputError(describe_nonfinite(summary.nonfinite, summary.first_nonfinite))
    return summary


def choose_in_memory(executor, arr, spec, check_finite: bool, lanes: int):
    """The total statistics at ``spec.auto.radius`` and the choice of an
    in-memory run: each fold's statistics computed on ``executor`` (one
    fold at a time, through the blocks of a fixed-radius run), kept when
    they fit the budget, else computed again when scored.

    Returns
    -------
    (Summary, dict)
        The total and :func:`decide`'s record.
    """
    auto = spec.auto
    labels = fold_labels(tuple(len(c) for c in arr.chunks[:3]), auto.n_folds)
    n_folds = int(labels.max()) + 1
    hold = _holds_folds(spec.groups, auto, n_folds)
    threads = lanes if any(auto.radius) else None  # as the statistics of a run
    total, held = None, []
    for graph in fold_summaries(arr, spec.groups, auto.radius, spec.mask, labels,
                                check_finite, lanes):
        part = _checked(executor.compute(graph, threads=threads))
        total = add_fold(total, part)
        held.append(part if hold else None)

    def fold_of(k, i):
        if held[k] is not None:
            return held[k].stats[i]
        again = fold_summaries(arr, [spec.groups[i]], auto.radius, spec.mask, labels,
                               False, lanes)[k]
        return executor.compute(again, threads=threads).stats[0]

    # the scoring runs alone here (a fold computed again runs its tasks
    # first), on the cores a file run's scoring gets
    with solving_blas(solve_threads(auto.radius, local_threads())):
        return total, decide(auto, total.stats, fold_of, spec.groups, n_folds)


# -- for people ------------------------------------------------------------------

def _joint(record: dict) -> dict:
    """``{(radius, model, alpha): (error, mse)}`` summed over the groups."""
    sums = {}
    for table in record["table"]["groups"].values():
        cells = table["count"] * table["volumes"]
        for row in table["candidates"]:
            key = (tuple(row["radius"]), row["model"], row["alpha"])
            error, count = sums.get(key, (0.0, 0))
            sums[key] = (error + row["error"], count + cells)
    return {k: (e, e / max(c, 1)) for k, (e, c) in sums.items()}


def _radius_text(radius) -> str:
    radius = [int(r) for r in radius]
    return str(radius[0]) if len(set(radius)) == 1 else ",".join(map(str, radius))


def _setting_text(radius, model, alpha) -> str:
    text = f"radius {_radius_text(radius)}, {model}"
    return text + (f" alpha {alpha:.3g}" if model == "ridge" and alpha is not None else "")


def choice_line(record: dict) -> str:
    """The choice in one line, e.g. ``patch radius auto: chose radius 1,
    ols (5-fold held-out MSE 1.23e+04 vs 1.61e+04 for radius 0)``."""
    s = record["setting"]
    head = f"{record['chosen']} auto: chose {_setting_text(s['radius'], s['model'], s['alpha'])}"
    if "note" in record:
        return f"{head} ({record['note']})"
    rows = _joint(record)
    key = (tuple(s["radius"]), s["model"], s["alpha"])
    others = {k: v for k, v in rows.items() if k != key}
    if len({k[0] for k in rows}) > 1:  # the radius was scored: the best at each other
        best = {}
        for k, (_, mse) in others.items():
            if k[0] != key[0]:
                best[k[0]] = min(best.get(k[0], math.inf), mse)
        vs = "; ".join(f"{m:.3g} for radius {_radius_text(r)}" for r, m in sorted(best.items()))
    elif others:
        k, (_, m) = min(others.items(), key=lambda kv: kv[1][0])
        vs = f"{m:.3g} for alpha {k[2]:.3g}, the next best"
    else:
        vs = ""
    vs = f" vs {vs}" if vs else ""
    return f"{head} ({record['n_folds']}-fold held-out MSE {rows[key][1]:.3g}{vs})"


def sidecar_record(record: dict) -> dict:
    """What an output's ``.json`` sidecar keeps of the choice
    (``P2SDask.CrossValidation``): the setting and the table of held-out
    errors, summed over the groups (per group too), without the per-volume
    and per-fold detail of the run's report."""
    rows = []
    groups = record["table"]["groups"]
    for key, (error, mse) in _joint(record).items():
        per_group = {name: next(r["error"] for r in t["candidates"]
                                if (tuple(r["radius"]), r["model"], r["alpha"]) == key)
                     for name, t in groups.items()}
        rows.append({"radius": list(key[0]), "model": key[1], "alpha": key[2],
                     "error": error, "mse": mse, "groups": per_group})
    return {"Chosen": record["setting"], "Auto": record["chosen"],
            "Folds": record["n_folds"], "Rule": record.get("rule", record.get("note")),
            "HeldOutErrors": rows}
