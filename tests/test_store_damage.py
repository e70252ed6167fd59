"""Stores read as their writer promised.

A store p2s-dask wrote was complete, every shard checked, when it was
marked so: a shard missing later is damage, and a run stops on it, keeping
nothing. Another tool's store may leave out chunks equal to the fill value,
as the Zarr specification allows: they are read as that value, and one
warning says how many there were.
"""

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from p2s_dask import patch2self
from p2s_dask.errors import DataError
from p2s_dask.fronts.cli import main
from p2s_dask.io.chunk_io import missing_chunks
from p2s_dask.io.zarr_store import open_dwi, open_dwi_array

SHAPE = (12, 10, 8, 12)
BVALS = np.r_[0, 0, [1000] * 5, [2000] * 5]


def _noisy(seed=0) -> np.ndarray:
    """Smooth volumes plus noise, no zeros (a missing block shows)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE[:3]), indexing="ij")
    base = 200 + 80 * np.cos(2 * x) * np.sin(y + 0.5 * z)
    decay = np.exp(-BVALS / 3000.0)
    return (base[..., None] * decay + rng.normal(0, 8, SHAPE)).astype(np.float32)


def _gradients(folder: Path) -> Path:
    bvals = folder / "dwi.bval"
    np.savetxt(bvals, BVALS[None], fmt="%d")
    return bvals


@pytest.fixture
def our_store(tmp_path):
    """A store converted by p2s-dask: 2 x 2 x 2 shards of all volumes."""
    nib.save(nib.Nifti1Image(_noisy(), np.eye(4)), str(tmp_path / "dwi.nii.gz"))
    _gradients(tmp_path)
    store = tmp_path / "dwi.zarr"
    assert main(["convert", str(tmp_path / "dwi.nii.gz"), str(store), "--chunks", "6,5,4",
                 "--quiet"]) == 0
    shards = sorted((store / "0" / "c").rglob("*"))
    assert len([p for p in shards if p.is_file()]) == 8
    return store


def _work_store(out: Path) -> Path:
    return Path(f"{out}.p2s-work")


@pytest.mark.parametrize("out_name", ["den.nii", "den.zarr"])
def test_missing_shard_of_our_store_stops_the_run(our_store, tmp_path, capsys, out_name):
    (our_store / "0" / "c" / "0" / "1" / "0" / "1").unlink()
    out = tmp_path / out_name
    capsys.readouterr()
    assert main(["denoise", str(our_store), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("p2s-dask: error: reading ")
    assert str(our_store) in err and "chunk 0/c/0/1/0/1" in err and "missing" in err, err
    # nothing that looks like a result, or like work to resume
    assert not out.exists()
    assert not _work_store(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dwi.bval", "dwi.nii.gz",
                                                          "dwi.zarr"]


def test_damaged_shard_of_our_store_keeps_no_work(our_store, tmp_path, capsys):
    """A shard cut short: the same one line, and no work store left."""
    shard = our_store / "0" / "c" / "0" / "0" / "1" / "1"
    shard.write_bytes(shard.read_bytes()[:100])
    out = tmp_path / "den.nii"
    capsys.readouterr()
    assert main(["denoise", str(our_store), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "chunk 0/c/0/0/1/1 is damaged" in err, err
    assert not out.exists() and not _work_store(out).exists()


def test_convert_and_denoise_read_one_rule(our_store, tmp_path):
    """Converting back to NIfTI says the same of the same missing shard."""
    (our_store / "0" / "c" / "0" / "0" / "0" / "1").unlink()
    from p2s_dask.io import zarr_to_nifti
    with pytest.raises(DataError) as converting:
        zarr_to_nifti(our_store, tmp_path / "back.nii", progress=False)
    with pytest.raises(DataError) as reading:
        open_dwi(our_store)[0].compute()
    assert str(converting.value) == str(reading.value)
    assert "chunk 0/c/0/0/0/1" in str(reading.value)
    assert not (tmp_path / "back.nii").exists()


def test_missing_shard_read_through_zarr_is_found_by_listing(tmp_path):
    """A store of ours whose codec Zarr decodes (not our reader's): the
    missing shard is found before any read, from one listing."""
    from zarr.codecs import ZstdCodec

    from p2s_dask.io import DwiMeta, create_dwi_store, mark_complete, write_region, zarr_to_nifti
    from p2s_dask.io.chunk_io import _ChunkCodec, read_chunks
    data = _noisy(1)
    url = tmp_path / "zstd.zarr"
    array = create_dwi_store(url, SHAPE, data.dtype, (6, 5, 8),
                             DwiMeta.for_array(SHAPE, data.dtype), compressor=ZstdCodec())
    write_region(array, ..., data, str(url))
    mark_complete(url)
    stored, _ = open_dwi_array(url)
    assert _ChunkCodec.of(stored.zarr) is None  # Zarr decodes it, not our reader
    np.testing.assert_array_equal(read_chunks(stored, str(url)).compute(), data)
    (url / "0" / "c" / "0" / "0" / "1" / "0").unlink()
    assert missing_chunks(stored) == (["0/c/0/0/1/0"], 4)
    with pytest.raises(DataError, match=r"chunk 0/c/0/0/1/0 .*missing.*\(1 of its 4 chunks"):
        read_chunks(stored, str(url))
    with pytest.raises(DataError, match=r"chunk 0/c/0/0/1/0 .*missing"):
        zarr_to_nifti(url, tmp_path / "back.nii", progress=False)
    assert not (tmp_path / "back.nii").exists()


def _foreign_store(path: Path, data: np.ndarray, fill: float) -> zarr.Array:
    """An OME-Zarr 0.5 image written by Zarr itself (axes t, z, y, x; one
    chunk per volume and 6 x 5 x 4 block, no p2s-dask attributes), with
    its b-values beside it as NIfTI-Zarr stores them."""
    group = zarr.create_group(str(path), zarr_format=3, attributes={"ome": {
        "version": "0.5", "multiscales": [{
            "axes": [{"name": "t", "type": "time"}] + [
                {"name": a, "type": "space", "unit": "millimeter"} for a in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0]}]}]}]}})
    image = group.create_array("0", shape=data.shape[::-1], chunks=(1, 4, 5, 6),
                               dtype=data.dtype, fill_value=fill,
                               dimension_names=("t", "z", "y", "x"))
    image[...] = data.T
    group.create_array("bvals", data=BVALS.astype(np.float64), dimension_names=("t",))
    return image


def test_missing_chunk_of_a_foreign_store_is_the_fill_value(tmp_path, caplog):
    data = _noisy(2).astype(np.float64)
    fill = 150.0
    store = tmp_path / "theirs.zarr"
    image = _foreign_store(store, data, fill)
    assert not missing_chunks(image)[0]
    # volume 3 and volume 9 lose their block x 6:12, y 0:5, z 4:8
    for volume in (3, 9):
        (store / "0" / "c" / str(volume) / "1" / "0" / "1").unlink()
    filled = data.copy()
    filled[6:12, 0:5, 4:8, [3, 9]] = fill
    out = tmp_path / "den.nii"
    with caplog.at_level(logging.WARNING, logger="p2s_dask"):
        assert main(["denoise", str(store), str(out), "--out-dtype", "float64",
                     "--quiet"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "p2s_dask"
              and r.levelno == logging.WARNING and "missing" in r.getMessage()]
    assert len(warned) == 1 and "2 of its 96 chunks are missing" in warned[0], warned
    assert "fill value 150.0" in warned[0]
    got = nib.load(str(out)).get_fdata()
    expect = patch2self(filled, BVALS, out_dtype=np.float64)
    np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-9 * np.abs(expect).max())
    # and it is not the data as it was before the chunks went
    assert not np.allclose(got, patch2self(data, BVALS, out_dtype=np.float64), atol=1e-3)
    assert not _work_store(out).exists()


def test_complete_foreign_store_warns_of_nothing(tmp_path, caplog):
    store = tmp_path / "theirs.zarr"
    _foreign_store(store, _noisy(3), 0.0)
    with caplog.at_level(logging.WARNING, logger="p2s_dask"):
        values, _ = open_dwi(store)
    assert not [r for r in caplog.records if "missing" in r.getMessage()]
    np.testing.assert_array_equal(values.compute(), _noisy(3))
    assert os.path.isdir(store)


# ---------------------------------------------------------------------------
# One background writer: the NIfTI blocks' and the Zarr chunks' share it.


def test_one_background_writer_class():
    from p2s_dask.io.background import BackgroundWriter
    from p2s_dask.io.chunk_io import ChunkWriter
    from p2s_dask.io.nifti_direct import BlockWriter
    assert issubclass(ChunkWriter, BackgroundWriter) and issubclass(BlockWriter, BackgroundWriter)
    assert "_run" not in vars(ChunkWriter) and "_run" not in vars(BlockWriter)


def test_background_writer_stops_at_the_first_error_and_says_it():
    """Items after a failed one are dropped, never marked done; the error
    comes back from submit and from close; finish learns that one failed."""
    import threading

    from p2s_dask.io.background import BackgroundWriter

    gate = threading.Event()

    class Failing(BackgroundWriter):
        written, finished = [], []

        def write(self, n):
            gate.wait(5)
            if n == 1:
                raise OSError(28, "No space left on device")
            self.written.append(n)

        def finish(self, ok):
            self.finished.append(ok)

    writer = Failing(depth=4, threads=1)
    done = []
    for n in range(4):
        writer.submit((n,), then=lambda n=n: done.append(n))
    gate.set()
    with pytest.raises(OSError, match="space"):
        writer.close()
    assert Failing.written == [0] and done == [0]  # in order; 2 and 3 dropped
    assert Failing.finished == [False]
    with pytest.raises(OSError, match="space"):
        writer.submit((5,))
