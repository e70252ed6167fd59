"""The data chooses the patch radius and the ridge penalty (issue 18).

``patch_radius='auto'`` / ``--patch-radius auto`` and ``alpha='auto'`` /
``--alpha auto`` (ridge) are exact K-fold cross-validation from one pass of
statistics at the largest radius (:mod:`p2s_dask.run.auto`). On phantoms
with a noise-free truth the choice must denoise (almost) as well as the best
fixed setting; the API and the command line must make the same choice; the
chosen setting must be fitted from the same statistics as a fixed run of
it; the step is a pass of the plan, recorded in the report and the sidecar.
"""

import functools
import json
import logging
import re

import nibabel as nib
import numpy as np
import pytest

from p2s_dask import patch2self
from p2s_dask.config.options import Options
from p2s_dask.core import patch_size
from p2s_dask.core.crossval import penalty_grid
from p2s_dask.errors import InputError
from p2s_dask.fronts.cli import main
from p2s_dask.planning.plan import PASS_NAMES, Data, Endpoint, Settings, Workers, make_plan

from test_crossval import PHANTOMS, truth_rmse
from test_faults import kill_at
from test_plan import recording_executor

CHOSEN = re.compile(r"auto: chose (radius [0-9,]+, (?:ols|ridge alpha \S+))")


@functools.lru_cache(maxsize=2)
def phantom(name):
    from p2s_dask.testing.phantom import make_phantom
    return make_phantom(**PHANTOMS[name])


def cli(*args):
    return main([str(a) for a in args] + ["--quiet"])


def api_choice(caplog, **kwargs):
    """The API's output and the setting its log line says it chose."""
    with caplog.at_level(logging.INFO, logger="p2s_dask"):
        caplog.clear()
        out = patch2self(**kwargs)
    lines = [r.getMessage() for r in caplog.records if "auto: chose" in r.getMessage()]
    assert len(lines) == 1, lines
    return out, CHOSEN.search(lines[0]).group(1)


# -- quality against the truth --------------------------------------------------

@pytest.mark.parametrize("name, winner", [("few", 1), ("many", 0)])
def test_auto_radius_denoises_as_well_as_the_better_fixed_radius(name, winner, caplog):
    ph = phantom(name)
    truth = {r: truth_rmse(ph, patch_radius=r) for r in (0, 1)}
    assert min(truth, key=truth.get) == winner  # the phantom is in its regime
    assert max(truth.values()) > 1.1 * min(truth.values())  # and the radius matters
    with caplog.at_level(logging.INFO, logger="p2s_dask"):
        auto = truth_rmse(ph, patch_radius="auto")
    assert auto <= 1.02 * min(truth.values())
    line = next(r.getMessage() for r in caplog.records if "auto: chose" in r.getMessage())
    assert f"chose radius {winner}, ols" in line and "for radius" in line


def _grid(ph, radius):
    """The penalties the run scores for the DWI group alone: the grid of its
    total statistics at ``radius`` (the brain mask is the fitting set)."""
    from p2s_dask.core.crossval import fold_statistics
    dw = ph["bvals"] > 50
    total = fold_statistics(ph["dwi"][..., dw], (radius,) * 3,
                            np.zeros(ph["mask"].shape, int), ph["mask"])[0]
    return penalty_grid(total, patch_size((radius,) * 3))


@pytest.mark.parametrize("name, radius", [("few", 1), ("many", 0)])
def test_auto_alpha_is_as_good_as_the_best_alpha_of_its_grid(name, radius, caplog):
    ph = phantom(name)
    # the DWI group alone: one alpha, the grid of one group
    common = dict(patch_radius=radius, model="ridge", b0_denoising=False)
    truth = {float(a): truth_rmse(ph, alpha=float(a), **common) for a in _grid(ph, radius)}
    assert max(truth.values()) > 1.03 * min(truth.values())  # the grid matters
    with caplog.at_level(logging.INFO, logger="p2s_dask"):
        auto = truth_rmse(ph, alpha="auto", **common)
    assert auto <= 1.02 * min(truth.values())
    chosen = float(CHOSEN.search(caplog.text).group(1).rsplit(" ", 1)[1])
    assert any(np.isclose(chosen, a, rtol=1e-2) for a in truth)  # from the grid


# -- exactness: the chosen setting from the same statistics ------------------------

def test_auto_output_equals_the_fixed_run_of_its_choice(caplog):
    ph = phantom("few")
    common = dict(data=ph["dwi"], bvals=ph["bvals"], version=1, mask=ph["mask"],
                  chunks=(32, 32, 3), out_dtype=np.float64, precision="float64")
    out, chosen = api_choice(caplog, patch_radius="auto", **common)
    assert chosen == "radius 1, ols"
    ref = patch2self(patch_radius=1, **common)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9 * np.abs(ref).max())


# -- the command line ------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    ph = phantom("few")
    folder = tmp_path_factory.mktemp("auto")
    nib.save(nib.Nifti1Image(ph["dwi"].astype(np.float32), np.eye(4)), str(folder / "dwi.nii.gz"))
    nib.save(nib.Nifti1Image(ph["mask"].astype(np.uint8), np.eye(4)), str(folder / "mask.nii.gz"))
    np.savetxt(folder / "dwi.bval", ph["bvals"][None], fmt="%g")
    return folder


AUTO_ARGS = ("--patch-radius", "auto", "--ver", "1", "--chunks", "32,32,3",
             "--out-dtype", "float64", "--precision", "float64", "--no-shift-intensity")


def test_cli_makes_the_api_choice_and_records_it(files, tmp_path, capsys, caplog):
    out, report = tmp_path / "auto.nii", tmp_path / "report.json"
    assert cli("denoise", files / "dwi.nii.gz", out, *AUTO_ARGS, "--mask",
               files / "mask.nii.gz", "--report-json", report) == 0
    printed = capsys.readouterr().out
    cli_choice = CHOSEN.search(printed).group(1)
    ph = phantom("few")
    data = np.asanyarray(nib.load(str(files / "dwi.nii.gz")).dataobj)
    api, api_choice_ = api_choice(caplog, data=data, bvals=ph["bvals"], version=1,
                                  patch_radius="auto", mask=ph["mask"], chunks=(32, 32, 3),
                                  out_dtype=np.float64, precision="float64",
                                  shift_intensity=False)
    assert cli_choice == api_choice_ == "radius 1, ols"
    got = np.asanyarray(nib.load(str(out)).dataobj)
    np.testing.assert_allclose(got, api, rtol=0, atol=1e-9 * np.abs(api).max())
    # the report has the whole table; the sidecar the choice and the errors
    cv = json.loads(report.read_text())["cross_validation"]
    assert cv["setting"] == {"radius": [1, 1, 1], "model": "ols", "alpha": None}
    assert set(cv["table"]["groups"]) == {"b0", "dwi"} and cv["n_folds"] == 5
    rows = cv["table"]["groups"]["dwi"]["candidates"]
    assert [r["radius"] for r in rows] == [[0, 0, 0], [1, 1, 1]]
    assert all(len(r["per_fold"]) == 5 for r in rows)
    side = json.loads((tmp_path / "auto.json").read_text())["P2SDask"]
    assert side["Options"]["patch_radius"] == "auto"
    assert side["Options"]["max_patch_radius"] == [1]
    table = side["CrossValidation"]
    assert table["Chosen"] == cv["setting"] and table["Folds"] == 5
    errors = {tuple(r["radius"]): r["error"] for r in table["HeldOutErrors"]}
    assert errors[(1, 1, 1)] < errors[(0, 0, 0)]
    assert errors[(1, 1, 1)] == pytest.approx(sum(
        t["candidates"][1]["error"] for t in cv["table"]["groups"].values()), rel=1e-12)
    # and the output is the fixed radius-1 run's, from the same statistics
    fixed = tmp_path / "fixed.nii"
    args = [a if a != "auto" else "1" for a in AUTO_ARGS]
    assert cli("denoise", files / "dwi.nii.gz", fixed, *args, "--mask",
               files / "mask.nii.gz") == 0
    ref = np.asanyarray(nib.load(str(fixed)).dataobj)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * np.abs(ref).max())


def test_cli_auto_alpha_equals_the_fixed_run_of_its_choice(files, tmp_path, capsys):
    args = [files / "dwi.nii.gz"] + [a for a in AUTO_ARGS] + ["--model", "ridge"]
    out, report = tmp_path / "auto.nii", tmp_path / "report.json"
    assert cli(*["denoise", args[0], out], *args[1:], "--alpha", "auto",
               "--report-json", report) == 0
    assert "patch radius and alpha auto: chose radius" in capsys.readouterr().out
    setting = json.loads(report.read_text())["cross_validation"]["setting"]
    assert setting["model"] == "ridge" and setting["alpha"] > 0
    fixed = tmp_path / "fixed.nii"
    radius = ",".join(map(str, setting["radius"]))
    fixed_args = [a if a != "auto" else radius for a in args[1:]]
    assert cli("denoise", args[0], fixed, *fixed_args, "--alpha", repr(setting["alpha"])) == 0
    got, ref = (np.asanyarray(nib.load(str(p)).dataobj) for p in (out, fixed))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * np.abs(ref).max())


def test_dry_run_shows_the_step(files, tmp_path, capsys):
    assert cli("denoise", files / "dwi.nii.gz", tmp_path / "o.nii", "--patch-radius", "auto",
               "--ver", "1", "--alpha", "auto", "--model", "ridge", "--dry-run") == 0
    out = capsys.readouterr().out
    steps = re.findall(r"^\s+\d+\. (\w+):", out, flags=re.M)
    assert steps.index("statistics") + 1 == steps.index("crossval") == \
        steps.index("solve") - 1
    assert "5 folds of whole blocks" in out
    assert "radius auto (0 up to [1, 1, 1]" in out and "alpha auto" in out
    assert not (tmp_path / "o.nii").exists()


def test_an_auto_run_follows_its_plan(files, tmp_path):
    """The passes that ran are the plan's, the crossval pass among them; the
    statistics are computed fold by fold over exactly the plan's blocks."""
    from p2s_dask.run.pipeline import denoise_file
    executor = recording_executor(2, 256 << 20)
    report = denoise_file(files / "dwi.nii.gz", tmp_path / "o.nii", bvals=phantom("few")["bvals"],
                          executor=executor, patch_radius="auto", version=1,
                          chunks=(32, 32, 3), progress=False, memory_limit="256MiB")
    plan = report.plan
    names = [p["name"] for p in plan["passes"]]
    assert list(report.stages) == names == [n for n in PASS_NAMES if n in names]
    assert "crossval" in names and plan["folds"] == 5
    stats = [c for c in executor.calls if c[0].startswith("statistics")]
    assert [c[0] for c in stats] == [f"statistics (fold {k} of 5)" for k in range(1, 6)]
    step = next(p for p in plan["passes"] if p["name"] == "statistics")
    assert sum(tasks for _, tasks, _ in stats) == step["tasks"] == 8
    assert all(threads == step["threads"] for *_, threads in stats)
    others = [c for c in executor.calls if not c[0].startswith(("statistics", "sample"))]
    assert others == [(p["name"], p["tasks"], p["threads"]) for p in plan["passes"]
                      if p["where"] == "workers" and p["name"] != "statistics"]
    assert report.as_dict()["cross_validation"]["setting"]["model"] == "ols"


@pytest.mark.parametrize("stage, resumed", [
    ("crossval", ["statistics"]),
    ("solve", ["statistics", "cross-validation"]),
])
def test_a_killed_auto_run_resumes_its_folds_and_choice(files, tmp_path, capsys, stage,
                                                        resumed):
    args = (files / "dwi.nii.gz",) + AUTO_ARGS + ("--mask", files / "mask.nii.gz")
    clean, out = tmp_path / "clean.nii", tmp_path / "o.nii"
    assert cli("denoise", args[0], clean, *args[1:]) == 0
    kill_at(stage, out, *args[:1], out, *args[1:])
    assert sorted((out.parent / "o.nii.p2s-work").glob("fold*.npz"))  # the folds were kept
    capsys.readouterr()
    assert cli("denoise", args[0], out, *args[1:]) == 0
    printed = capsys.readouterr().out
    assert f"resumed from earlier work: {', '.join(resumed)}" in printed
    assert "chose radius 1, ols" in printed
    # the same statistics and choice (a reloaded scatter is inverted in
    # another memory layout than a fresh one: last bits only)
    got, ref = (np.asanyarray(nib.load(str(p)).dataobj) for p in (out, clean))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * np.abs(ref).max())


def test_an_interrupted_statistics_pass_keeps_the_folds_done(files, tmp_path):
    """Ctrl-C between two folds: the rerun computes only the folds not done
    and gives the output of a run that was never stopped."""
    from p2s_dask.run.pipeline import denoise_file
    options = dict(bvals=phantom("few")["bvals"], patch_radius="auto", version=1,
                   chunks=(32, 32, 3), progress=False, memory_limit="256MiB",
                   mask=str(files / "mask.nii.gz"), out_dtype="float64",
                   precision="float64", shift_intensity=False)
    clean = denoise_file(files / "dwi.nii.gz", tmp_path / "clean.nii", **options)

    class Stopping(type(recording_executor(2, 256 << 20))):
        def compute(self, collection, desc="", progress=False, threads=None):
            if desc.startswith("statistics (fold 3"):
                raise KeyboardInterrupt
            return super().compute(collection, desc, progress, threads)

    out = tmp_path / "o.nii"
    with pytest.raises(KeyboardInterrupt):
        denoise_file(files / "dwi.nii.gz", out, executor=Stopping(), **options)
    again = recording_executor(2, 256 << 20)
    report = denoise_file(files / "dwi.nii.gz", out, executor=again, **options)
    assert report.resumed == ["statistics of 2 of 5 folds"]
    assert [c[0] for c in again.calls if c[0].startswith("statistics")] == [
        f"statistics (fold {k} of 5)" for k in (3, 4, 5)]
    assert report.cross_validation["setting"] == clean.cross_validation["setting"]
    got, ref = (np.asanyarray(nib.load(str(p)).dataobj) for p in (out, tmp_path / "clean.nii"))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9 * np.abs(ref).max())


# -- plan, options, validation -------------------------------------------------------

def test_plan_deals_whole_blocks_into_folds():
    facts = (Data((96, 96, 60, 30), "float32", "float32"), Endpoint("nifti", "a.nii"),
             Endpoint("nifti", "b.nii"), Workers(1, 2 << 30, 2))
    plain = make_plan(*facts, Settings((1, 1, 1)))
    auto = make_plan(*facts, Settings((1, 1, 1), folds=5))
    assert "crossval" not in [p.name for p in plain.passes] and plain.folds == 0
    names = [p.name for p in auto.passes]
    assert names[names.index("statistics") + 1] == "crossval" and auto.folds == 5
    # at least two z-slabs of blocks per fold, never thinner than the radius
    assert len(auto.grid[2]) >= 10 and min(auto.chunks) >= 1
    crossval = auto.pass_named("crossval")
    assert crossval.where == "client" and crossval.tasks == 0
    assert crossval.memory > auto.pass_named("solve").memory
    # the total, a fold and the training matrix; with a grid of penalties
    # the eigenvectors too (test_crossval measures what scoring holds)
    scatter = auto.pass_named("solve").memory
    grid = make_plan(*facts, Settings((1, 1, 1), folds=5, penalty_grid=True))
    assert (crossval.memory, grid.pass_named("crossval").memory) == (3 * scatter, 4 * scatter)
    assert auto.identity()["folds"] == 5 and "folds" not in plain.identity()
    # the user's chunks win; no more folds than blocks
    few = make_plan(*facts, Settings((1, 1, 1), chunks=(96, 96, 20), folds=5))
    assert few.chunks == (96, 96, 20) and few.folds == 3


def test_max_patch_radius_is_in_the_fingerprint_only_for_auto():
    auto = Options(patch_radius="auto", version=1)
    assert auto.result_fields()["patch_radius"] == "auto"
    assert auto.result_fields() != auto.with_(max_patch_radius=2).result_fields()
    fixed = Options(patch_radius=1, version=1)
    assert "max_patch_radius" not in fixed.result_fields()
    assert fixed.result_fields() == fixed.with_(max_patch_radius=2).result_fields()
    assert Options(alpha="auto", model="ridge").result_fields()["alpha"] == "auto"


@pytest.mark.parametrize("kwargs, words", [
    ({"patch_radius": "auto"}, ["patch_radius='auto'", "version=1"]),
    ({"alpha": "auto"}, ["alpha='auto'", "model='ridge'"]),
    ({"patch_radius": "auto", "version": 1, "model": "lasso"}, ["patch_radius='auto'", "'ols'"]),
    ({"patch_radius": "auto", "version": 1, "max_patch_radius": -1}, ["max_patch_radius"]),
    ({"patch_radius": "biggest", "version": 1}, ["patch_radius"]),
])
def test_api_validation_is_one_line(kwargs, words):
    data = np.zeros((4, 4, 4, 12), np.float32)
    with pytest.raises(InputError) as err:
        patch2self(data, np.r_[0, 0, [1000] * 10], **kwargs)
    message = str(err.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_a_dask_array_cannot_defer_the_choice():
    import dask.array as da
    data = da.zeros((4, 4, 10, 12), chunks=(4, 4, 2, 12))
    with pytest.raises(InputError, match="patch radius 'auto' needs NumPy data"):
        patch2self(data, np.r_[0, 0, [1000] * 10], patch_radius="auto", version=1)


@pytest.mark.parametrize("args, words", [
    (["--patch-radius", "auto"], ["--patch-radius auto", "--ver 1"]),
    (["--alpha", "auto"], ["--alpha auto", "--model ridge"]),
    (["--patch-radius", "auto", "--ver", "1", "--model", "lasso"], ["--patch-radius auto"]),
    (["--alpha", "much"], ["--alpha", "auto"]),
    (["--max-patch-radius", "auto", "--ver", "1"], ["--max-patch-radius"]),
])
def test_cli_validation_is_one_line(files, tmp_path, capsys, args, words):
    assert cli("denoise", files / "dwi.nii.gz", tmp_path / "o.nii", *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("p2s-dask: error:") and "\n" not in err, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "o.nii").exists()
