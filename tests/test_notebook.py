"""notebooks/quickstart.ipynb runs from top to bottom in this environment's
Python and shows what it says it shows."""

import json
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
KERNEL = "p2s-dask-tests"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec running this interpreter, found before any other.

    The name ``python3`` may resolve to a kernelspec of another Python (a
    user-wide one comes before the virtual environment's), so the notebook
    runs under a kernel of our own, written to a folder on JUPYTER_PATH.
    """
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "p2s-dask tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def text_of(cell):
    """stdout of a code cell."""
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def test_quickstart_runs(kernel_name, tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    # the notebook is stored without outputs: it runs in CI, not from a cache
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and not any(c.outputs or c.execution_count for c in code)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=180,
                                     resources={"metadata": {"path": str(run_dir)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert text_of(code[-1]).strip() == sys.executable  # our interpreter ran it
    out = "".join(text_of(c) for c in code)
    assert "data: (128, 128, 18, 45) float64" in out
    # the figure: original / denoised / residual, drawn inline
    assert sum("image/png" in o.get("data", {}) for c in code for o in c.outputs) == 1
    assert re.search(r"saved dwi_denoised\.nii\.gz: [\d.]+ MiB", out)
    assert "Array (128, 128, 18, 45) float64 in 8 chunks" in out  # lazy
    diff = re.search(r"max difference between the NumPy and dask results: (\S+) "
                     r"\(relative\)", text_of(code[-2]))
    assert diff and float(diff[1]) < 1e-9
    # outputs went to a temporary folder, which the notebook removed
    workdir = Path(re.search(r"outputs go to (\S+)", out)[1])
    assert not workdir.exists()
    assert not list(run_dir.iterdir()) and not list(NOTEBOOK.parent.glob("*.zarr"))
