"""The plan is a value: built and inspected without Dask; one chunk policy."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import p2s_dask
from p2s_dask.planning.chunking import chunk_policy
from p2s_dask.planning.plan import Plan, make_plan, region_key

PACKAGE = Path(p2s_dask.__file__).parent


def test_plan_is_built_without_dask():
    # a fresh interpreter where importing dask fails: the plan needs none
    probe = (
        "import sys, types\n"
        "sys.modules['dask'] = sys.modules['distributed'] = None\n"
        f"pkg = types.ModuleType('p2s_dask'); pkg.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['p2s_dask'] = pkg\n"
        "from p2s_dask.planning.plan import make_plan\n"
        "p = make_plan((64, 64, 40, 30), 2, (1, 1, 1), input_mode='store',"
        " output_mode='zarr', memory_per_worker=2**30, threads_per_worker=2)\n"
        "print(p.chunks, p.n_blocks)\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("(64, 64, ")


def test_plan_inspection():
    plan = make_plan((96, 96, 60, 300), 4, (0, 0, 0), input_mode="in-place",
                     output_mode="nifti-direct", memory_per_worker=1 << 30,
                     threads_per_worker=2)
    assert isinstance(plan, Plan)
    assert [p.name for p in plan.passes] == ["input", "statistics", "solve", "minima",
                                             "predict", "output"]
    # the regions tile the image exactly once
    cover = np.zeros(plan.shape[:3], int)
    keys = set()
    for _, region in plan.regions():
        cover[region] += 1
        keys.add(region_key(region))
    assert (cover == 1).all() and len(keys) == plan.n_blocks
    # every pass's estimate fits the worker's budget
    assert all(p.memory <= plan.memory_per_worker for p in plan.passes)
    no_shift = make_plan((96, 96, 60, 300), 4, (0, 0, 0), input_mode="in-place",
                         output_mode="nifti-direct", memory_per_worker=1 << 30,
                         threads_per_worker=2, shift_intensity=False)
    assert "minima" not in [p.name for p in no_shift.passes]


def test_chunks_follow_the_budget_per_worker():
    shape = (128, 128, 64, 100)
    small = chunk_policy(shape, 8, 256 << 20, 2)
    large = chunk_policy(shape, 8, 2 << 30, 2)
    assert np.prod(small) < np.prod(large)
    # a block never exceeds the per-thread share of the budget
    for memory, threads in [(256 << 20, 2), (2 << 30, 2), (2 << 30, 16)]:
        got = chunk_policy(shape, 8, memory, threads)
        assert np.prod(got) * shape[3] * 8 <= memory // (8 * threads) or \
            np.prod(got) * shape[3] * 8 <= 1 << 20


@pytest.mark.parametrize("radius", [(0, 0, 0), (1, 1, 1), (2, 2, 2)])
def test_chunks_are_at_least_as_thick_as_the_radius(radius):
    got = chunk_policy((40, 40, 40, 300), 8, 8 << 20, 2, radius)
    assert all(c >= r for c, r in zip(got, radius))


def test_stored_chunks_are_used_when_they_fit():
    shape = (64, 64, 40, 30)
    policy = chunk_policy(shape, 2, 2 << 30, 2)
    plan = make_plan(shape, 2, (0, 0, 0), input_mode="store", output_mode="zarr",
                     memory_per_worker=2 << 30, threads_per_worker=2,
                     stored_chunks=(32, 32, 20, 30))
    assert plan.chunks == (32, 32, 20)
    # chunks that split the volumes, or are too large, are not
    plan = make_plan(shape, 2, (0, 0, 0), input_mode="store", output_mode="zarr",
                     memory_per_worker=2 << 30, threads_per_worker=2,
                     stored_chunks=(32, 32, 20, 10))
    assert plan.chunks == policy


def test_one_chunk_policy():
    """Every module that picks chunks calls chunk_policy; none has its own."""
    callers = set()
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name == "chunk_policy":
                    callers.add(path.relative_to(PACKAGE).as_posix())
            if isinstance(node, ast.FunctionDef) and node.name != "chunk_policy":
                assert "auto_spatial_chunks" not in node.name, path
    assert {"planning/plan.py", "io/budget.py", "graph/engine.py"} <= callers


def _long_functions(path, limit):
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append(f"{path.name}:{node.name} ({length} lines)")
    return out


def test_functions_fit_on_a_screen():
    files = [p for p in PACKAGE.rglob("*.py") if "testing" not in p.parts]
    long = [f for path in files for f in _long_functions(path, 60)]
    assert not long, long


def test_cli_is_built_from_the_options():
    from p2s_dask.fronts.cli import build_parser
    from p2s_dask.config.options import Options, option_fields
    parser = build_parser()
    denoise = parser._subparsers._group_actions[0].choices["denoise"]
    dests = {a.dest for a in denoise._actions}
    assert {f.name for f in option_fields(cli=True)} <= dests
    # the CLI's defaults are the options' defaults
    args = parser.parse_args(["denoise", "in.nii", "out.nii"])
    for f in option_fields(cli=True):
        assert getattr(args, f.name) == getattr(Options(), f.name), f.name
    # every keyword of the API is an option (or one of DIPY's own)
    params = inspect.signature(p2s_dask.patch2self).parameters
    names = {f.name for f in option_fields(api=True)}
    assert set(params) - {"data", "bvals", "verbose"} <= names


@pytest.mark.parametrize("scaled", [False, True])
def test_converted_store_is_denoised_without_a_rechunk(tmp_path, monkeypatch, scaled):
    """What ``convert`` writes is what ``denoise`` reads: no rechunk layer in
    any graph of the run (statistics, minima, predict)."""
    import nibabel as nib

    from p2s_dask.fronts.cli import main
    from p2s_dask.run.executors import ThreadsExecutor
    rng = np.random.default_rng(0)
    n = 30
    data = (1000 + 200 * rng.standard_normal((70, 64, 48, n))).astype(np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    if scaled:
        img.header.set_slope_inter(0.5, 1.0)
    nib.save(img, str(tmp_path / "dwi.nii"))
    np.savetxt(tmp_path / "dwi.bval", np.r_[0, 0, [1000] * (n - 2)][None], fmt="%g")
    store = tmp_path / "dwi.zarr"
    # a small budget, so that the data spans several chunks
    assert main(["convert", str(tmp_path / "dwi.nii"), str(store), "--quiet",
                 "--memory-limit", "96MiB"]) == 0
    layers = []
    original = ThreadsExecutor.compute

    def recording(self, collection, desc="", progress=False, **kwargs):
        for c in collection if isinstance(collection, list) else [collection]:
            layers.extend(c.__dask_graph__().layers.keys())
        return original(self, collection, desc, progress, **kwargs)

    monkeypatch.setattr(ThreadsExecutor, "compute", recording)
    report = tmp_path / "r.json"
    assert main(["denoise", str(store), str(tmp_path / "den.zarr"), "--quiet",
                 "--memory-limit", "96MiB", "--report-json", str(report)]) == 0
    import json
    import zarr
    chunks = json.loads(report.read_text())["plan"]["chunks"]
    # shards of array 0 (t, z, y, x): each holds all volumes of one block
    shards = zarr.open_group(str(store), mode="r")["0"].shards
    stored = tuple(reversed(shards[1:]))
    assert tuple(chunks) == tuple(stored) and tuple(stored) != (70, 64, 48)
    assert layers and not [name for name in layers if "rechunk" in name]
