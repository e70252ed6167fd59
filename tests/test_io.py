"""The I/O layer: NIfTI <-> Zarr conversion, the store layout, URLs and errors."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap

import dask.array as da
import nibabel as nib
import numpy as np
import pytest

from p2s_dask.errors import InputError
from p2s_dask.io import (
    DwiMeta,
    create_dwi_store,
    fsl_siblings,
    is_complete,
    kind_of,
    mark_complete,
    nifti_to_zarr,
    open_dwi,
    read_bvals,
    read_bvecs,
    write_dwi,
    zarr_to_nifti,
)
from p2s_dask.io.budget import plan
from p2s_dask.io.axis_order import to_c_order, to_f_order
from p2s_dask.io.urls import describe_error, fs_and_path

MiB = 1 << 20


# -- helpers ---------------------------------------------------------------

def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def make_nifti(path, shape, dtype, *, slope=None, inter=None, nifti2=False,
               big_endian=False, extension=False, seed=0):
    """Write a NIfTI with nibabel; return the raw values written."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        raw = rng.normal(100, 30, shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        raw = rng.integers(max(info.min, -3000), min(info.max, 3000), shape,
                           endpoint=True).astype(dtype)
    klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    affine = np.array([[-1.5, 0.1, 0, 90], [0, 1.75, 0.2, -126], [0, 0, 2.5, -72], [0, 0, 0, 1]])
    hdr = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)(
        endianness=">" if big_endian else "<")
    img = klass(raw, affine, hdr)
    img.header.set_data_dtype(dtype)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=2)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 3.2
    if extension:
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"p2s-dask test comment"))
    if slope is not None:
        # nibabel writes raw values unchanged when the data's dtype is the
        # on-disk dtype and the image's scaling is set explicitly
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    if slope is not None:
        check = nib.load(str(path))
        assert np.array_equal(np.asarray(check.dataobj.get_unscaled()), raw)
    return raw


def file_header(path):
    """The header as stored in the file (nibabel's loaded header drops scl_*)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        first = f.read(4)
        f.seek(0)
        sizes = {int.from_bytes(first, "little"), int.from_bytes(first, "big")}
        klass = nib.Nifti1Header if 348 in sizes else nib.Nifti2Header
        return klass.from_fileobj(f)


def assert_same_nifti(a, b):
    ia, ib = nib.load(str(a)), nib.load(str(b))
    ha, hb = file_header(a), file_header(b)
    assert ha.get_data_dtype() == hb.get_data_dtype()
    assert ha.endianness == hb.endianness
    assert ha.get_slope_inter() == hb.get_slope_inter()
    np.testing.assert_array_equal(ha["scl_slope"], hb["scl_slope"])
    np.testing.assert_array_equal(ha["scl_inter"], hb["scl_inter"])
    np.testing.assert_array_equal(ia.affine, ib.affine)
    for key in ("qform_code", "sform_code", "pixdim", "dim", "xyzt_units", "vox_offset"):
        np.testing.assert_array_equal(ha[key], hb[key], err_msg=key)
    assert ha.binaryblock == hb.binaryblock
    assert [e.get_content() for e in ha.extensions] == [e.get_content() for e in hb.extensions]
    ra, rb = np.asarray(ia.dataobj.get_unscaled()), np.asarray(ib.dataobj.get_unscaled())
    assert ra.dtype == rb.dtype
    np.testing.assert_array_equal(ra, rb)


# -- URLs, kinds, gradient files ------------------------------------------

@pytest.mark.parametrize("url,kind", [
    ("dwi.nii", "nifti"), ("a/b/DWI.NII.GZ", "nifti"), ("s3://bucket/x.nii.gz", "nifti"),
    ("out.zarr", "zarr"), ("out.zarr/", "zarr"), ("gs://b/p/out.zarr", "zarr"),
])
def test_kind_of(url, kind):
    assert kind_of(url) == kind


@pytest.mark.parametrize("url", ["dwi.mgz", "dwi.nii.bz2", "dwi", "dwi.h5"])
def test_kind_of_unknown(url):
    with pytest.raises(InputError) as err:
        kind_of(url)
    assert "unknown file type" in one_line(err)


def test_fs_and_path(tmp_path):
    fs, path = fs_and_path(f"file://{tmp_path}/x.nii")
    assert path == f"{tmp_path}/x.nii" and fs.protocol[0] == "file"
    fs, path = fs_and_path("s3://bucket/key.nii", {"anon": True})
    assert path == "bucket/key.nii" and "s3" in fs.protocol
    with pytest.raises(InputError) as err:
        fs_and_path("nosuchproto://bucket/key.nii")
    one_line(err)
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        with pytest.raises(InputError) as err:
            fs_and_path("gs://bucket/key.nii")
        assert "gcsfs" in one_line(err)


def test_describe_error():
    from botocore.exceptions import ClientError, NoCredentialsError

    def client_error(code):
        return ClientError({"Error": {"Code": code, "Message": "x\ny"}}, "GetObject")

    assert describe_error(client_error("NoSuchBucket")) == "the bucket does not exist"
    assert "access denied" in describe_error(client_error("AccessDenied"))
    assert "access key" in describe_error(client_error("InvalidAccessKeyId"))
    wrapped = PermissionError("denied")
    wrapped.__cause__ = client_error("SignatureDoesNotMatch")
    assert "secret key" in describe_error(wrapped)
    assert "credentials" in describe_error(NoCredentialsError())
    assert describe_error(FileNotFoundError("x")) == "no such file or directory"
    assert describe_error(RuntimeError("a bug")) is None


def test_gradient_files(tmp_path):
    (tmp_path / "row.bval").write_text("0 1000 1000.0 2000\n")
    (tmp_path / "col.bval").write_text("0\n1000\n1000\n2000\n")
    np.testing.assert_array_equal(read_bvals(tmp_path / "row.bval"), [0, 1000, 1000, 2000])
    np.testing.assert_array_equal(read_bvals(tmp_path / "col.bval"), [0, 1000, 1000, 2000])
    vecs = np.random.default_rng(0).normal(size=(3, 5))
    np.savetxt(tmp_path / "fsl.bvec", vecs)
    np.savetxt(tmp_path / "rows.bvec", vecs.T)
    np.testing.assert_allclose(read_bvecs(tmp_path / "fsl.bvec"), vecs)
    np.testing.assert_allclose(read_bvecs(tmp_path / "rows.bvec"), vecs)
    (tmp_path / "bad.bval").write_text("0 1000\n5 6\n")
    (tmp_path / "text.bval").write_text("0 1000 abc\n")
    (tmp_path / "bad.bvec").write_text("1 2\n3 4\n")
    for name, reader in (("bad.bval", read_bvals), ("text.bval", read_bvals),
                         ("bad.bvec", read_bvecs), ("missing.bval", read_bvals)):
        with pytest.raises(InputError) as err:
            reader(tmp_path / name)
        assert name in one_line(err)


def test_fsl_siblings(tmp_path):
    assert fsl_siblings(tmp_path / "dwi.nii.gz") == (None, None)
    (tmp_path / "dwi.bvals").write_text("0")
    (tmp_path / "dwi.bvec").write_text("0\n0\n1")
    bval, bvec = fsl_siblings(tmp_path / "dwi.nii.gz")
    assert bval == f"{tmp_path}/dwi.bvals" and bvec == f"{tmp_path}/dwi.bvec"
    (tmp_path / "dwi.bval").write_text("0")
    assert fsl_siblings(str(tmp_path / "dwi.nii"))[0] == f"{tmp_path}/dwi.bval"


# -- building blocks ---------------------------------------------------------

@pytest.mark.parametrize("shape", [(13, 11, 7, 9), (40, 3, 5, 2), (1, 1, 1, 1)])
def test_layout(shape):
    a = np.random.default_rng(1).integers(0, 1000, shape).astype(np.int16)
    c = to_c_order(np.asfortranarray(a))
    f = to_f_order(a, np.dtype(">i2"))
    assert c.flags.c_contiguous and f.flags.f_contiguous and f.dtype == np.dtype(">i2")
    np.testing.assert_array_equal(c, a)
    np.testing.assert_array_equal(f, a)


def test_plan_fits_memory():
    p = plan((96, 96, 60, 160), 2, 256 * MiB)
    assert p.chunk_bytes <= 32 * MiB and 1 < p.volumes_per_slab < 160
    assert p.volumes_per_slab * 96 * 96 * 60 * 2 <= p.slab_bytes
    # a volume larger than the slab budget is streamed a few z-planes at a time
    p = plan((256, 256, 100, 4), 4, 8 * MiB)
    assert p.volumes_per_slab == 1 and p.planes_per_slab % p.chunks[2] == 0
    assert p.planes_per_slab * 256 * 256 * 4 <= p.slab_bytes
    with pytest.raises(InputError) as err:
        plan((64, 64, 40, 100), 4, 8 * MiB, chunks=(64, 64, 40))
    assert "memory_limit" in one_line(err)


def test_meta_json_round_trip():
    meta = DwiMeta.for_array((4, 5, 6, 3), np.uint16, np.diag([2.0, 2, 2, 1]),
                             bvals=[0, 1000, 2000], bvecs=np.eye(3))
    back = DwiMeta.from_json(json.loads(json.dumps(meta.to_json())))
    assert back.header == meta.header and back.extra == meta.extra
    assert back.shape == (4, 5, 6, 3) and back.raw_dtype == np.uint16
    np.testing.assert_array_equal(back.affine, meta.affine)
    np.testing.assert_array_equal(back.bvecs, np.eye(3))
    with pytest.raises(InputError) as err:
        DwiMeta.for_array((4, 5, 6, 3), np.int16, bvals=[0, 1000])
    one_line(err)


# -- round trips -----------------------------------------------------------

ROUND_TRIPS = [
    # (shape, dtype, slope, inter, chunks, memory_limit): one slab; several
    # slabs through a scratch store; volumes bigger than a slab (z-plane runs)
    ((13, 11, 7, 9), "float32", None, None, (5, 4, 3), 4 * MiB),
    ((13, 11, 7, 9), "int16", 703.56, 10.0, (5, 4, 3), 4 * MiB),
    ((13, 11, 7, 9), "uint8", None, None, (4, 11, 6), 4 * MiB),
    ((41, 37, 23, 12), "int16", 703.56, 10.0, (9, 10, 7), 1 * MiB),
    ((67, 61, 29, 3), "float32", None, None, None, 1 * MiB),
]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("shape,dtype,slope,inter,chunks,limit", ROUND_TRIPS)
def test_round_trip(tmp_path, suffix, shape, dtype, slope, inter, chunks, limit):
    src = tmp_path / f"dwi{suffix}"
    raw = make_nifti(src, shape, dtype, slope=slope, inter=inter)
    bvals = np.linspace(0, 3000, shape[3])
    store = tmp_path / "dwi.zarr"
    meta = nifti_to_zarr(src, store, chunks=chunks, memory_limit=limit, bvals=bvals,
                         progress=False)
    assert is_complete(store)
    values, meta2 = open_dwi(store)
    if chunks is not None:
        assert values.chunksize == (*chunks, shape[3])
    else:
        assert values.chunksize[3] == shape[3]
    expected = nib.load(str(src)).get_fdata()
    if slope is not None:
        # scaled values: float64, bit-identical to nibabel's get_fdata()
        assert values.dtype == np.float64
        np.testing.assert_array_equal(values.compute(), expected)
    else:
        assert values.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(values.compute(), raw)
    np.testing.assert_array_equal(meta2.bvals, bvals)
    assert meta2.bvecs is None and meta.header == meta2.header

    back = tmp_path / f"back{suffix}"
    zarr_to_nifti(store, back, memory_limit=limit, progress=False)
    assert_same_nifti(src, back)
    if suffix == ".nii":
        assert back.read_bytes() == src.read_bytes()
    assert sorted(os.listdir(tmp_path)) == sorted(["back" + suffix, "dwi" + suffix, "dwi.zarr"])


@pytest.mark.parametrize("kind", ["nifti2", "big_endian", "extension"])
def test_round_trip_header_variants(tmp_path, kind):
    src = tmp_path / "dwi.nii.gz"
    make_nifti(src, (9, 8, 7, 5), "int16", slope=2.0, inter=-3.0,
               nifti2=kind == "nifti2", big_endian=kind == "big_endian",
               extension=kind == "extension")
    nifti_to_zarr(src, tmp_path / "dwi.zarr", chunks=(4, 4, 4), progress=False)
    values, _ = open_dwi(tmp_path / "dwi.zarr")
    np.testing.assert_array_equal(values.compute(), nib.load(str(src)).get_fdata())
    zarr_to_nifti(tmp_path / "dwi.zarr", tmp_path / "back.nii.gz", progress=False)
    assert_same_nifti(src, tmp_path / "back.nii.gz")


def test_multi_member_gzip_and_padding(tmp_path):
    plain = tmp_path / "dwi.nii"
    raw = make_nifti(plain, (10, 9, 8, 6), "int16")
    data = plain.read_bytes()
    cut = len(data) // 3
    src = tmp_path / "dwi.nii.gz"
    src.write_bytes(gzip.compress(data[:cut]) + gzip.compress(data[cut:]) + b"\0" * 64)
    nifti_to_zarr(src, tmp_path / "dwi.zarr", progress=False)
    values, _ = open_dwi(tmp_path / "dwi.zarr")
    np.testing.assert_array_equal(values.compute(), raw)


def test_gradients_from_siblings(tmp_path):
    make_nifti(tmp_path / "dwi.nii.gz", (6, 5, 4, 4), "int16")
    (tmp_path / "dwi.bval").write_text("0 1000 1000 2000\n")
    vecs = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    np.savetxt(tmp_path / "dwi.bvec", vecs)
    meta = nifti_to_zarr(tmp_path / "dwi.nii.gz", tmp_path / "dwi.zarr", progress=False)
    np.testing.assert_array_equal(meta.bvals, [0, 1000, 1000, 2000])
    _, stored = open_dwi(tmp_path / "dwi.zarr")
    np.testing.assert_array_equal(stored.bvecs, vecs)
    (tmp_path / "dwi.bval").write_text("0 1000 1000\n")
    with pytest.raises(InputError) as err:
        nifti_to_zarr(tmp_path / "dwi.nii.gz", tmp_path / "x.zarr", progress=False)
    assert "bvals has 3 values" in one_line(err)
    assert not (tmp_path / "x.zarr").exists()


def test_write_dwi(tmp_path):
    src = tmp_path / "dwi.nii.gz"
    make_nifti(src, (13, 11, 7, 9), "int16", slope=703.56, inter=10.0)
    nifti_to_zarr(src, tmp_path / "in.zarr", chunks=(5, 4, 3), progress=False)
    values, meta = open_dwi(tmp_path / "in.zarr")
    out = (values / 7).astype(np.float32).rechunk((7, 6, 7, 9))  # not the store's chunks
    write_dwi(out, tmp_path / "out.zarr", meta)
    got, out_meta = open_dwi(tmp_path / "out.zarr")
    assert got.dtype == np.float32 and got.chunksize == (7, 6, 7, 9)
    np.testing.assert_array_equal(got.compute(), out.compute())
    assert (out_meta.slope, out_meta.inter) == (1.0, 0.0)
    zarr_to_nifti(tmp_path / "out.zarr", tmp_path / "out.nii.gz", progress=False)
    img = nib.load(str(tmp_path / "out.nii.gz"))
    assert img.get_data_dtype() == np.float32
    assert file_header(tmp_path / "out.nii.gz").get_slope_inter() == (1.0, 0.0)
    np.testing.assert_array_equal(img.affine, nib.load(str(src)).affine)
    np.testing.assert_array_equal(np.asarray(img.dataobj), out.compute())
    # lazily: nothing is complete until the returned task runs
    task = write_dwi(out.rechunk((5, 4, 3, 9)), tmp_path / "lazy.zarr", meta, compute=False)
    assert not is_complete(tmp_path / "lazy.zarr")
    task.compute()
    assert is_complete(tmp_path / "lazy.zarr")
    with pytest.raises(InputError) as err:
        write_dwi(out, tmp_path / "out.zarr", meta)
    assert "already exists" in one_line(err)
    with pytest.raises(InputError) as err:
        write_dwi(da.zeros((13, 11, 7, 9), dtype=bool), tmp_path / "b.zarr", meta)
    one_line(err)


# -- errors --------------------------------------------------------------------

def test_missing_input(tmp_path):
    with pytest.raises(InputError) as err:
        nifti_to_zarr(tmp_path / "nope.nii.gz", tmp_path / "x.zarr", progress=False)
    assert "no such file" in one_line(err)
    with pytest.raises(InputError) as err:
        open_dwi(tmp_path / "nope.zarr")
    assert "no such file" in one_line(err)


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated_gzip(tmp_path, keep):
    src = tmp_path / "dwi.nii.gz"
    make_nifti(src, (20, 20, 10, 8), "int16")
    data = src.read_bytes()
    src.write_bytes(data[:int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(InputError) as err:
        nifti_to_zarr(src, tmp_path / "x.zarr", memory_limit=MiB, progress=False)
    message = one_line(err)
    assert "truncated" in message or "ends inside" in message
    assert not (tmp_path / "x.zarr").exists()


def test_truncated_nii_and_garbage(tmp_path):
    src = tmp_path / "dwi.nii"
    make_nifti(src, (20, 20, 10, 8), "int16")
    src.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(InputError) as err:
        nifti_to_zarr(src, tmp_path / "x.zarr", progress=False)
    assert "truncated" in one_line(err)
    (tmp_path / "junk.nii.gz").write_bytes(b"\x1f\x8b" + os.urandom(2000))
    (tmp_path / "junk.nii").write_bytes(os.urandom(2000))
    for name in ("junk.nii.gz", "junk.nii"):
        with pytest.raises(InputError) as err:
            nifti_to_zarr(tmp_path / name, tmp_path / "x.zarr", progress=False)
        one_line(err)


def test_unknown_extension(tmp_path):
    with pytest.raises(InputError) as err:
        nifti_to_zarr(tmp_path / "dwi.mgz", tmp_path / "x.zarr", progress=False)
    assert "unknown file type" in one_line(err)
    make_nifti(tmp_path / "dwi.nii", (4, 4, 4, 2), "int16")
    with pytest.raises(InputError) as err:
        nifti_to_zarr(tmp_path / "dwi.nii", tmp_path / "x.nii.gz", progress=False)
    assert "must be a .zarr" in one_line(err)


def test_existing_destination(tmp_path):
    src = tmp_path / "dwi.nii"
    make_nifti(src, (6, 5, 4, 3), "uint8")
    nifti_to_zarr(src, tmp_path / "dwi.zarr", progress=False)
    with pytest.raises(InputError) as err:
        nifti_to_zarr(src, tmp_path / "dwi.zarr", progress=False)
    assert "already exists" in one_line(err)
    with pytest.raises(InputError) as err:
        zarr_to_nifti(tmp_path / "dwi.zarr", src, progress=False)
    assert "already exists" in one_line(err)
    nifti_to_zarr(src, tmp_path / "dwi.zarr", overwrite=True, progress=False)
    src.write_bytes(b"old")
    zarr_to_nifti(tmp_path / "dwi.zarr", src, overwrite=True, progress=False)
    assert nib.load(str(src)).shape == (6, 5, 4, 3)


def test_incomplete_store(tmp_path):
    meta = DwiMeta.for_array((6, 5, 4, 3), np.int16)
    arr = create_dwi_store(tmp_path / "x.zarr", meta.shape, np.int16, (3, 3, 3), meta)
    arr[...] = 7
    assert not is_complete(tmp_path / "x.zarr")
    with pytest.raises(InputError) as err:
        open_dwi(tmp_path / "x.zarr")
    assert "incomplete" in one_line(err)
    with pytest.raises(InputError) as err:
        zarr_to_nifti(tmp_path / "x.zarr", tmp_path / "x.nii", progress=False)
    assert "incomplete" in one_line(err)
    values, _ = open_dwi(tmp_path / "x.zarr", require_complete=False)
    assert int(values.sum().compute()) == 7 * values.size
    with pytest.raises(InputError) as err:
        create_dwi_store(tmp_path / "x.zarr", meta.shape, np.int16, (3, 3, 3), meta)
    assert "already exists" in one_line(err)
    mark_complete(tmp_path / "x.zarr")
    assert is_complete(tmp_path / "x.zarr")
    (tmp_path / "other.zarr").mkdir()
    with pytest.raises(InputError) as err:
        open_dwi(tmp_path / "other.zarr")
    assert "not a p2s-dask DWI store" in one_line(err)


def test_not_4d(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(tmp_path / "a.nii"))
    with pytest.raises(InputError) as err:
        nifti_to_zarr(tmp_path / "a.nii", tmp_path / "a.zarr", progress=False)
    assert "4D" in one_line(err)


# -- memory bound --------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import dask.array, nibabel, numpy, psutil, tqdm, zarr
    from p2s_dask.io import nifti_to_zarr, zarr_to_nifti
    src, store, back, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

    def reset_peak():
        # Linux: lower the high-water mark (VmHWM) to the current RSS, so that
        # transient memory of the imports is not mistaken for ours
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def peak():
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    growth = {}
    for name, convert, args in ((("to_zarr", nifti_to_zarr, (src, store)),
                                 ("to_nifti", zarr_to_nifti, (store, back)))):
        base = psutil.Process().memory_info().rss if reset_peak() else peak()
        convert(*args, memory_limit=limit, progress=False)
        growth[name] = peak() - base
    print(json.dumps(growth))
""")


def test_memory_bound(tmp_path):
    """Peak memory growth stays near the limit for a file five times larger."""
    shape = (64, 64, 40, 120)  # int16: 39 MB of data
    src = tmp_path / "big.nii.gz"
    rng = np.random.default_rng(0)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    base = rng.integers(0, 2000, shape[:3]).astype("<i2")
    with gzip.open(src, "wb", compresslevel=1) as f:
        hdr.write_to(f)
        for v in range(shape[3]):
            f.write(np.roll(base, v, axis=0).tobytes(order="F"))
    limit = 8 * MiB
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(src), str(tmp_path / "big.zarr"),
         str(tmp_path / "back.nii.gz"), str(limit)],
        capture_output=True, text=True, check=True, timeout=300,
    )
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    # holding the data would show as 39 MB or more; the limit plus a fixed
    # slack (thread stacks and per-thread malloc arenas, gzip blocks in
    # flight: about 8 MiB, measured) must be enough
    slack = 12 * MiB
    assert growth["to_zarr"] < limit + slack, growth
    assert growth["to_nifti"] < limit + slack, growth
    with gzip.open(src) as a, gzip.open(tmp_path / "back.nii.gz") as b:
        assert a.read() == b.read()


# -- S3 (moto) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    """A local S3 server and storage options for it."""
    pytest.importorskip("moto")
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                 "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                 **options["client_kwargs"]).create_bucket(Bucket="p2s-test")
    fs = s3fs.S3FileSystem(**options)
    yield fs, options
    server.stop()


def test_s3_round_trip(tmp_path, s3):
    fs, options = s3
    src = tmp_path / "dwi.nii.gz"
    make_nifti(src, (13, 11, 7, 9), "int16", slope=703.56, inter=10.0)
    bvals = np.linspace(0, 2000, 9)
    np.savetxt(tmp_path / "dwi.bval", bvals[None])
    fs.put(str(src), "p2s-test/in/dwi.nii.gz")
    fs.put(str(tmp_path / "dwi.bval"), "p2s-test/in/dwi.bval")

    store = "s3://p2s-test/work/dwi.zarr"
    nifti_to_zarr("s3://p2s-test/in/dwi.nii.gz", store, chunks=(5, 4, 3),
                  memory_limit=MiB, storage_options=options, progress=False)
    values, meta = open_dwi(store, storage_options=options)
    np.testing.assert_array_equal(values.compute(), nib.load(str(src)).get_fdata())
    np.testing.assert_array_equal(meta.bvals, bvals)
    with pytest.raises(InputError) as err:
        nifti_to_zarr("s3://p2s-test/in/dwi.nii.gz", store, storage_options=options,
                      progress=False)
    assert "already exists" in one_line(err)

    zarr_to_nifti(store, tmp_path / "back.nii.gz", storage_options=options, progress=False)
    assert_same_nifti(src, tmp_path / "back.nii.gz")
    zarr_to_nifti(store, "s3://p2s-test/out/back.nii", storage_options=options,
                  progress=False)
    fs.invalidate_cache()
    assert fs.ls("p2s-test/out") == ["p2s-test/out/back.nii"]  # no temporary left
    fs.get("p2s-test/out/back.nii", str(tmp_path / "back.nii"))
    assert_same_nifti(src, tmp_path / "back.nii")


def test_s3_missing(s3):
    _, options = s3
    with pytest.raises(InputError) as err:
        nifti_to_zarr("s3://no-such-bucket/dwi.nii.gz", "s3://no-such-bucket/x.zarr",
                      storage_options=options, progress=False)
    message = one_line(err)
    assert "bucket" in message or "no such file" in message
    with pytest.raises(InputError) as err:
        open_dwi("s3://no-such-bucket/x.zarr", storage_options=options)
    assert "bucket does not exist" in one_line(err)
    with pytest.raises(InputError) as err:
        nifti_to_zarr("s3://p2s-test/nope.nii.gz", "s3://p2s-test/nope.zarr",
                      storage_options=options, progress=False)
    assert "no such file" in one_line(err)


# -- uncompressed .nii read and written in place ------------------------------

@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("chunks", [(10, 9, 1), (10, 9, 3), (10, 4, 1), (5, 9, 2)])
def test_direct_nifti_blocks_match_nibabel(tmp_path, endian, chunks):
    from p2s_dask.io.nifti_direct import open_nifti
    rng = np.random.default_rng(4)
    data = rng.integers(-500, 3000, (10, 9, 7, 6)).astype(endian + "i2")
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_data_dtype(np.dtype(endian + "i2"))
    path = tmp_path / "d.nii"
    nib.save(img, str(path))
    values, meta = open_nifti(str(path), chunks)
    blocks = values.to_delayed().ravel()
    # whole xy-planes come volume-major, as on disk; other blocks too
    first = blocks[0].compute()
    assert first.flags.f_contiguous and first.dtype == np.int16
    np.testing.assert_array_equal(values.compute(scheduler="sync"),
                                  np.asanyarray(nib.load(str(path)).dataobj))


@pytest.mark.parametrize("chunks", [(8, 6, 1), (8, 3, 2), (4, 6, 5)])
def test_background_writer_round_trip(tmp_path, chunks):
    from p2s_dask.io.nifti_direct import create_nifti, finish_writes, submit_block
    rng = np.random.default_rng(5)
    data = rng.integers(-30000, 30000, (8, 6, 5, 4)).astype(np.int16)
    src = tmp_path / "src.nii"
    nib.save(nib.Nifti1Image(data, np.diag([2, 2, 2, 1])), str(src))
    from p2s_dask.io.nifti_direct import read_meta
    meta = read_meta(str(src))
    out = str(tmp_path / "out.nii")
    create_nifti(out, meta)
    done = []
    for x0 in range(0, 8, chunks[0]):
        for y0 in range(0, 6, chunks[1]):
            for z0 in range(0, 5, chunks[2]):
                region = (slice(x0, x0 + chunks[0]), slice(y0, y0 + chunks[1]),
                          slice(z0, z0 + chunks[2]))
                block = np.asfortranarray(data[region])
                submit_block(out, meta, region, block, then=lambda r=region: done.append(r))
    assert finish_writes(out) is True
    assert len(done) == len(range(0, 8, chunks[0])) * len(range(0, 6, chunks[1])) * \
        len(range(0, 5, chunks[2]))
    back = nib.load(out)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
    np.testing.assert_array_equal(back.affine, np.diag([2, 2, 2, 1]))
    assert finish_writes(out) is False  # nothing left to flush


def test_background_writer_reports_errors(tmp_path):
    from p2s_dask.io.nifti_direct import create_nifti, finish_writes, read_meta, submit_block
    data = np.zeros((4, 4, 2, 3), np.int16)
    src = tmp_path / "src.nii"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(src))
    meta = read_meta(str(src))
    out = str(tmp_path / "gone.nii")
    create_nifti(out, meta)
    os.remove(out)  # the file vanished under the run
    marked = []
    submit_block(out, meta, (slice(None), slice(None), slice(0, 1)),
                 np.asfortranarray(data[:, :, :1]), then=lambda: marked.append(1))
    with pytest.raises(OSError):
        finish_writes(out)
    assert marked == []  # a failed block is never marked done


# -- direct (page-cache bypassing) writes ------------------------------------

def _nifti_meta(tmp_path, data):
    from p2s_dask.io.nifti_direct import read_meta
    src = tmp_path / "src.nii"
    nib.save(nib.Nifti1Image(data, np.diag([2, 2, 2, 1])), str(src))
    return read_meta(str(src))


def test_aligned_block_lines_volumes_up_with_the_file(tmp_path):
    from p2s_dask.core.layout import voxel_rows
    from p2s_dask.io.direct_io import ALIGN
    from p2s_dask.io.nifti_direct import _volume_runs, block_buffer
    data = np.zeros((45, 37, 9, 5), np.int16)
    meta = _nifti_meta(tmp_path, data)
    region = (slice(None), slice(None), slice(2, 5))
    buf = block_buffer(meta, region, np.int16)
    assert buf.shape == (45, 37, 3, 5) and not buf.flags.f_contiguous  # padded apart
    for k, (offset, nbytes) in enumerate(_volume_runs(meta, region)):
        assert nbytes == buf[..., k].nbytes and buf[..., k].flags.f_contiguous
        assert (buf[..., k].ctypes.data - offset) % ALIGN == 0
    # the core sees it as a (voxels, volumes) view in file order
    buf[...] = np.arange(buf.size, dtype=np.int16).reshape(buf.shape, order="F")
    rows, order = voxel_rows(buf)
    assert order == "F" and np.shares_memory(rows, buf)
    np.testing.assert_array_equal(rows, buf.reshape(-1, 5, order="F"))
    # no per-volume runs (a partial x range), or another dtype: no special layout
    assert block_buffer(meta, (slice(0, 4), slice(None), slice(0, 1)), np.int16) is None
    assert block_buffer(meta, region, np.float32) is None


@pytest.mark.parametrize("shape,depth", [((64, 64, 6, 5), 2), ((45, 37, 7, 4), 3),
                                         ((16, 8, 4, 3), 1)])
def test_direct_writes_round_trip(tmp_path, monkeypatch, shape, depth):
    from p2s_dask.io.direct_io import RunWriter, open_direct
    from p2s_dask.io.nifti_direct import block_buffer, create_nifti, write_block
    data = np.random.default_rng(7).integers(-30000, 30000, shape).astype(np.int16)
    meta = _nifti_meta(tmp_path, data)
    out = str(tmp_path / "out.nii")
    create_nifti(out, meta)
    writer = RunWriter(out)
    direct_bytes = []
    real_pwrite = os.pwrite

    def counting_pwrite(fd, buf, offset):
        got = real_pwrite(fd, buf, offset)
        if fd == writer.direct_fd:
            direct_bytes.append(got)
        return got

    monkeypatch.setattr(os, "pwrite", counting_pwrite)
    for z0 in range(0, shape[2], depth):
        region = (slice(None), slice(None), slice(z0, min(shape[2], z0 + depth)))
        block = block_buffer(meta, region, np.int16)
        block[...] = data[region]
        write_block(out, meta, region, block, writer)
    writer.close()
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), data)
    probe = open_direct(out)
    if probe is not None:  # this file system takes direct I/O: it was used
        os.close(probe)
        plane_bytes = shape[0] * shape[1] * 2
        if plane_bytes * depth >= 2 * 4096:
            assert sum(direct_bytes) > data.nbytes // 3
        else:
            assert direct_bytes == []  # runs under two pages: all buffered


def test_direct_writes_fall_back_when_refused(tmp_path, monkeypatch):
    import errno as errno_mod

    from p2s_dask.io.direct_io import RunWriter
    from p2s_dask.io.nifti_direct import block_buffer, create_nifti, write_block
    data = np.random.default_rng(8).integers(-300, 300, (64, 64, 4, 3)).astype(np.int16)
    meta = _nifti_meta(tmp_path, data)
    out = str(tmp_path / "out.nii")
    create_nifti(out, meta)
    writer = RunWriter(out)
    if writer.direct_fd is None:
        writer.direct_fd = os.open(out, os.O_WRONLY)  # pretend: refused below
        writer.direct = True
    real_pwrite = os.pwrite

    def refusing_pwrite(fd, buf, offset):
        if fd == writer.direct_fd:
            raise OSError(errno_mod.EINVAL, "Invalid argument")
        return real_pwrite(fd, buf, offset)

    monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    region = (slice(None), slice(None), slice(0, 4))
    block = block_buffer(meta, region, np.int16)
    block[...] = data
    write_block(out, meta, region, block, writer)
    assert writer.direct is False
    writer.close()
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), data)


def test_full_disk_is_reported_before_any_work(tmp_path, monkeypatch):
    import ctypes
    import errno as errno_mod

    from p2s_dask.io import direct_io
    from p2s_dask.io.nifti_direct import create_nifti

    def full(fd, mode, offset, length):
        ctypes.set_errno(errno_mod.ENOSPC)
        return -1

    def unsupported(fd, mode, offset, length):
        ctypes.set_errno(errno_mod.EOPNOTSUPP)
        return -1

    data = np.zeros((8, 8, 4, 3), np.int16)
    meta = _nifti_meta(tmp_path, data)
    monkeypatch.setattr(direct_io, "_libc_fallocate", lambda: full)
    with pytest.raises(InputError, match="not enough free space"):
        create_nifti(str(tmp_path / "full.nii"), meta)
    # a file system that cannot reserve blocks: a sparse file, as before
    monkeypatch.setattr(direct_io, "_libc_fallocate", lambda: unsupported)
    out = tmp_path / "sparse.nii"
    create_nifti(str(out), meta)
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), data)


@pytest.mark.parametrize("scaled", [False, True])
def test_read_with_halo_is_the_zero_padded_image(tmp_path, scaled):
    """A region with its halo, read straight from the file, equals the
    zero-padded image (nibabel's values) cut around it: at the borders, inside,
    with a scaled integer file (zeros beyond the image are zero values, not
    the intercept); volume-major."""
    import nibabel as nib

    from p2s_dask.io.nifti_direct import read_meta, read_with_halo

    rng = np.random.default_rng(4)
    data = rng.integers(0, 3000, (9, 7, 6, 5)).astype(np.int16)
    img = nib.Nifti1Image(data, np.eye(4))
    if scaled:
        img.header.set_slope_inter(0.5, 3.0)
    path = tmp_path / "d.nii"
    nib.save(img, str(path))
    values = np.asanyarray(nib.load(str(path)).dataobj) if scaled else data
    meta = read_meta(str(path))
    radius = (1, 2, 1)
    padded = np.pad(values, [(r, r) for r in radius] + [(0, 0)])
    for region in [(slice(0, 9), slice(0, 7), slice(0, 2)),
                   (slice(0, 9), slice(0, 7), slice(2, 4)),
                   (slice(3, 6), slice(2, 7), slice(4, 6))]:
        got = read_with_halo(str(path), meta, region, radius)
        want = padded[tuple(slice(s.start, s.stop + 2 * r) for s, r in zip(region, radius))]
        assert got.flags.f_contiguous and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
