"""One prediction with a patch: the minima pass keeps each block's products
in the work store and the prediction pass shifts and casts them, giving the
bytes that computing the prediction again gives."""

import hashlib

import nibabel as nib
import numpy as np
import pytest

import p2s_dask.run.passes as passes
import p2s_dask.run.pipeline as pipeline
from p2s_dask.core.predict import finish_products, predict_block
from p2s_dask.core.solve import LinearModel
from p2s_dask.fronts.cli import main
from p2s_dask.graph import engine
from p2s_dask.planning.plan import (Data, Endpoint, Settings, Workers, keeps_predictions,
                                    make_plan)
from p2s_dask.run.workstore import WorkStore

SHAPE = (20, 18, 12, 14)
CHUNKS = "8,8,4"  # 3 x 3 x 3 blocks


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A float32 head with noise: 2 b0 and 12 diffusion volumes."""
    folder = tmp_path_factory.mktemp("kept")
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE[:3]], indexing="ij")
    head = np.clip((1 - np.sqrt(x * x + y * y + z * z)) * 4, 0, 1)
    data = np.stack([np.abs(900 * head * (1 if v < 2 else rng.uniform(0.3, 0.7))
                            + rng.normal(0, 30, head.shape)) for v in range(SHAPE[3])],
                    axis=-1).astype(np.float32)
    path = folder / "in.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    np.savetxt(folder / "in.bval", np.r_[0, 0, np.full(12, 1000)][None], fmt="%d")
    # int16 with a scale: the output is int16 with a slope fitted to the
    # prediction's range (the minima pass finds the maximum too)
    scaled = nib.Nifti1Image(np.round(data * 4).astype(np.int16), np.eye(4))
    scaled.header.set_slope_inter(0.25, 0)
    nib.save(scaled, str(folder / "scaled.nii"))
    np.savetxt(folder / "scaled.bval", np.r_[0, 0, np.full(12, 1000)][None], fmt="%d")
    return path


def _denoise(scan, out, *extra):
    code = main(["denoise", str(scan), str(out), "--patch-radius", "1", "--ver", "1",
                 "--chunks", CHUNKS, "--quiet", *extra])
    assert code == 0
    return hashlib.sha256(out.read_bytes()).hexdigest()


def _no_disk(url):
    return 0  # no room to keep anything: the prediction is computed twice


def _count_calls(monkeypatch, module, name) -> list:
    """A list that gets an item at each call of ``module.name`` (patched)."""
    calls, real = [], getattr(module, name)

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("name, extra", [("in", []), ("in", ["--out-dtype", "int16"]),
                                         ("in", ["--out-dtype", "uint8"]), ("scaled", [])],
                         ids=["float32", "int16", "uint8", "fitted-scale"])
def test_kept_predictions_give_the_same_bytes(scan, tmp_path, monkeypatch, name, extra):
    kept_blocks = _count_calls(monkeypatch, engine, "kept_prediction_range")
    scan = scan.with_name(f"{name}.nii")
    kept = _denoise(scan, tmp_path / "kept.nii", *extra)
    assert len(kept_blocks) == 27  # the minima pass kept every block's
    monkeypatch.setattr(pipeline, "free_disk", _no_disk)
    twice = _denoise(scan, tmp_path / "twice.nii", *extra)
    assert kept == twice
    assert len(kept_blocks) == 27  # nothing kept without room


def test_the_prediction_pass_computes_nothing(scan, tmp_path, monkeypatch):
    reference = _denoise(scan, tmp_path / "ref.nii")

    def no_second_prediction(*args, **kwargs):
        raise AssertionError("the prediction was computed again")

    monkeypatch.setattr(engine, "predict_chunk", no_second_prediction)
    assert _denoise(scan, tmp_path / "kept.nii") == reference


def test_lost_products_are_computed_again(scan, tmp_path, monkeypatch):
    """Kept blocks lost before the prediction pass (removed, damaged) are
    predicted again from the input: the same bytes."""
    reference = _denoise(scan, tmp_path / "ref.nii")
    real = passes._kept_keys
    lost = []

    def lose_some(work):
        names = sorted(real(work))[:5]
        for key in names:
            work.remove(passes._kept_name(key))
        lost.extend(names)
        return real(work)

    monkeypatch.setattr(passes, "_kept_keys", lose_some)
    assert _denoise(scan, tmp_path / "kept.nii") == reference
    assert len(lost) == 5


def test_products_lost_while_predicting_stop_the_run_in_one_line(scan, tmp_path,
                                                                 monkeypatch, capsys):
    """A kept block that vanishes after the pass listed it: one line, exit 2
    (nothing complete at OUT), and the same command then finishes the job
    with the bytes of an uninterrupted run."""
    reference = _denoise(scan, tmp_path / "ref.nii")
    real = WorkStore.load_array

    def vanish(self, name):
        if name.startswith(passes.KEPT_FOLDER):
            self.remove(name)
        return real(self, name)

    monkeypatch.setattr(WorkStore, "load_array", vanish)
    out = tmp_path / "kept.nii"
    code = main(["denoise", str(scan), str(out), "--patch-radius", "1", "--ver", "1",
                 "--chunks", CHUNKS, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "lost the kept prediction" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(WorkStore, "load_array", real)
    assert _denoise(scan, out) == reference


def test_kept_products_under_a_process_cluster(scan, tmp_path, monkeypatch):
    """Two worker processes keep and read back the products: the bytes of
    the threads computing the prediction twice."""
    kept = _denoise(scan, tmp_path / "kept.nii", "--workers", "2")
    monkeypatch.setattr(pipeline, "free_disk", _no_disk)
    assert kept == _denoise(scan, tmp_path / "twice.nii")


def test_finish_products_equals_predict_block_bit_for_bit():
    rng = np.random.default_rng(1)
    m, patch = 9, 27
    block = np.asfortranarray(rng.normal(100, 40, (11, 10, 9, m)).astype(np.float32))
    model = LinearModel(rng.normal(0, 0.1, (m * patch, m)), rng.normal(0, 50, m), patch)
    for dtype in (np.float32, np.float64):
        for out_dtype in (np.float32, np.int16):
            for order in ("C", "F"):
                data = np.array(block, order=order)
                ref = np.empty((9, 8, 7, m), out_dtype, order=order)
                predict_block(data, (1, 1, 1), model, out=ref, dtype=dtype)
                products = predict_block(data, (1, 1, 1), model.products_only(),
                                         dtype=dtype)
                got = np.empty_like(ref)
                finish_products(products, model, out=got, max_bytes=3000)
                assert ref.tobytes() == got.tobytes()


def _plan(radius=(1, 1, 1), free=10**12, local=True, minima=True, work_local=True):
    return make_plan(Data((64, 64, 40, 30), "float32", "float32", calc_itemsize=4),
                     Endpoint("nifti", "a.nii"), Endpoint("nifti", "b.nii"),
                     Workers(1, 2**30, 2, local=local),
                     Settings(radius, minima, work_local=work_local, scratch_free=free))


def test_the_plan_keeps_predictions_only_where_they_pay_and_fit():
    need = 64 * 64 * 40 * 30 * 4
    assert _plan().keep_predictions
    assert "keeps its predictions" in "\n".join(_plan().describe())
    assert not _plan(radius=(0, 0, 0)).keep_predictions  # one GEMM: cheaper than disk
    assert not _plan(minima=False).keep_predictions      # no minima pass to keep from
    assert not _plan(local=False).keep_predictions       # workers elsewhere
    assert not _plan(work_local=False).keep_predictions  # an object store
    assert not _plan(free=None).keep_predictions
    assert _plan(free=2 * need).keep_predictions
    assert not _plan(free=2 * need - 1).keep_predictions
    assert keeps_predictions((4, 4, 4, 4), (1, 1, 1), 8, Workers(),
                             Settings((1, 1, 1), scratch_free=4**4 * 16))
    # the minima pass holds a prediction per thread, as the prediction pass
    kept, computed = _plan(), _plan(free=0)
    assert kept.pass_named("minima").memory > computed.pass_named("minima").memory
    assert kept.pass_named("minima").memory <= kept.pass_named("predict").memory


def test_free_disk_of_a_missing_folder_is_its_parents(tmp_path):
    assert pipeline.free_disk(str(tmp_path / "a" / "b.p2s-work")) > 0
    assert pipeline.free_disk("s3://bucket/work") is None


@pytest.mark.parametrize("radius", ["0", "1"])
def test_every_prediction_pass_reads_a_plain_nii_with_its_halo(scan, tmp_path, monkeypatch,
                                                               radius):
    """Without room to keep, the minima and the prediction pass of a plain
    ``.nii`` each read every block with its halo straight from the file
    (``read_with_halo``): the bytes of the same image as ``.nii.gz``, whose
    blocks come through Dask's overlap."""
    gz = tmp_path / "same.nii.gz"
    nib.save(nib.load(str(scan)), str(gz))
    (tmp_path / "same.bval").write_text(scan.with_suffix(".bval").read_text())
    monkeypatch.setattr(pipeline, "free_disk", _no_disk)
    reads = _count_calls(monkeypatch, passes, "read_with_halo")

    def run(inp, out):
        code = main(["denoise", str(inp), str(out), "--patch-radius", radius, "--ver", "1",
                     "--chunks", CHUNKS, "--quiet", "--out-dtype", "int16"])
        assert code == 0
        return nib.load(str(out)).dataobj.get_unscaled()

    from_file = run(scan, tmp_path / "a.nii")
    assert len(reads) == 2 * 27  # the minima pass, then the prediction pass
    assert np.array_equal(from_file, run(gz, tmp_path / "b.nii"))
    assert len(reads) == 2 * 27  # none for the .nii.gz
