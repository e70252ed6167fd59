"""gzip for .nii.gz: ISA-L (isal) and the zlib fallback, read and write.

Each backend must round-trip voxel data and headers exactly, write a stream
the other backend, Python's gzip module and nibabel read, report truncated and
corrupt streams in one line, and the fallback must really be taken when isal
cannot be imported.
"""

from __future__ import annotations

import errno
import gzip
import os
import sys
import zlib

import nibabel as nib
import numpy as np
import pytest

from p2s_dask.errors import DataError, InputError
from p2s_dask.io import nifti_stream
from p2s_dask.io import nifti_to_zarr, open_dwi, zarr_to_nifti
from p2s_dask.io.nifti_stream import GZIP_ENV, NiftiReader, NiftiWriter, resolve_gzip_backend

pytest.importorskip("isal")  # the package is a dependency; both backends are tested

BACKENDS = ["isal", "zlib"]
ISAL_MODULES = ("isal", "isal.igzip", "isal.igzip_threaded", "isal.isal_zlib",
                "isal.igzip_lib")


@pytest.fixture(autouse=True)
def _no_backend_from_env(monkeypatch):
    monkeypatch.delenv(GZIP_ENV, raising=False)


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def make_nifti(path, shape=(21, 19, 7, 9), dtype="int16", seed=0):
    """A NIfTI (nibabel writes it) with scaling, both transforms and an
    extension; returns the raw values."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        raw = rng.normal(500, 80, shape).astype(dtype)
    else:
        raw = rng.integers(-3000, 3000, shape, endpoint=True).astype(dtype)
    affine = np.array([[-1.5, 0.1, 0, 90], [0, 1.75, 0.2, -126], [0, 0, 2.5, -72],
                       [0, 0, 0, 1]])
    img = nib.Nifti1Image(raw, affine)
    img.header.set_data_dtype(dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"p2s-dask gzip test"))
    if np.dtype(dtype).kind != "f":
        img.header.set_slope_inter(2.5, -7.0)
    nib.save(img, str(path))
    return raw


def read_all(path, backend, pieces=3):
    """Header, meta and all voxel bytes through NiftiReader, in ``pieces``
    slabs of volumes (the last one shorter)."""
    with NiftiReader(path, gzip_backend=backend) as reader:
        assert reader.gzip_backend == (backend if str(path).endswith(".gz") else None)
        meta = reader.meta
        x, y, z, n = meta.shape
        step = -(-n // pieces)
        slabs = [reader.read_slab((x, y, z, min(step, n - v))) for v in range(0, n, step)]
    return meta, np.concatenate(slabs, axis=3)


def write_all(path, meta, data, backend, **kwargs):
    """``data`` (Fortran-ordered raw values) through NiftiWriter, one volume
    per write plus some tiny writes, so writes straddle the writer's blocks."""
    with NiftiWriter(path, meta, gzip_backend=backend, **kwargs) as writer:
        flat = memoryview(np.asfortranarray(data).reshape(-1, order="F")).cast("B")
        cuts = [0, 1, 7, 100]
        per_volume = len(flat) // data.shape[3]
        cuts += list(range(per_volume, len(flat), per_volume)) + [len(flat)]
        cuts = sorted(set(cuts))
        for a, b in zip(cuts, cuts[1:]):
            writer.write(flat[a:b])
        backend_used = writer.gzip_backend
        writer.commit()
    return backend_used


def gz_payload(path) -> bytes:
    with gzip.open(path, "rb") as f:
        return f.read()


# -- round trips and compatibility --------------------------------------------------

@pytest.mark.parametrize("dtype", ["int16", "float32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip(tmp_path, backend, dtype):
    src = tmp_path / "in.nii.gz"
    raw = make_nifti(src, dtype=dtype)
    meta, data = read_all(src, backend)
    np.testing.assert_array_equal(data, raw)
    out = tmp_path / "out.nii.gz"
    assert write_all(out, meta, data, backend) == backend
    # the whole decompressed file, header, extension and voxels, byte for byte
    assert gz_payload(out) == gz_payload(src)
    a, b = nib.load(str(src)), nib.load(str(out))
    assert a.header.binaryblock == b.header.binaryblock
    assert a.header.get_slope_inter() == b.header.get_slope_inter()
    got = np.asarray(b.dataobj.get_unscaled())
    assert got.dtype == raw.dtype and got.tobytes() == raw.tobytes()
    assert [e.get_content() for e in b.header.extensions] == [b"p2s-dask gzip test"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz", "out.nii.gz"]


@pytest.mark.parametrize("writer", BACKENDS)
def test_each_backend_reads_the_others_stream(tmp_path, writer):
    src = tmp_path / "in.nii"
    raw = make_nifti(src, shape=(40, 37, 11, 13), dtype="float32")  # ~850 KB: several blocks
    meta, data = read_all(src, None)
    out = tmp_path / f"by_{writer}.nii.gz"
    assert write_all(out, meta, data, writer) == writer
    expected = src.read_bytes()
    assert gz_payload(out) == expected  # Python's gzip module
    with open(out, "rb") as f:
        assert zlib.decompress(f.read(), 16 + zlib.MAX_WBITS) == expected
    np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), raw)  # nibabel
    for reader in BACKENDS:
        _, back = read_all(out, reader)
        assert back.tobytes(order="F") == raw.tobytes(order="F")


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_member_and_padding(tmp_path, backend):
    src = tmp_path / "in.nii"
    raw = make_nifti(src)
    data = src.read_bytes()
    cut = len(data) // 3
    gz = tmp_path / "multi.nii.gz"
    gz.write_bytes(gzip.compress(data[:7]) + gzip.compress(data[7:cut])
                   + gzip.compress(data[cut:]) + b"\0" * 100)
    _, back = read_all(gz, backend)
    np.testing.assert_array_equal(back, raw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_converters_use_the_backend_from_the_environment(tmp_path, monkeypatch, backend):
    monkeypatch.setenv(GZIP_ENV, backend)
    used = []
    real = nifti_stream.resolve_gzip_backend

    def spy(requested=None):
        used.append(real(requested))
        return used[-1]

    monkeypatch.setattr(nifti_stream, "resolve_gzip_backend", spy)
    src = tmp_path / "in.nii.gz"
    raw = make_nifti(src)
    nifti_to_zarr(src, tmp_path / "a.zarr", progress=False)
    values, _ = open_dwi(tmp_path / "a.zarr")
    np.testing.assert_array_equal(values.compute(), raw * 2.5 - 7.0)
    zarr_to_nifti(tmp_path / "a.zarr", tmp_path / "back.nii.gz", progress=False)
    assert gz_payload(tmp_path / "back.nii.gz") == gz_payload(src)
    assert used == [backend, backend]


def test_compression_levels(tmp_path):
    src = tmp_path / "in.nii"
    make_nifti(src, shape=(32, 32, 8, 6))
    meta, data = read_all(src, None)
    sizes = {}
    for level in (0, 1, 6, 9):
        out = tmp_path / f"l{level}.nii.gz"
        # ISA-L has no "stored" level: level 0 is written by zlib
        assert write_all(out, meta, data, "isal", compresslevel=level) == (
            "zlib" if level == 0 else "isal")
        assert gz_payload(out) == src.read_bytes()
        sizes[level] = out.stat().st_size
    # stored (level 0) is a little larger than the file; the rest compress
    assert sizes[0] > src.stat().st_size > max(sizes[1], sizes[6], sizes[9])
    for bad in (-1, 10, 1.5, "1"):
        with pytest.raises(InputError) as err:
            NiftiWriter(tmp_path / "bad.nii.gz", meta, compresslevel=bad)
        assert "compresslevel" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_object_store_file_objects(backend):
    """Non-local URLs go through fsspec file objects (here: memory://)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"/p2s-gzip-{backend}"
    src = f"memory://{root}/in.nii.gz"
    raw = np.arange(13 * 11 * 5 * 4, dtype=np.int16).reshape(13, 11, 5, 4, order="F")
    img = nib.Nifti1Image(raw, np.eye(4))
    fs.pipe(f"{root}/in.nii.gz", gzip.compress(img.to_bytes()))
    try:
        meta, data = read_all(src, backend)
        np.testing.assert_array_equal(data, raw)
        assert write_all(f"memory://{root}/out.nii.gz", meta, data, backend) == backend
        assert gzip.decompress(fs.cat(f"{root}/out.nii.gz")) == img.to_bytes()
        with NiftiWriter(f"memory://{root}/gone.nii.gz", meta, gzip_backend=backend) as w:
            w.write(np.asfortranarray(data).tobytes(order="F"))  # no commit: discarded
        assert sorted(fs.ls(root, detail=False)) == [f"{root}/in.nii.gz", f"{root}/out.nii.gz"]
    finally:
        fs.rm(root, recursive=True)


# -- errors ----------------------------------------------------------------------------

def _stream(tmp_path):
    src = tmp_path / "ok.nii"
    make_nifti(src, shape=(30, 30, 10, 8))
    return gzip.compress(src.read_bytes(), 1)


def _read_expecting_error(path, backend) -> str:
    with pytest.raises(DataError) as err:
        read_all(path, backend)
    return one_line(err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("keep", [5, 40, 0.5, -4, -1])
def test_truncated_stream(tmp_path, backend, keep):
    gz = _stream(tmp_path)
    cut = gz[:keep] if isinstance(keep, int) else gz[:int(len(gz) * keep)]
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(cut)
    message = _read_expecting_error(path, backend)
    assert str(path) in message
    assert "truncated" in message or "ends inside" in message, message


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("damage", ["crc", "size", "data", "method", "junk", "trailing"])
def test_corrupt_stream(tmp_path, backend, damage):
    gz = bytearray(_stream(tmp_path))
    if damage == "crc":
        gz[-8] ^= 0x01
    elif damage == "size":
        gz[-1] ^= 0x01
    elif damage == "data":
        gz[len(gz) // 2] ^= 0xFF
    elif damage == "method":
        gz[2] = 7  # not deflate
    elif damage == "junk":
        gz = bytearray(b"\x1f\x8b" + np.random.default_rng(1).bytes(2000))
    else:
        gz += b"this is not gzip, and long enough to be taken for a header"
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(bytes(gz))
    message = _read_expecting_error(path, backend)
    assert str(path) in message and "corrupt" in message, message


# -- writing: failures and abort ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_abort_leaves_nothing(tmp_path, backend):
    src = tmp_path / "in.nii"
    make_nifti(src, shape=(40, 40, 20, 10))
    meta, data = read_all(src, None)
    out = tmp_path / "out" / "den.nii.gz"
    out.parent.mkdir()
    with pytest.raises(RuntimeError, match="stop"):
        with NiftiWriter(out, meta, gzip_backend=backend) as writer:
            writer.write(np.asfortranarray(data).tobytes(order="F"))
            raise RuntimeError("stop")
    assert list(out.parent.iterdir()) == []
    writer.abort()  # again: harmless


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_error_is_one_line_and_discarded(tmp_path, monkeypatch, backend):
    """A full disk met by the writing thread reaches the caller in one line."""
    real_open = open

    class Full:
        def __init__(self, f):
            self._f, self._left = f, 100_000

        def write(self, data):
            n = memoryview(data).nbytes
            if n > self._left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._left -= n
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

    def small_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if "w" in mode else f

    monkeypatch.setattr(nifti_stream, "open", small_open, raising=False)
    src = tmp_path / "in.nii"
    make_nifti(src, shape=(64, 64, 20, 10), dtype="float32")
    meta, data = read_all(src, None)
    out = tmp_path / "out" / "den.nii.gz"
    out.parent.mkdir()
    flat = np.asfortranarray(data).tobytes(order="F")
    with pytest.raises(InputError) as err:
        with NiftiWriter(out, meta, gzip_backend=backend) as writer:
            for start in range(0, len(flat), 1 << 18):
                writer.write(flat[start:start + (1 << 18)])
            writer.commit()
    assert "No space left on device" in one_line(err)
    assert str(out) in str(err.value)
    assert list(out.parent.iterdir()) == []


# -- choosing the backend ------------------------------------------------------------

def test_backend_choice(monkeypatch):
    assert resolve_gzip_backend() == "isal"
    assert resolve_gzip_backend("zlib") == "zlib"
    monkeypatch.setenv(GZIP_ENV, "zlib")
    assert resolve_gzip_backend() == "zlib"
    assert resolve_gzip_backend("isal") == "isal"  # an argument beats the environment
    monkeypatch.setenv(GZIP_ENV, "ISAL ")
    assert resolve_gzip_backend() == "isal"
    monkeypatch.setenv(GZIP_ENV, "pigz")
    with pytest.raises(InputError) as err:
        resolve_gzip_backend()
    assert GZIP_ENV in one_line(err)


def test_fallback_when_isal_cannot_be_imported(tmp_path, monkeypatch):
    for name in ISAL_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # "import isal..." now fails
    with pytest.raises(ImportError):
        import isal.igzip_threaded  # noqa: F401
    assert resolve_gzip_backend() == "zlib"
    assert resolve_gzip_backend("auto") == "zlib"
    with pytest.raises(InputError) as err:
        resolve_gzip_backend("isal")
    assert "not installed" in one_line(err)

    src = tmp_path / "in.nii.gz"
    raw = make_nifti(src)
    with NiftiReader(src) as reader:
        assert reader.gzip_backend == "zlib"
        assert isinstance(reader._stream, nifti_stream._Gunzip)
        meta = reader.meta
        data = reader.read_slab(meta.shape)
    np.testing.assert_array_equal(data, raw)
    with NiftiWriter(tmp_path / "out.nii.gz", meta) as writer:
        assert writer.gzip_backend == "zlib"
        assert isinstance(writer._gzip, nifti_stream._ZlibGzip)
        writer.write(data.T)
        writer.commit()
    assert gz_payload(tmp_path / "out.nii.gz") == gz_payload(src)
    # the converters too
    nifti_to_zarr(src, tmp_path / "a.zarr", progress=False)
    zarr_to_nifti(tmp_path / "a.zarr", tmp_path / "back.nii.gz", progress=False)
    assert gz_payload(tmp_path / "back.nii.gz") == gz_payload(src)


def test_isal_is_used_when_importable(tmp_path):
    src = tmp_path / "in.nii.gz"
    make_nifti(src)
    from isal import igzip

    with NiftiReader(src) as reader:
        assert reader.gzip_backend == "isal"
        assert isinstance(reader._stream, igzip.IGzipFile)
        meta = reader.meta
    with NiftiWriter(tmp_path / "out.nii.gz", meta) as writer:
        assert writer.gzip_backend == "isal"
        assert isinstance(writer._gzip, nifti_stream._IsalGzip)
