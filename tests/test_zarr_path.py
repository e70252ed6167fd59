"""The Zarr path: chunks read and written without Zarr's machinery, the same
numbers and the same memory bound as the plain .nii path."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import zarr

from p2s_dask.errors import InputError
from p2s_dask.io import open_dwi, open_dwi_array, write_region
from p2s_dask.io.chunk_io import (ChunkWriter, _ChunkCodec, finish_region_writes,
                                  read_chunks, submit_region)
from p2s_dask.run.memory import PeakMemory

MiB = 2**20


def write_nii(path, data, bvals):
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    np.savetxt(str(path)[:-len(".nii")] + ".bval", np.asarray(bvals)[None], fmt="%d")
    return path


def dwi(shape, nvols, seed=0):
    """A float32 head with noise (a noisy background, as in the benchmark)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = np.clip((1 - np.sqrt(x * x + y * y + z * z)) * 8, 0, 1)
    data = np.empty(shape + (nvols,), np.float32)
    for v in range(nvols):
        att = 1.0 if v < 4 else rng.uniform(0.3, 0.7)
        data[..., v] = np.abs(900 * head * att + rng.normal(0, 30, shape))
    return data, np.array([0] * 4 + [1000] * (nvols - 4))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "p2s_dask.fronts.cli", *map(str, args), "--quiet"],
                          capture_output=True, text=True)


def peak_denoise(src, out, budget, *extra):
    """Peak RSS of the whole process tree of one ``denoise`` run."""
    proc = subprocess.Popen([sys.executable, "-m", "p2s_dask.fronts.cli", "denoise", str(src),
                             str(out), "--memory-limit", str(budget), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakMemory(proc.pid, interval=0.01) as peak:
        output, _ = proc.communicate()
    assert proc.returncode == 0, output
    return peak.peak


@pytest.mark.parametrize("threads", [[], ["--threads", "8"]], ids=["cores", "8-threads"])
def test_both_paths_stay_within_the_budget_and_agree(tmp_path, threads):
    """A 64 MiB budget, data several times larger: .nii -> .nii and
    .zarr -> .zarr each peak under the budget plus the peak of the same run
    on tiny data (the interpreter, the libraries, the threads), and give the
    same numbers up to float32 rounding (the core sums a volume-major .nii
    block and a voxel-major Zarr block in different orders). Eight threads
    as on a larger machine (CI's: glibc's heaps per thread once took the
    Zarr run 140 MiB above the baseline)."""
    budget = 64 * MiB
    peaks = {}
    for name, shape in (("tiny", (16, 16, 8)), ("large", (96, 96, 64))):
        data, bvals = dwi(shape, 64, seed=1)
        nii = write_nii(tmp_path / f"{name}.nii", data, bvals)
        store = tmp_path / f"{name}.zarr"
        res = cli("convert", nii, store, "--memory-limit", budget)
        assert res.returncode == 0, res.stderr
        peaks[name] = {"nii": peak_denoise(nii, tmp_path / f"{name}_out.nii", budget, *threads),
                       "zarr": peak_denoise(store, tmp_path / f"{name}_out.zarr", budget,
                                            *threads)}
    assert data.nbytes > 2 * budget  # as float64 values (the arithmetic): 4.7 x
    baseline = max(peaks["tiny"].values())
    for path, peak in peaks["large"].items():
        assert peak - baseline < budget, \
            f"{path}: {(peak - baseline) / MiB:.0f} MiB above the baseline"
    from_nii = np.asanyarray(nib.load(tmp_path / "large_out.nii").dataobj)
    from_zarr = open_dwi(tmp_path / "large_out.zarr")[0].compute()
    np.testing.assert_allclose(from_zarr, from_nii, rtol=0,
                               atol=2e-6 * float(np.abs(from_nii).max()))


def test_same_numbers_as_through_zarr(tmp_path, monkeypatch):
    """Reading and writing chunks without Zarr's machinery changes no number:
    a .zarr -> .zarr run gives the bytes Zarr's own reads and writes give."""
    from p2s_dask.fronts.cli import main
    import p2s_dask.io.chunk_io as zs

    data, bvals = dwi((24, 22, 10), 20, seed=3)
    nii = write_nii(tmp_path / "dwi.nii", data, bvals)
    assert main(["convert", str(nii), str(tmp_path / "in.zarr"), "--quiet"]) == 0
    args = ["--chunks", "7,9,4", "--quiet"]  # edge chunks on every axis
    assert main(["denoise", str(tmp_path / "in.zarr"), str(tmp_path / "ours.zarr"), *args]) == 0
    monkeypatch.setattr(zs._ChunkCodec, "of", classmethod(lambda cls, array: None))
    assert main(["denoise", str(tmp_path / "in.zarr"), str(tmp_path / "zarr.zarr"),
                 *args]) == 0
    ours = open_dwi_array(tmp_path / "ours.zarr")[0]
    theirs = open_dwi_array(tmp_path / "zarr.zarr")[0]
    np.testing.assert_array_equal(ours[...], theirs[...])
    # chunk for chunk the same stored bytes
    # shard for shard the same stored bytes (stored axes: t, z, y, x)
    for key in ("c/0/0/0/0", "c/0/2/2/3"):
        assert (tmp_path / "ours.zarr" / "0" / key).read_bytes() == \
            (tmp_path / "zarr.zarr" / "0" / key).read_bytes()


# ---------------------------------------------------------------------------
# The chunk reader and writer against Zarr itself


def _plain_array(path, shape, chunks, dtype, compressors="auto", shards=None):
    """A Zarr v3 array made by Zarr alone (our format's codecs by default)."""
    from p2s_dask.io.zarr_store import default_compressor
    if compressors == "auto":
        compressors = default_compressor()
    return zarr.create_array(str(path), shape=shape, chunks=chunks, dtype=dtype,
                             compressors=compressors, fill_value=0, shards=shards,
                             config={"write_empty_chunks": True})


@pytest.mark.parametrize("inner", [(1, 2, 4, 3), (2, 1, 2, 3)])
@pytest.mark.parametrize("dtype", ["int16", "float32"])
def test_sharded_reader_and_writer_match_zarr(tmp_path, inner, dtype):
    """Shards (our layout: one inner chunk per volume; and inner chunks that
    are not contiguous in the shard) written by Zarr read back through
    read_chunks, and shards written by write_region read back through Zarr,
    bit for bit, edge shards included."""
    shape, shards = (5, 5, 6, 7), (4, 2, 4, 3)
    rng = np.random.default_rng(1)
    values = (rng.random(shape) * 100).astype(dtype)
    a = _plain_array(tmp_path / "a.zarr", shape, inner, dtype, shards=shards)
    assert _ChunkCodec.of(a) is not None and _ChunkCodec.of(a).inner == inner
    a[...] = values
    lazy = read_chunks(a)
    assert lazy.chunks == ((4, 1), (2, 2, 1), (4, 2), (3, 3, 1))
    np.testing.assert_array_equal(lazy.compute(), values)
    b = _plain_array(tmp_path / "b.zarr", shape, inner, dtype, shards=shards)
    write_region(b, ..., values, "b.zarr")
    np.testing.assert_array_equal(b[...], values)
    shard = (tmp_path / "a.zarr" / "c" / "0" / "0" / "0" / "0")
    if inner[0] == 1:
        # one inner chunk per volume, in order: the very bytes Zarr writes
        # (Zarr orders several split axes along a Morton curve; we do not)
        assert shard.read_bytes() == (tmp_path / "b.zarr" / "c" / "0" / "0" / "0" / "0"
                                      ).read_bytes()
    # an index that fails its checksum is a damaged shard, in one line
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged") as err:
        read_chunks(a, "a.zarr").compute()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("dtype", ["float32", "int16", "uint8", "float64"])
@pytest.mark.parametrize("compressors", ["auto", None])
def test_reader_and_writer_match_zarr(tmp_path, dtype, compressors):
    """Chunks written by Zarr read back through read_chunks, and chunks
    written by write_region read back through Zarr, edges included."""
    shape, chunks = (7, 6, 5, 4), (3, 4, 2, 4)
    rng = np.random.default_rng(0)
    values = (rng.random(shape) * 100).astype(dtype)
    a = _plain_array(tmp_path / "a.zarr", shape, chunks, dtype, compressors)
    assert _ChunkCodec.of(a) is not None
    a[...] = values
    lazy = read_chunks(a)
    assert lazy.chunks == ((3, 3, 1), (4, 2), (2, 2, 1), (4,))
    np.testing.assert_array_equal(lazy.compute(), values)
    for block in lazy.blocks:  # every block as Zarr gives it: C-contiguous
        assert block.compute().flags.c_contiguous
    b = _plain_array(tmp_path / "b.zarr", shape, chunks, dtype, compressors)
    write_region(b, ..., values, "b.zarr")
    np.testing.assert_array_equal(b[...], values)
    # a Fortran-ordered block (as predicted from a .nii), a scalar, a cast
    write_region(b, (slice(0, 3), slice(4, 6)), np.asfortranarray(values[:3, 4:] + 1), "b")
    write_region(b, (slice(6, 7), slice(0, 4), slice(4, 5)), 9, "b")
    expect = values.copy()
    expect[:3, 4:] += 1
    expect[6:, :4, 4:] = 9
    np.testing.assert_array_equal(b[...], expect)
    np.testing.assert_array_equal(read_chunks(b).compute(), expect)


def test_missing_chunks_read_as_fill_and_other_codecs_fall_back(tmp_path):
    a = _plain_array(tmp_path / "a.zarr", (4, 4, 4, 2), (2, 2, 2, 2), "float32")
    a[:2, :2, :2] = 5
    got = read_chunks(a).compute()
    assert got[:2, :2, :2].min() == 5 and got.sum() == 5 * 16
    from zarr.codecs import ZstdCodec
    z = _plain_array(tmp_path / "z.zarr", (4, 4, 4, 2), (2, 2, 2, 2), "float32",
                     compressors=ZstdCodec(level=1))
    assert _ChunkCodec.of(z) is None  # not ours to decode: Zarr does it
    z[...] = 3
    np.testing.assert_array_equal(read_chunks(z).compute(), 3)


def test_damaged_chunk_is_one_line_error(tmp_path):
    a = _plain_array(tmp_path / "a.zarr", (4, 4, 4, 2), (2, 2, 2, 2), "float32")
    a[...] = 1
    chunk = tmp_path / "a.zarr" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])  # cut short
    with pytest.raises(InputError, match="damaged") as err:
        read_chunks(a, "a.zarr").compute()
    assert "\n" not in str(err.value)
    chunk.write_bytes(b"\x01")
    with pytest.raises(InputError, match="damaged"):
        read_chunks(a, "a.zarr").compute()


def test_background_writes(tmp_path, monkeypatch):
    """submit_region stores each chunk from a background thread, runs its
    ``then`` after the chunk is stored, and reports a failed write."""
    a = _plain_array(tmp_path / "a.zarr", (6, 4, 4, 3), (2, 4, 4, 3), "float32")
    values = np.arange(6 * 4 * 4 * 3, dtype=np.float32).reshape(6, 4, 4, 3)
    done = []
    url = str(tmp_path / "a.zarr")
    for x in range(0, 6, 2):
        region = (slice(x, x + 2),)
        submit_region(a, region, values[x:x + 2], url,
                      lambda x=x: done.append((x, a.nchunks_initialized)))
    assert finish_region_writes(url)
    assert not finish_region_writes(url)  # one writer per run, gone once finished
    assert sorted(x for x, _ in done) == [0, 2, 4]
    assert all(n >= 1 for _, n in done)
    np.testing.assert_array_equal(a[...], values)

    import p2s_dask.io.chunk_io as zs

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(zs, "_put_chunk", full)
    marked = []
    submit_region(a, (slice(0, 2),), values[:2], url, lambda: marked.append(1))
    with pytest.raises(InputError, match="space"):
        finish_region_writes(url)
    assert not marked


def test_writer_queue_is_bounded():
    """At most depth + threads chunks wait in a writer."""
    import threading

    gate = threading.Event()
    writer = ChunkWriter("x", depth=1, threads=1)
    import p2s_dask.io.chunk_io as zs
    real = zs._put_chunk
    zs._put_chunk = lambda *a, **k: gate.wait()
    try:
        writer.submit(None, "k0", b"", None)  # taken by the thread
        writer.submit(None, "k1", b"", None)  # waits in the queue
        blocked = threading.Thread(target=writer.submit, args=(None, "k2", b"", None))
        blocked.start()
        blocked.join(0.2)
        assert blocked.is_alive()  # the third waits for room
        gate.set()
        blocked.join(5)
        writer.close()
    finally:
        zs._put_chunk = real
        gate.set()
