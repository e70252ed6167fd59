"""Our Zarr stores are NIfTI-Zarr images: the field's readers open them.

Each reader is an independent reference: nifti-zarr (the specification's
reference implementation) turns our store back into a NIfTI, ome-zarr
(napari's reader) finds the image and its scale, xarray decodes the physical
values and the b-values, and plain zarr sees the arrays and their axes.
"""

import json

import nibabel as nib
import numpy as np
import pytest
import zarr

from p2s_dask.fronts.cli import main
from p2s_dask.io import DwiMeta, create_dwi_store, nifti_to_zarr, open_dwi, store_state
from p2s_dask.errors import InputError

niizarr = pytest.importorskip("niizarr", reason="nifti-zarr is a test dependency")
xr = pytest.importorskip("xarray", reason="xarray is a test dependency")

SHAPE = (21, 18, 11, 9)
AFFINE = np.array([[1.8, 0, 0, -20.5], [0, 2.0, 0, -30.0], [0, 0, 2.5, 12.0], [0, 0, 0, 1]])


def scaled_nifti(path, seed=0):
    """A scaled int16 DWI (zeros outside a ball) with bvals, bvecs, an extension."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE[:3]), indexing="ij")
    inside = (x ** 2 + y ** 2 + z ** 2) < 0.8
    raw = (rng.integers(100, 30000, SHAPE) * inside[..., None]).astype(np.int16)
    img = nib.Nifti1Image(raw, AFFINE)
    img.header.set_slope_inter(0.0703, 1.5)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 3.2
    img.header["descrip"] = b"p2s-dask test"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment, 16 b."))
    nib.save(img, str(path))
    bvals = np.r_[0, 1000, 1000, 2000, 0, 1000, 2000, 2000, 1000]
    bvecs = rng.normal(size=(3, SHAPE[3]))
    bvecs /= np.linalg.norm(bvecs, axis=0)
    stem = str(path)[:-len(".nii")]
    np.savetxt(stem + ".bval", bvals[None], fmt="%d")
    np.savetxt(stem + ".bvec", bvecs, fmt="%.6f")
    return nib.load(str(path)), bvals, bvecs


@pytest.fixture
def converted(tmp_path):
    img, bvals, bvecs = scaled_nifti(tmp_path / "dwi.nii")
    assert main(["convert", str(tmp_path / "dwi.nii"), str(tmp_path / "dwi.nii.zarr"),
                 "--chunks", "8,8,8", "--quiet"]) == 0
    return tmp_path / "dwi.nii.zarr", img, bvals, bvecs


def test_nifti_zarr_round_trip(converted, tmp_path):
    """nifti-zarr turns our store back into the original voxels and header,
    exactly as it does a store it made itself from the same file."""
    store, img, _, _ = converted
    back = niizarr.zarr2nii(str(store), str(tmp_path / "back.nii"))
    np.testing.assert_array_equal(back.dataobj.get_unscaled(), img.dataobj.get_unscaled())
    h0, h1 = img.header, back.header
    for field in ("dim", "pixdim", "datatype", "bitpix", "qform_code", "sform_code", "srow_x",
                  "srow_y", "srow_z", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                  "qoffset_y", "qoffset_z", "xyzt_units", "descrip"):
        np.testing.assert_array_equal(h1[field], h0[field], err_msg=field)
    np.testing.assert_array_equal(back.affine, img.affine)
    # nibabel rescales the raw integers nifti-zarr hands it when saving, so
    # scl_slope/scl_inter come out as from nifti-zarr's own round trip
    niizarr.nii2zarr(img, str(tmp_path / "theirs.nii.zarr"), chunk=8)
    own = niizarr.zarr2nii(str(tmp_path / "theirs.nii.zarr"), str(tmp_path / "own.nii"))
    for field in ("scl_slope", "scl_inter"):
        np.testing.assert_array_equal(h1[field], own.header[field], err_msg=field)


def test_denoised_store_opens_in_nifti_zarr(converted, tmp_path):
    """An output store too: its header describes its own (float32) values."""
    store, img, _, _ = converted
    out = tmp_path / "den.nii.zarr"
    assert main(["denoise", str(store), str(out), "--out-dtype", "float32", "--quiet"]) == 0
    ours = open_dwi(out)[0].compute()
    back = niizarr.zarr2nii(str(out))
    assert back.get_data_dtype() == np.float32 and back.shape == SHAPE
    np.testing.assert_array_equal(np.asarray(back.dataobj), ours)
    np.testing.assert_array_equal(back.header.get_best_affine(), img.affine)


def test_ome_zarr_finds_one_image(converted):
    reader = pytest.importorskip("ome_zarr.reader", reason="ome-zarr is a test dependency")
    from ome_zarr.io import parse_url
    store, img, _, _ = converted
    nodes = [n for n in reader.Reader(parse_url(str(store)))()
             if n.load(reader.Multiscales) is not None]
    assert len(nodes) == 1
    node = nodes[0]
    assert [a["name"] for a in node.metadata["axes"]] == ["t", "z", "y", "x"]
    assert len(node.data) == 1 and node.data[0].shape == SHAPE[::-1]
    scale = node.metadata["coordinateTransformations"][0][0]["scale"]
    np.testing.assert_allclose(scale, [3.2, 2.5, 2.0, 1.8])
    np.testing.assert_array_equal(np.asarray(node.data[0]).T, img.dataobj.get_unscaled())


def test_xarray_shows_physical_values_and_bvalues(converted):
    store, img, bvals, bvecs = converted
    ds = xr.open_zarr(str(store))
    dwi = ds["0"]
    assert dwi.dims == ("t", "z", "y", "x")
    # CF scale_factor/add_offset applied: nibabel's get_fdata, zeros included
    np.testing.assert_allclose(dwi.values.T, img.get_fdata(), rtol=1e-12, atol=0)
    np.testing.assert_array_equal(dwi.coords["bvals"].values, bvals)
    # bvecs has a second axis (direction), so it is the dataset's coordinate
    np.testing.assert_allclose(ds.coords["bvecs"].values, bvecs.T, atol=1e-6)
    assert ds["nifti"].dims == ("nifti_byte",)


def test_plain_zarr_sees_named_axes_and_consolidated_metadata(converted):
    store, img, _, _ = converted
    group = zarr.open_consolidated(str(store), zarr_format=3)
    names = {name: arr.metadata.dimension_names for name, arr in group.arrays()}
    assert names == {"0": ("t", "z", "y", "x"), "nifti": ("nifti_byte",), "bvals": ("t",),
                     "bvecs": ("t", "direction")}
    data = group["0"]
    assert data.shape == SHAPE[::-1] and data.dtype == np.int16
    # a shard holds every volume of an 8^3 block, one inner chunk per volume
    assert data.shards == (SHAPE[3], 8, 8, 8) and data.chunks == (1, 8, 8, 8)
    np.testing.assert_array_equal(data[...].T, img.dataobj.get_unscaled())
    header = nib.Nifti1Header.from_fileobj(
        __import__("io").BytesIO(group["nifti"][...].tobytes()), check=False)
    assert header.get_slope_inter() == pytest.approx((0.0703, 1.5))
    assert header.extensions[0].get_content() == b"a comment, 16 b."


def test_unfinished_store_is_no_image(tmp_path):
    """While a store is written, no reader takes it for an image (of zeros)."""
    meta = DwiMeta.for_array(SHAPE, np.int16)
    url = tmp_path / "half.zarr"
    create_dwi_store(url, SHAPE, np.int16, (8, 8, 8), meta)
    assert store_state(url) == "incomplete"
    with pytest.raises(Exception):
        zarr.open_group(str(url), mode="r")
    with pytest.raises(Exception):
        xr.open_zarr(str(url))
    with pytest.raises(Exception):
        niizarr.zarr2nii(str(url))
    with pytest.raises(InputError, match="incomplete"):
        open_dwi(url)


def test_store_written_by_nifti_zarr_is_denoised(tmp_path):
    """A NIfTI-Zarr made by nifti-zarr (one chunk per volume, its own
    metadata): denoised to the same numbers as the NIfTI it came from."""
    img, bvals, _ = scaled_nifti(tmp_path / "dwi.nii", seed=2)
    store = tmp_path / "theirs.nii.zarr"
    niizarr.nii2zarr(img, str(store), chunk=8)
    assert main(["denoise", str(tmp_path / "dwi.nii"), str(tmp_path / "a.nii"),
                 "--out-dtype", "float64", "--quiet"]) == 0
    assert main(["denoise", str(store), str(tmp_path / "b.nii"), "--bvals",
                 str(tmp_path / "dwi.bval"), "--out-dtype", "float64", "--quiet"]) == 0
    a = nib.load(str(tmp_path / "a.nii"))
    b = nib.load(str(tmp_path / "b.nii"))
    np.testing.assert_array_equal(b.affine, a.affine)
    np.testing.assert_allclose(b.get_fdata(), a.get_fdata(), rtol=1e-9,
                               atol=1e-9 * np.abs(a.get_fdata()).max())
    # and its values are read with the header's scaling, as nibabel reads them
    values, meta = open_dwi(store)
    np.testing.assert_array_equal(values.compute(), img.get_fdata())


def test_format_1_store_still_read(tmp_path):
    """A store of our first layout (array ``dwi``, axes x, y, z, n) is read
    and denoised as before (for one release)."""
    img, bvals, bvecs = scaled_nifti(tmp_path / "dwi.nii", seed=3)
    with open(tmp_path / "dwi.nii", "rb") as f:  # the header as stored, with its scaling
        meta = DwiMeta.from_header(nib.Nifti1Header.from_fileobj(f), bvals=bvals, bvecs=bvecs)
    assert meta.scaled
    raw = img.dataobj.get_unscaled()
    url = tmp_path / "old.zarr"
    group = zarr.create_group(str(url), zarr_format=3, attributes={"p2s_dask": {
        "format": "p2s-dask-dwi", "version": 1, **meta.to_json(), "complete": True}})
    group.create_array("dwi", shape=SHAPE, dtype=np.int16, chunks=(8, 8, 8, SHAPE[3]),
                       dimension_names=("x", "y", "z", "volume"))[...] = raw
    assert store_state(url) == "complete"
    values, got = open_dwi(url)
    np.testing.assert_array_equal(values.compute(), img.get_fdata())
    np.testing.assert_array_equal(got.bvals, bvals)
    assert main(["denoise", str(url), str(tmp_path / "old.nii"), "--quiet"]) == 0
    assert main(["denoise", str(tmp_path / "dwi.nii"), str(tmp_path / "new.nii"),
                 "--quiet"]) == 0
    np.testing.assert_array_equal(nib.load(str(tmp_path / "old.nii")).dataobj.get_unscaled(),
                                  nib.load(str(tmp_path / "new.nii")).dataobj.get_unscaled())


def test_pending_state_is_json(tmp_path):
    meta = DwiMeta.for_array(SHAPE, np.int16)
    create_dwi_store(tmp_path / "half.zarr", SHAPE, np.int16, (8, 8, 8), meta)
    state = json.loads((tmp_path / "half.zarr" / "p2s_dask_pending.json").read_text())
    assert state["p2s_dask"]["complete"] is False and state["p2s_dask"]["version"] == 2


@pytest.mark.parametrize("limit", ["1 MiB", "64 MiB"])
def test_nifti_written_from_volume_runs_of_shards(tmp_path, limit):
    """Back to NIfTI, each slab reads its volumes' bytes of every shard
    (edge shards on every axis, one slab or many): the original, bit for bit."""
    from p2s_dask.io import zarr_to_nifti
    from p2s_dask.io.chunk_io import reads_volumes
    from p2s_dask.io.zarr_store import open_dwi_array
    img, _, _ = scaled_nifti(tmp_path / "dwi.nii", seed=4)
    nifti_to_zarr(tmp_path / "dwi.nii", tmp_path / "s.zarr", chunks=(8, 7, 3), progress=False)
    assert reads_volumes(open_dwi_array(tmp_path / "s.zarr")[0])
    zarr_to_nifti(tmp_path / "s.zarr", tmp_path / "back.nii.gz", memory_limit=limit,
                  progress=False)
    back = nib.load(str(tmp_path / "back.nii.gz"))
    np.testing.assert_array_equal(back.dataobj.get_unscaled(), img.dataobj.get_unscaled())
    assert back.header.binaryblock == nib.load(str(tmp_path / "dwi.nii")).header.binaryblock


def test_damaged_shard_index_is_one_line(tmp_path):
    from p2s_dask.io import zarr_to_nifti
    scaled_nifti(tmp_path / "dwi.nii", seed=5)
    nifti_to_zarr(tmp_path / "dwi.nii", tmp_path / "s.zarr", chunks=(8, 8, 4), progress=False)
    shard = tmp_path / "s.zarr" / "0" / "c" / "0" / "1" / "1" / "1"
    data = bytearray(shard.read_bytes())
    data[-6] ^= 0x55  # the index no longer matches its checksum
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged") as err:
        zarr_to_nifti(tmp_path / "s.zarr", tmp_path / "back.nii", progress=False)
    assert "\n" not in str(err.value) and "0/c/0/1/1/1" in str(err.value)
    assert not (tmp_path / "back.nii").exists()
