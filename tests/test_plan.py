"""The plan is a value: built and inspected without Dask; one chunk policy."""

import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from p2s_dask.planning.chunking import chunk_policy
from p2s_dask.planning.plan import (MEMORY_IMAGE_SHARE, PASS_NAMES, Data, Endpoint, InputMode,
                                    OutputMode, Plan, Settings, Workers, describe,
                                    human_bytes, make_plan, region_key)

# the package's folder, found without importing the package (whose
# __init__ loads Dask: the probes below import planning alone)
PACKAGE = Path(__file__).resolve().parents[1] / "p2s_dask"


def test_plan_is_built_without_dask():
    # a fresh interpreter where importing dask fails: the plan needs none
    probe = (
        "import sys, types\n"
        "sys.modules['dask'] = sys.modules['distributed'] = None\n"
        f"pkg = types.ModuleType('p2s_dask'); pkg.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['p2s_dask'] = pkg\n"
        "from p2s_dask.planning.plan import Data, Endpoint, Settings, Workers, make_plan\n"
        "p = make_plan(Data((64, 64, 40, 30), 'int16', 'int16'), Endpoint('zarr', 'a.zarr'),"
        " Endpoint('zarr', 'b.zarr'), Workers(1, 2**30, 2), Settings((1, 1, 1)))\n"
        "print(p.chunks, p.n_blocks)\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("(64, 64, ")


def test_plan_matrix_imports_no_dask():
    """Importing the planning modules and building a whole matrix of plans
    (and their descriptions) loads no Dask, no storage library."""
    probe = (
        "import sys, types\n"
        f"pkg = types.ModuleType('p2s_dask'); pkg.__path__ = [{str(PACKAGE)!r}]\n"
        "sys.modules['p2s_dask'] = pkg\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from p2s_dask.planning.plan import make_plan\n"
        "import test_plan\n"
        "plans = [make_plan(*case.facts) for case in test_plan.plan_cases()]\n"
        "lines = sum(len(p.describe()) for p in plans)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in\n"
        "               ('dask', 'distributed', 'zarr', 'nibabel', 'fsspec', 's3fs'))\n"
        "print(len(plans), lines > len(plans), heavy)\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    count, described, heavy = res.stdout.split(" ", 2)
    assert int(count) == len(list(plan_cases())) > 500
    assert described == "True" and heavy.strip() == "[]"


def test_plan_inspection():
    plan = make_plan(Data((96, 96, 60, 300), "float32", "float32"), Endpoint("nifti", "a.nii"),
                     Endpoint("nifti", "b.nii"), Workers(1, 1 << 30, 2))
    assert isinstance(plan, Plan)
    assert (plan.input_mode, plan.output_mode) == (InputMode.IN_PLACE, OutputMode.NIFTI_DIRECT)
    # a .nii read in place needs no input pass; the shift needs the minima
    assert [p.name for p in plan.passes] == ["statistics", "solve", "minima", "predict",
                                             "output"]
    # the regions tile the image exactly once
    cover = np.zeros(plan.shape[:3], int)
    keys = set()
    for _, region in plan.regions():
        cover[region] += 1
        keys.add(region_key(region))
    assert (cover == 1).all() and len(keys) == plan.n_blocks
    # every pass's estimate fits the worker's budget
    assert all(p.memory <= plan.memory_per_worker for p in plan.passes)
    assert not plan.over_budget()
    no_shift = make_plan(Data((96, 96, 60, 300), "float32", "float32"),
                         Endpoint("nifti", "a.nii"), Endpoint("nifti", "b.nii"),
                         Workers(1, 1 << 30, 2), Settings(minima=False))
    assert "minima" not in [p.name for p in no_shift.passes]


def test_modes_keep_the_values_work_stores_recorded():
    """A work store's fingerprint holds the modes as strings: a resumed run
    must compare equal to what earlier releases wrote."""
    assert [m.value for m in InputMode][:4] == ["in-place", "memory", "stage", "store"]
    assert [m.value for m in OutputMode][:4] == ["nifti-direct", "zarr", "nifti-via-zarr",
                                                 "nifti-memory"]
    plan = make_plan(Data((20, 20, 10, 8), "int16", "int16"), Endpoint("nifti", "a.nii.gz"),
                     Endpoint("zarr", "b.zarr"), Workers(1, 1 << 30, 2), Settings((1, 1, 1)))
    ident = json.loads(json.dumps(plan.identity()))
    assert ident == {"chunks": list(plan.chunks), "radius": [1, 1, 1], "input": "memory",
                     "output": "zarr"}
    assert type(ident["input"]) is str and json.loads(json.dumps(plan.as_dict()))[
        "passes"][0]["name"] == "input"


# -- a matrix of plans, built without Dask -----------------------------------------

MiB, GiB = 1 << 20, 1 << 30
SHAPE = (96, 96, 60, 64)  # 67.5 MiB of int16
PLACES = {
    ".nii": Endpoint("nifti", "/data/dwi.nii"),
    ".nii.gz": Endpoint("nifti", "/data/dwi.nii.gz"),
    "zarr": Endpoint("zarr", "/data/dwi.zarr"),
    "s3 .nii": Endpoint("nifti", "s3://bucket/dwi.nii", local=False),
    "s3 .nii.gz": Endpoint("nifti", "s3://bucket/dwi.nii.gz", local=False),
    "s3 zarr": Endpoint("zarr", "s3://bucket/dwi.zarr", local=False),
    "numpy": Endpoint("array"),
}
INPUTS = (".nii", ".nii.gz", "zarr", "s3 .nii.gz", "s3 zarr", "numpy")
BUDGETS = (256 * MiB, 1 * GiB, 4 * GiB, 16 * GiB)


class Case:
    """One plan of the matrix: a label and the facts ``make_plan`` takes."""

    def __init__(self, label, facts):
        self.label, self.facts = label, facts

    def __repr__(self):
        return self.label


def cluster_limits(budget):
    """A cluster's two workers, the second with half the first's memory
    (as ``scheduler_info()`` lists them)."""
    return [{"memory_limit": budget, "nthreads": 2},
            {"memory_limit": budget // 2, "nthreads": 2}]


def workers_for(kind, budget) -> Workers:
    """One worker in this process, or a cluster of :func:`cluster_limits`
    (on this machine or remote): its smallest budget and a thread count that
    keeps the share per thread within every worker's (the executors' rule,
    checked against theirs in :func:`test_cluster_facts_are_the_executors`)."""
    if kind == "threads":
        return Workers(1, budget, 2, in_process=True, local=True)
    return Workers(2, budget // 2, 2, in_process=False, local=kind == "local cluster")


def plan_cases():
    """Every input x output x radius x budget x workers (int16 data; the
    minima and a remote work store on alternate cases)."""
    i = 0
    for inp in INPUTS:
        for out in PLACES:
            for radius in ((0, 0, 0), (1, 1, 1)):
                for budget in BUDGETS:
                    for kind in ("threads", "local cluster", "remote cluster"):
                        i += 1
                        stored = SHAPE[:3] if inp.endswith("zarr") and i % 3 else None
                        data = Data(SHAPE, "int16", "int16", stored_chunks=stored)
                        settings = Settings(radius, minima=bool(i % 2), work_local=i % 5 > 0,
                                            client_memory=budget)
                        facts = (data, PLACES[inp], PLACES[out], workers_for(kind, budget),
                                 settings)
                        yield Case(f"{inp} -> {out}, r={radius[0]}, {budget // MiB} MiB, "
                                   f"{kind}, minima={settings.minima}", facts)


def expected_modes(data, inp, out, workers, settings):
    """The modes the rules give (DESIGN.md, sections 3-4), stated apart from
    the code that applies them."""
    image = int(np.prod(data.shape)) * 2  # int16 in and out
    room = int(MEMORY_IMAGE_SHARE * workers.memory) if workers.in_process else 0
    sees = workers.local
    if inp.kind == "array":
        i = "array"
    elif inp.kind == "zarr":
        i = "store"
    elif inp.name.endswith(".nii") and inp.local and sees:
        i = "in-place"
    else:
        i = "memory" if image <= room else "stage"
    if out.kind in ("array", "zarr"):
        o = "array" if out.kind == "array" else "zarr"
    elif out.name.endswith(".nii") and out.local and sees and settings.work_local:
        o = "nifti-direct"
    else:
        o = "nifti-memory" if image <= room - (image if i == "memory" else 0) \
            else "nifti-via-zarr"
    return i, o


def plan_problems(case, plan) -> list:
    """What is wrong with ``plan`` for ``case`` (nothing, one hopes)."""
    data, inp, out, workers, settings = case.facts
    problems = []
    if (plan.input_mode.value, plan.output_mode.value) != expected_modes(*case.facts):
        problems.append(f"modes {plan.input_mode.value}, {plan.output_mode.value}")
    names = [p.name for p in plan.passes]
    wanted = [n for n in PASS_NAMES
              if (n != "input" or plan.input_mode.value in ("memory", "stage"))
              and (n != "minima" or settings.minima) and (n != "crossval" or settings.folds)]
    if names != wanted:
        problems.append(f"passes {names}")
    budgets = {"workers": workers.memory, "client": settings.client_memory}
    for p in plan.passes:
        if p.memory > budgets[p.where] or p.memory < 0:
            problems.append(f"{p.name} holds {human_bytes(p.memory)}")
        if p.tasks != (plan.n_blocks if p.where == "workers" else 0):
            problems.append(f"{p.name} has {p.tasks} tasks")
        if p.where == "workers" and not 1 <= p.threads <= workers.threads:
            problems.append(f"{p.name} runs {p.threads} threads")
    stats = plan.pass_named("statistics")
    if stats.lanes < 1 or stats.lanes != workers.count * (
            stats.threads if any(settings.radius) else workers.threads):
        problems.append(f"{stats.lanes} lanes, {stats.threads} threads")
    if any(c < 1 or c > s for c, s in zip(plan.chunks, data.shape)) or \
            any(c < min(r, s) for c, r, s in zip(plan.chunks, settings.radius, data.shape)):
        problems.append(f"chunks {plan.chunks}")
    held = (plan.held_input > 0, plan.held_output > 0)
    if held != (plan.input_mode is InputMode.MEMORY, plan.output_mode is OutputMode.NIFTI_MEMORY) \
            or plan.held > MEMORY_IMAGE_SHARE * workers.memory:
        problems.append(f"holds {plan.held_input} + {plan.held_output} bytes")
    return problems


def test_plan_matrix():
    cases = list(plan_cases())
    assert len(cases) > 500
    problems = {}
    seen = set()
    for case in cases:
        plan = make_plan(*case.facts)
        seen.add((plan.input_mode, plan.output_mode))
        found = plan_problems(case, plan)
        if found:
            problems[case.label] = found
    assert not problems, dict(list(problems.items())[:10])
    # the matrix reaches every mode
    assert {i for i, _ in seen} == set(InputMode) and {o for _, o in seen} == set(OutputMode)


def test_cluster_facts_are_the_executors():
    from p2s_dask.run.executors import worker_budget
    for budget in BUDGETS:
        w = workers_for("remote cluster", budget)
        assert worker_budget(cluster_limits(budget), budget) == (w.memory, w.threads)


@pytest.mark.parametrize("radius", [(0, 0, 0), (1, 1, 1)])
def test_a_larger_budget_never_makes_smaller_blocks(radius):
    facts = (Data(SHAPE, "int16", "int16"), PLACES[".nii"], PLACES[".nii"])
    plans = [make_plan(*facts, Workers(1, b, 2), Settings(radius)) for b in BUDGETS]
    sizes = [int(np.prod(p.chunks)) for p in plans]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    lanes = [p.pass_named("statistics").lanes for p in plans]
    assert lanes == sorted(lanes) and lanes[-1] == 2


@pytest.mark.parametrize("inp,dtype,scaled,stored,itemsize", [
    (".nii", "float32", False, None, 4),      # as stored
    (".nii", "int16", False, None, 2),
    (".nii", "int16", True, None, 8),         # decoded to float64
    (".nii.gz", "int16", False, None, 2),     # read into memory as stored
    ("zarr", "float32", False, (96, 96, 12), 4),  # our volume-major store
    ("zarr", "int16", False, (96, 96, 12), 8),    # integer pieces go through float64
    ("zarr", "float32", False, None, 8),      # another tool's layout
    ("numpy", "float32", False, None, 8),
])
def test_working_itemsize(inp, dtype, scaled, stored, itemsize):
    plan = make_plan(Data(SHAPE, dtype, dtype, scaled, stored), PLACES[inp], PLACES[".nii"],
                     Workers(1, 4 * GiB, 2))
    assert plan.itemsize == itemsize


def test_a_gz_beyond_half_the_budget_is_staged_and_streamed():
    image = int(np.prod(SHAPE)) * 2
    facts = (Data(SHAPE, "int16", "int16"), PLACES[".nii.gz"], PLACES[".nii.gz"])
    held = make_plan(*facts, Workers(1, 4 * image, 2))
    assert (held.input_mode, held.output_mode) == (InputMode.MEMORY, OutputMode.NIFTI_MEMORY)
    assert (held.held_input, held.held_output) == (image, image)
    # the held images come out of the blocks' budget
    assert held.pass_named("predict").memory <= 4 * image
    half = make_plan(*facts, Workers(1, 3 * image, 2))
    assert (half.input_mode, half.output_mode) == (InputMode.MEMORY, OutputMode.NIFTI_VIA_ZARR)
    staged = make_plan(*facts, Workers(1, image, 2), Settings(client_memory=image))
    assert (staged.input_mode, staged.output_mode) == (InputMode.STAGE,
                                                       OutputMode.NIFTI_VIA_ZARR)
    # the conversion and the stream get this process's budget
    assert staged.pass_named("input").memory == staged.pass_named("output").memory == image


def test_describe_names_every_decision():
    plan = make_plan(Data(SHAPE, "int16", "int16"), PLACES[".nii.gz"], PLACES["zarr"],
                     Workers(1, 1 * GiB, 2), Settings((1, 1, 1)))
    lines = describe(plan)
    assert lines == plan.describe()
    text = "\n".join(lines)
    assert "input: memory" in text and "output: zarr" in text
    assert f"chunks: {'x'.join(map(str, plan.chunks))}" in text
    assert f"{plan.n_blocks} blocks" in text
    numbered = [ln for ln in lines if re.match(r"  \d+\. ", ln)]
    assert [re.match(r"  (\d+)\. (\w+):", ln).groups() for ln in numbered] == [
        (str(i), p.name) for i, p in enumerate(plan.passes, 1)]
    for p, line in zip(plan.passes, numbered):
        assert human_bytes(p.memory) in line
        if p.where == "workers":
            assert f"{p.tasks} tasks" in line and f"{p.threads} threads" in line
    stats = next(ln for ln in lines if "statistics:" in ln)
    assert f"{plan.pass_named('statistics').lanes} lanes" in stats
    assert not [ln for ln in lines if ln.startswith("warning")]


def test_a_plan_beyond_the_budget_says_so():
    # radius 2 over 300 volumes: an F x F scatter of 11 GiB against 256 MiB
    plan = make_plan(Data((40, 40, 30, 300), "float32", "float32"), PLACES[".nii"],
                     PLACES[".nii"], Workers(1, 256 * MiB, 2), Settings((2, 2, 2)))
    assert "solve" in [p.name for p in plan.over_budget()]
    assert any(ln.startswith("warning: the solve pass") for ln in plan.describe())


def test_human_bytes():
    assert [human_bytes(n) for n in (0, 1023, 1536, 3 * GiB, 5 << 40)] == [
        "0 B", "1023 B", "1.5 KiB", "3.0 GiB", "5.0 TiB"]


def test_running_decides_nothing_the_plan_decides():
    """The run package reads the plan: it calls no planning rule, and never
    compares a mode with a string."""
    rules = {"patch_lanes", "chunk_policy", "patch_block_voxels", "choose_chunks",
             "choose_modes", "hold_in_memory", "working_itemsize", "store_itemsize"}
    found = []
    for path in (PACKAGE / "run").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name in rules:
                    found.append(f"{path.name}: {name}()")
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(getattr(s, "attr", "") in ("input_mode", "output_mode") for s in sides) \
                        and any(isinstance(s, ast.Constant) for s in sides):
                    found.append(f"{path.name}:{node.lineno} compares a mode with a string")
    assert not found, found


# -- execution follows the plan ------------------------------------------------------

def block_tasks(collection) -> int:
    """Tasks in a Dask collection (or list of them) that work on one block:
    the statistics of a block, a lane's step over one, a block's prediction
    range or minima (kept or not), a block predicted and written."""
    from p2s_dask.graph import engine
    from p2s_dask.run import passes
    per_block = {engine._summarize_block, engine._lane_step, engine._predict_min_chunk,
                 engine.block_range, passes._keep_task, passes._write_chunk}
    items = collection if isinstance(collection, (list, tuple)) else [collection]
    graph = {}
    for item in items:
        graph.update(dict(item.__dask_graph__()))
    count = 0
    for task in graph.values():
        count += getattr(task, "func", None) in per_block
        # a lane run as one task holds its steps' graph (engine.lanes_in_sequence)
        for arg in getattr(task, "args", ()):
            if isinstance(getattr(arg, "value", None), engine._Opaque):
                arg = arg.value
            if isinstance(arg, engine._Opaque):
                count += block_tasks(arg.value)
    return count


def recording_executor(threads, memory_limit, in_process=True):
    """A threads executor that records each compute: (pass, block tasks,
    thread cap). Without ``in_process`` it says its tasks run elsewhere (as
    a cluster's do), so that the plan holds no image in memory."""
    from p2s_dask.run.executors import ThreadsExecutor

    class Recording(ThreadsExecutor):
        def __init__(self):
            super().__init__(threads, memory_limit)
            self.in_process = in_process
            self.calls = []

        def compute(self, collection, desc="", progress=False, threads=None):
            self.calls.append((desc, block_tasks(collection), threads))
            return super().compute(collection, desc, progress, threads)

    return Recording()


def tiny_dwi(folder, name, volumes=12):
    import nibabel as nib
    rng = np.random.default_rng(3)
    data = 500 + 100 * rng.standard_normal((10, 9, 8, volumes))
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(folder / name))
    return folder / name, np.r_[0, 0, [1000] * (volumes - 2)]


@pytest.mark.parametrize("inp,out,volumes,options,modes", [
    ("dwi.nii", "den.nii", 12, {}, ("in-place", "nifti-direct")),
    ("dwi.nii.gz", "den.zarr", 12, {"patch_radius": 1, "version": 1}, ("memory", "zarr")),
    # tasks that do not run here: the input staged, the output streamed
    ("dwi.nii.gz", "den.nii.gz", 12, {"shift_intensity": False}, ("stage", "nifti-via-zarr")),
])
def test_execution_follows_the_plan(tmp_path, monkeypatch, inp, out, volumes, options,
                                    modes):
    """A small real run: the passes that ran, their order, the tasks each
    gave the executor and its thread caps are exactly the plan's."""
    from p2s_dask.graph import engine
    from p2s_dask.run.pipeline import denoise_file
    # the statistics of a patch are summed in lanes even for this small scatter
    monkeypatch.setattr(engine, "SMALL_SCATTER_BYTES", 0)
    path, bvals = tiny_dwi(tmp_path, inp, volumes)
    executor = recording_executor(2, 64 << 20, in_process=modes[0] != "stage")
    report = denoise_file(path, tmp_path / out, bvals=bvals, executor=executor,
                          chunks=(10, 9, 3), progress=False, memory_limit="64MiB", **options)
    plan = report.plan
    assert (plan["input"], plan["output"]) == modes
    names = [p["name"] for p in plan["passes"]]
    # every pass ran (and was timed) in the plan's order, nothing else did
    assert list(report.stages) == names
    assert names == [n for n in PASS_NAMES if n in names]
    # the executor was given exactly the plan's tasks, pass by pass
    computed = [call for call in executor.calls if call[0] != "sample"]
    assert computed == [(p["name"], p["tasks"], p["threads"]) for p in plan["passes"]
                        if p["where"] == "workers"]
    assert all(p["tasks"] == 3 for p in plan["passes"] if p["where"] == "workers")
    assert computed and all(tasks == 3 for _, tasks, _ in computed)
    # a store's codec is chosen from one block of the input, and only then
    samples = [call for call in executor.calls if call[0] == "sample"]
    assert len(samples) == (1 if plan["output"] in ("zarr", "nifti-via-zarr") else 0)
    assert ("minima" in names) == options.get("shift_intensity", True)
    stats = next(p for p in plan["passes"] if p["name"] == "statistics")
    assert stats["lanes"] >= 1 and stats["threads"] <= 2
    assert (tmp_path / out).exists()


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

    def store(chunks):
        return make_plan(Data(shape, "float16", "float16", stored_chunks=chunks),
                         Endpoint("zarr", "a.zarr"), Endpoint("zarr", "b.zarr"),
                         Workers(1, 2 << 30, 2))

    assert store((32, 32, 20, 30)).chunks == (32, 32, 20)
    # chunks that split the volumes, or are too large, are not
    assert store((32, 32, 20, 10)).chunks == policy


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


def _functions(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def _code_lines(node) -> int:
    """Lines of a function, its docstring left out."""
    first = node.body[0]
    doc = (first.end_lineno - first.lineno + 1) if isinstance(first, ast.Expr) \
        and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str) else 0
    return node.end_lineno - node.lineno + 1 - doc


def _parameters(node) -> int:
    a = node.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def test_functions_fit_on_a_screen():
    """No function over 60 lines of code outside testing/."""
    files = [p for p in PACKAGE.rglob("*.py") if "testing" not in p.parts]
    long = [f"{p.relative_to(PACKAGE)}:{f.name} ({_code_lines(f)})"
            for p in files for f in _functions(p) if _code_lines(f) > 60]
    assert not long, long


def test_run_path_functions_take_few_parameters():
    """At most 7 parameters in the run path (planning, run, graph, core); the
    public ``patch2self`` keeps DIPY's signature."""
    files = [p for folder in ("planning", "run", "graph", "core")
             for p in (PACKAGE / folder).rglob("*.py")]
    many = [f"{p.relative_to(PACKAGE)}:{f.name} ({_parameters(f)})"
            for p in files for f in _functions(p) if _parameters(f) > 7]
    assert not many, many


def test_the_top_holds_only_faces_and_subpackages():
    faces = {"__init__.py", "api.py", "cli.py", "errors.py", "datasets.py"}
    top = {p.name for p in PACKAGE.iterdir() if p.is_file() and p.suffix == ".py"}
    assert top == faces
    assert {"fronts", "config", "planning", "run", "graph", "core", "io"} <= {
        p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}


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
    import p2s_dask
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
