"""The QC report: its numbers against NumPy on the files, its flags on
phantoms with and without a corrupted slice, a resumed run's report, and the
report's memory on data four times the budget."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from p2s_dask.config.groups import make_groups
from p2s_dask.fronts.cli import main
from p2s_dask.planning.paths import QC_FIGURES, noise_map_url
from p2s_dask.report import figures, html
from p2s_dask.report.results import comparison_sets, finish, flag_volumes
from p2s_dask.report.summaries import (SAMPLE_SIZE, block_qc, from_arrays, make_spec, merge,
                                       to_arrays)

from conftest import write_small_dwi
from test_memory import peak_tree_rss

MiB = 2**20
# the phantom of the flag tests (tuned on, with others: see report.summaries)
PHANTOM = dict(shape=(32, 32, 16), nvols=30, nb0=3, shells=(1000.0,), snr=20.0, seed=0)
CORRUPT_SLICE = 8


@pytest.fixture(scope="module")
def phantom():
    from p2s_dask.testing.phantom import make_phantom
    return make_phantom(**PHANTOM)


def _write(folder, ph, dwi=None, name="dwi.nii"):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    nib.save(nib.Nifti1Image(ph["dwi"] if dwi is None else dwi, ph["affine"]), str(path))
    np.savetxt(folder / "dwi.bval", ph["bvals"][None], fmt="%g")
    np.savetxt(folder / "dwi.bvec", ph["bvecs"].T, fmt="%.6f")
    return path


def _denoise(inp, out, *extra):
    report, js = Path(str(out) + ".html"), Path(str(out) + ".report.json")
    code = main(["denoise", str(inp), str(out), "--report", str(report), "--report-json",
                 str(js), "--quiet", *map(str, extra)])
    assert code == 0
    return json.loads(js.read_text()), report


def _rms_over_dwi(inp, out, bvals):
    """The noise map by NumPy from the two files: RMS over the diffusion
    volumes of input minus output (the values a reader of each gets)."""
    diff = nib.load(str(inp)).get_fdata() - nib.load(str(out)).get_fdata()
    return np.sqrt(np.mean(diff[..., bvals > 50] ** 2, axis=-1))


@pytest.mark.parametrize("case", ["float32 .nii, blocks", "scaled int16 .nii.gz, r=1"])
def test_noise_map_is_the_rms_of_input_minus_output(tmp_path, phantom, case):
    if case.startswith("float32"):
        inp, extra = _write(tmp_path / "in", phantom), ["--chunks", "16,12,5"]
        bvals = phantom["bvals"]
    else:
        inp = write_small_dwi(tmp_path)
        extra = ["--patch-radius", "1", "--ver", "1", "--chunks", "9,9,4"]
        bvals = np.loadtxt(tmp_path / "dwi.bval")
    out = tmp_path / ("o.nii" if case.startswith("float32") else "o.nii.gz")
    info, _ = _denoise(inp, out, *extra)
    noise = nib.load(noise_map_url(out))
    assert noise.shape == nib.load(str(inp)).shape[:3]
    np.testing.assert_allclose(noise.affine, nib.load(str(inp)).affine)
    expected = _rms_over_dwi(inp, out, bvals)
    np.testing.assert_allclose(noise.get_fdata(), expected, rtol=2e-6,
                               atol=2e-6 * expected.max())
    # the residual RMS per volume from the same files
    diff = nib.load(str(inp)).get_fdata() - nib.load(str(out)).get_fdata()
    per_volume = np.sqrt(np.mean(diff ** 2, axis=(0, 1, 2)))
    np.testing.assert_allclose(info["qc"]["rms_per_volume"], per_volume, rtol=1e-5)


def _corrupted(ph, fraction):
    dwi = ph["dwi"].copy()
    volume = int(np.flatnonzero(ph["bvals"] > 50)[7])
    dwi[:, :, CORRUPT_SLICE, volume] *= fraction
    return dwi, volume


@pytest.mark.parametrize("fraction", [0.0, 0.5])
def test_a_dropped_slice_flags_its_volume_and_only_it(tmp_path, phantom, fraction):
    dwi, volume = _corrupted(phantom, fraction)
    out = tmp_path / "o.nii.gz"
    info, page = _denoise(_write(tmp_path / "in", phantom, dwi), out, "--chunks", "32,32,6")
    assert info["qc"]["flagged_volumes"] == [volume]
    assert info["qc"]["flagged"][0]["slices"] == [CORRUPT_SLICE]
    side = json.loads((tmp_path / "o.json").read_text())
    assert side["P2SDask"]["FlaggedVolumes"] == [volume]
    assert f'data-volume="{volume}"' in page.read_text()


def test_a_clean_phantom_flags_nothing(tmp_path, phantom):
    out = tmp_path / "o.nii"
    info, page = _denoise(_write(tmp_path / "in", phantom), out)
    assert info["qc"]["flagged_volumes"] == []
    assert json.loads((tmp_path / "o.json").read_text())["P2SDask"]["FlaggedVolumes"] == []
    assert 'class="no-flags"' in page.read_text()


def test_block_summaries_merge_to_the_whole_image(phantom):
    """Blocks summarised apart and merged (in any grouping) give the sums of
    the whole image, which NumPy computes directly."""
    dwi = phantom["dwi"]
    rng = np.random.default_rng(3)
    out = (dwi + rng.normal(0, 5, dwi.shape)).astype(np.float32)
    bvals = phantom["bvals"]
    groups = make_groups(bvals, dwi.shape[3], b0_threshold=50)
    spec = make_spec(dwi.shape, bvals, groups, 50)
    corners = [(x, y, z) for x in (0, 16) for y in (0, 20) for z in (0, 5, 10, 15)]
    parts = [block_qc(dwi[x:x + 16, y:y + 20, z:z + 5], out[x:x + 16, y:y + 20, z:z + 5],
                      (x, y, z), spec) for x, y, z in corners]
    # through the work store's arrays and back, merged in two levels
    parts = [from_arrays(to_arrays(p)) for p in parts]
    merged = merge(merge(*parts[:5]), merge(*parts[5:]))
    result = finish(merged, spec, bvals, groups)
    r = dwi.astype(np.float64) - out
    # float32 data: residuals squared in float32, summed in float64
    np.testing.assert_allclose(result.rms_slice, np.sqrt(np.mean(r ** 2, axis=(0, 1))).T,
                               rtol=1e-6)
    np.testing.assert_allclose(result.noise, np.sqrt(np.mean(r[..., bvals > 50] ** 2, -1)),
                               rtol=1e-6)
    for v, (original, denoised) in result.mosaics.items():
        np.testing.assert_array_equal(original, dwi[:, :, list(spec.slices), v])
        np.testing.assert_array_equal(denoised, out[:, :, list(spec.slices), v])
    # the sample: SAMPLE_SIZE residuals (one more at most per block)
    assert SAMPLE_SIZE <= result.sample.size <= SAMPLE_SIZE + len(parts)
    assert np.isin(result.sample, r.astype(np.float32)).all()


def test_flag_rule_on_made_up_residuals():
    """A slice far above its shell's median is flagged; a volume of another
    shell is compared with its own shell; small sets flag nothing."""
    rng = np.random.default_rng(0)
    bvals = np.array([0] * 3 + [1000] * 10 + [2000] * 10, float)
    level = np.where(bvals[:, None] > 1500, 50.0, 100.0)
    rms_slice = level * rng.uniform(0.95, 1.05, (23, 12))
    rms_slice[15, 4] *= 3  # a b=2000 volume with one bad slice
    rms_slice[1, 2] *= 5  # a b0 (a set of three: never judged)
    rms_volume = np.sqrt(np.mean(rms_slice ** 2, axis=1))
    groups = [("b0", (0, 1, 2), True), ("dwi", tuple(range(3, 23)), True)]
    flags = flag_volumes(rms_slice, rms_volume, comparison_sets(groups, bvals), bvals)
    assert [(f["volume"], f["slices"]) for f in flags] == [(15, [4])]


def test_every_figure_is_a_png_and_the_page_holds_them(phantom):
    bvals = phantom["bvals"]
    dwi = phantom["dwi"]
    groups = make_groups(bvals, dwi.shape[3], b0_threshold=50)
    spec = make_spec(dwi.shape, bvals, groups, 50)
    result = finish(block_qc(dwi, dwi * 0.9, (0, 0, 0), spec), spec, bvals, groups)
    pngs = figures.draw_all(result)
    assert tuple(pngs) == QC_FIGURES
    assert all(p.startswith(b"\x89PNG") for p in pngs.values())
    info = {"qc": result.as_json(), "cross_validation": [{"radius": 0, "error": 1.5}]}
    page = html.page("t", [html.run_section(info, {k: html.data_uri(v)
                                                   for k, v in pngs.items()}, "run")])
    assert page.count("data:image/png;base64,") == len(QC_FIGURES)
    assert 'class="qc-cross-validation"' in page and "<td>1.5</td>" in page


def _done(work):
    folder = Path(work) / "done"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def test_a_resumed_run_reports_every_block(tmp_path, phantom):
    """Killed mid-prediction and resumed, the run's report counts the blocks
    the first process did (their summaries were saved with them)."""
    inp = _write(tmp_path / "in", phantom)
    clean, _ = _denoise(inp, tmp_path / "clean.nii", "--chunks", "8,8,16")
    out = tmp_path / "o.nii"
    cmd = [sys.executable, "-m", "p2s_dask.fronts.cli", "denoise", str(inp), str(out),
           "--chunks", "8,8,16", "--report", str(tmp_path / "r.html"), "--quiet"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, P2S_DASK_CHUNK_DELAY="0.4"))
    deadline = time.time() + 120
    while _done(str(out) + ".p2s-work") < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= _done(str(out) + ".p2s-work") < 16
    resumed, _ = _denoise(inp, out, "--chunks", "8,8,16", "--overwrite")
    assert any("output chunks" in r for r in resumed["resumed"])
    np.testing.assert_allclose(resumed["qc"]["rms_per_volume"], clean["qc"]["rms_per_volume"],
                               rtol=1e-12)
    np.testing.assert_array_equal(nib.load(noise_map_url(out)).get_fdata(),
                                  nib.load(noise_map_url(tmp_path / "clean.nii")).get_fdata())


def _write_large(path, shape):
    """A float32 .nii of ``shape`` written a volume at a time (never whole
    in this process), with a b0 and one shell."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_qform(np.eye(4), 1)
    hdr.set_sform(np.eye(4), 1)
    offset = 352  # the header and an empty extension flag
    hdr.set_data_offset(offset)
    with open(path, "wb") as fh:
        fh.write(hdr.binaryblock + b"\0" * (offset - len(hdr.binaryblock)))
    data = np.memmap(path, np.float32, "r+", offset=offset, shape=shape, order="F")
    rng = np.random.default_rng(0)
    anat = (600 + 300 * rng.random(shape[:3])).astype(np.float32)
    for v in range(shape[3]):
        att = 1.0 if v < 4 else rng.uniform(0.3, 0.7)
        data[..., v] = anat * att + rng.normal(0, 30, shape[:3]).astype(np.float32)
    data.flush()
    del data
    bvals = np.array([0] * 4 + [1000] * (shape[3] - 4))
    np.savetxt(str(path).replace(".nii", ".bval"), bvals[None], fmt="%d")
    return int(np.prod(shape)) * 4


def test_report_stays_within_the_memory_budget(tmp_path):
    """A 256 MiB run on 1 GiB of float32 makes its report within the budget:
    its peak beyond the same command's on a tiny image (the interpreter,
    its libraries and matplotlib) stays under the budget."""
    budget = 256 * MiB
    peaks = {}
    for name, shape in (("tiny", (16, 16, 8, 12)), ("large", (192, 192, 120, 64))):
        src = tmp_path / f"{name}.nii"
        nbytes = _write_large(src, shape)
        out = tmp_path / f"{name}_out.nii"
        cmd = [sys.executable, "-m", "p2s_dask.fronts.cli", "denoise", str(src), str(out),
               "--memory-limit", str(budget), "--report", str(tmp_path / f"{name}.html"),
               "--quiet"]
        rc, peak, log = peak_tree_rss(cmd)
        assert rc == 0, log
        assert Path(noise_map_url(out)).exists() and (tmp_path / f"{name}.html").exists()
        peaks[name] = (peak, nbytes)
        out.unlink()
    assert peaks["large"][1] >= 4 * budget
    growth = peaks["large"][0] - peaks["tiny"][0]
    assert growth < budget, f"peak grew by {growth / MiB:.0f} MiB ({peaks})"
