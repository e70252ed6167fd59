"""Every NIfTI-Zarr and OME-Zarr store the field writes is denoised and
converted as the NIfTI it was made from.

The stores come from the writers themselves: nifti-zarr 1.0.0rc9 (OME-Zarr
0.6, its default, and 0.5; it needs Python 3.12, so its stores are committed
under ``tests/data/stores``, with the script that made them and their source
NIfTI files), nifti-zarr rc8 (Zarr v2 with OME 0.4, and v3 with 0.5) and
ome-zarr's writer (0.4 and 0.5, axes t, z, y, x and t, c, z, y, x), which
install here and write their stores at test time, and one OME 0.6 image
written as the specification describes it, without a NIfTI header.

The reference for each store is the NIfTI it was made from: ``denoise`` on
the store must give what ``denoise`` gives on that NIfTI (same values, same
affine), and ``convert`` must give back its values and affine.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from p2s_dask.fronts.cli import main

niizarr = pytest.importorskip("niizarr", reason="nifti-zarr is a test dependency")

DATA = Path(__file__).parent / "data" / "stores"
BVAL = DATA / "source.bval"
# made by tests/data/stores/make_stores.py with nifti-zarr 1.0.0rc9
COMMITTED = {
    "rc9_ome06.nii.zarr": "source.nii.gz",
    "rc9_ome05.nii.zarr": "source.nii.gz",
    "rc9_ome06_sharded_be.nii.zarr": "source_be.nii.gz",
}
# axis-aligned: all that OME scale and translation can say
PLAIN_AFFINE = np.array([[1.9, 0, 0, 10.0], [0, 2.0, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])


def _cli(*args) -> None:
    assert main([*map(str, args), "--quiet"]) == 0


def _denoised(src, out, *extra):
    _cli("denoise", src, out, "--out-dtype", "float64", *extra)
    return nib.load(str(out))


# -- the stores, and the NIfTI each was made from ----------------------------------

def _plain_source(tmp: Path) -> Path:
    """The committed source's raw int16 values, unscaled, with an
    axis-aligned affine: what a store without a NIfTI header can hold."""
    raw = np.asarray(nib.load(str(DATA / "source.nii.gz")).dataobj.get_unscaled())
    path = tmp / "plain.nii.gz"
    img = nib.Nifti1Image(raw.astype(np.int16), PLAIN_AFFINE)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))
    shutil.copy(BVAL, tmp / "plain.bval")
    return path


def _ome_transforms(ndim: int) -> list:
    """Level 0's OME scale and translation of :data:`PLAIN_AFFINE` (leading
    time and channel axes unscaled)."""
    lead = [1.0] * (ndim - 3)
    return [{"type": "scale", "scale": lead + [2.5, 2.0, 1.9]},
            {"type": "translation", "translation": [0.0] * (ndim - 3) + [5.0, -20.0, 10.0]}]


def _ome_zarr_store(tmp: Path, version: str, axes: str, chunks: tuple) -> Path:
    """An image written by ome-zarr's writer (its own layout: array ``s0``)."""
    with warnings.catch_warnings():
        # ome-zarr's import announces its deprecations
        warnings.simplefilter("ignore", DeprecationWarning)
        from ome_zarr.format import FormatV04, FormatV05
        from ome_zarr.writer import write_multiscale
    values = np.asarray(nib.load(str(_plain_source(tmp))).dataobj).T  # t, z, y, x
    if axes == "tczyx":
        values = values[:, None]
    fmt, zarr_format = (FormatV04(), 2) if version == "0.4" else (FormatV05(), 3)
    path = tmp / f"ome_zarr_{version}_{axes}.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_multiscale([values], group, fmt=fmt, axes=axes,
                         coordinate_transformations=[_ome_transforms(values.ndim)],
                         storage_options={"chunks": chunks})
    return path


def _spec_06_store(tmp: Path) -> Path:
    """An OME-Zarr 0.6 image as the specification describes it (RFC-5), no
    NIfTI header: the default coordinate system last, level 0's transform a
    sequence of scale and translation in micrometres, and a transform of the
    multiscale to another system (which the image's affine does not include).
    Chunks of 3 volumes and 2 x 5 x 6 voxels."""
    values = np.asarray(nib.load(str(_plain_source(tmp))).dataobj).T
    um = [{"name": "t", "type": "time", "unit": "second"}] + [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    level = {"type": "sequence", "input": {"path": "0"}, "output": {"name": "physical"},
             "transformations": [
                 {"type": "scale", "scale": [1.0, 2500.0, 2000.0, 1900.0]},
                 {"type": "translation", "translation": [0.0, 5000.0, -20000.0, 10000.0]}]}
    image = {"name": "dwi", "coordinateSystems": [{"name": "atlas", "axes": um},
                                                  {"name": "physical", "axes": um}],
             "datasets": [{"path": "0", "coordinateTransformations": [level]}],
             "coordinateTransformations": [
                 {"type": "scale", "scale": [1.0, 3.0, 3.0, 3.0],
                  "input": {"name": "physical"}, "output": {"name": "atlas"}}]}
    path = tmp / "spec_06.zarr"
    group = zarr.create_group(str(path), zarr_format=3,
                              attributes={"ome": {"version": "0.6", "multiscales": [image]}})
    array = group.create_array("0", shape=values.shape, dtype=values.dtype,
                               chunks=(3, 2, 5, 6), dimension_names=("t", "z", "y", "x"))
    array[...] = values
    return path


def _rc8_store(tmp: Path, zarr_version: int, chunk: int) -> Path:
    """A NIfTI-Zarr written by nifti-zarr rc8 (OME 0.4 on Zarr v2, 0.5 on v3)."""
    path = tmp / f"rc8_v{zarr_version}.nii.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        niizarr.nii2zarr(nib.load(str(DATA / "source.nii.gz")), str(path),
                         zarr_version=zarr_version, chunk=chunk)
    return path


def _written(tmp: Path, name: str) -> tuple[Path, Path]:
    """``(store, the NIfTI it was made from)`` of one store of the suite."""
    if name in COMMITTED:
        return DATA / name, DATA / COMMITTED[name]
    if name.startswith("rc8"):
        version, chunk = {"rc8_v2": (2, 4), "rc8_v3": (3, 3)}[name]
        return _rc8_store(tmp, version, chunk), DATA / "source.nii.gz"
    if name == "spec_06":
        return _spec_06_store(tmp), tmp / "plain.nii.gz"
    _, version, axes = name.split("_")
    # one chunk per volume; or chunks across volumes and space
    chunks = {"tzyx": (1, 4, 5, 6), "tczyx": (4, 1, 2, 3, 6)}[axes]
    return _ome_zarr_store(tmp, version, axes, chunks), tmp / "plain.nii.gz"


STORES = [*COMMITTED, "rc8_v2", "rc8_v3", "ome-zarr_0.4_tzyx", "ome-zarr_0.4_tczyx",
          "ome-zarr_0.5_tzyx", "ome-zarr_0.5_tczyx", "spec_06"]


def test_fixtures_are_what_they_say(tmp_path):
    """The committed stores hold what make_stores.py says (the writer, the
    OME version), and their sources are the script's values."""
    for name, version in (("rc9_ome06.nii.zarr", "0.6"), ("rc9_ome05.nii.zarr", "0.5"),
                          ("rc9_ome06_sharded_be.nii.zarr", "0.6")):
        attrs = json.loads((DATA / name / "zarr.json").read_text())["attributes"]
        assert attrs["ome"]["version"] == version
        assert ("coordinateSystems" in attrs["ome"]["multiscales"][0]) == (version == "0.6")
    a, b = (nib.load(str(DATA / n)) for n in ("source.nii.gz", "source_be.nii.gz"))
    assert a.header.endianness == "<" and b.header.endianness == ">"
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
    assert a.get_fdata().shape == (6, 5, 4, 10)


@pytest.mark.parametrize("name", STORES)
def test_store_converts_to_its_source(name, tmp_path):
    store, source = _written(tmp_path, name)
    _cli("convert", store, tmp_path / "back.nii.gz")
    back, src = nib.load(str(tmp_path / "back.nii.gz")), nib.load(str(source))
    np.testing.assert_array_equal(back.get_fdata(), src.get_fdata())
    np.testing.assert_array_equal(back.affine, src.affine)
    if name in COMMITTED or name.startswith("rc8"):
        # the stored header, as it was: the raw type and scaling with it
        assert back.get_data_dtype().newbyteorder("=") == src.get_data_dtype().newbyteorder("=")
        assert back.dataobj.slope == src.dataobj.slope
        assert back.dataobj.inter == src.dataobj.inter
        np.testing.assert_array_equal(back.header.get_qform(), src.header.get_qform())


@pytest.mark.parametrize("name", STORES)
def test_store_denoises_as_its_source(name, tmp_path):
    store, source = _written(tmp_path, name)
    ref = _denoised(source, tmp_path / "ref.nii.gz", "--bvals", BVAL)
    got = _denoised(store, tmp_path / "got.nii.gz", "--bvals", BVAL)
    np.testing.assert_array_equal(got.affine, ref.affine)
    expect = ref.get_fdata()
    np.testing.assert_allclose(got.get_fdata(), expect, rtol=1e-12,
                               atol=1e-12 * np.abs(expect).max())


@pytest.mark.parametrize("name,limit,scratch", [
    # one chunk per volume of the whole image: more than the plan's blocks of
    # all volumes may hold, so written on the chunk policy's blocks
    ("rc9_ome06.nii.zarr", 3000, False),
    # shards of all volumes read by slabs of 3 volumes: through the scratch file
    ("rc9_ome06_sharded_be.nii.zarr", 4000, True),
    ("rc9_ome05.nii.zarr", 4000, False),
])
def test_small_budget_converts_by_slabs(name, limit, scratch, tmp_path, monkeypatch):
    """With a budget of a few kB (the floor lifted) the values come in slabs
    of a few volumes, straight from the store or through the scratch file."""
    import p2s_dask.io.nifti_zarr as nz
    monkeypatch.setattr(nz, "parse_memory_limit", lambda limit: limit)
    used = []
    through = nz._store_into_scratch
    monkeypatch.setattr(nz, "_store_into_scratch", lambda *a: used.append(1) or through(*a))
    nz.zarr_to_nifti(DATA / name, tmp_path / "back.nii", memory_limit=limit, progress=False)
    back, src = nib.load(str(tmp_path / "back.nii")), nib.load(str(DATA / COMMITTED[name]))
    np.testing.assert_array_equal(back.get_fdata(), src.get_fdata())
    np.testing.assert_array_equal(back.affine, src.affine)
    assert bool(used) == scratch


def test_missing_chunk_is_the_fill_value_with_one_warning(tmp_path, caplog):
    """Another tool's store: a chunk it lacks is its fill value (0, so the
    header's intercept once scaled), as the Zarr specification says."""
    store = tmp_path / "holed.nii.zarr"
    shutil.copytree(DATA / "rc9_ome06.nii.zarr", store)
    (store / "0" / "c" / "3" / "0" / "0" / "0").unlink()  # all of volume 3
    with caplog.at_level("WARNING", logger="p2s_dask"):
        _cli("convert", store, tmp_path / "back.nii")
    said = [r.getMessage() for r in caplog.records if "missing" in r.getMessage()]
    assert len(said) == 1 and "1 of its 10 chunks are missing" in said[0], said
    expect = nib.load(str(DATA / "source.nii.gz")).get_fdata()
    expect[..., 3] = nib.load(str(DATA / "source.nii.gz")).dataobj.inter
    np.testing.assert_array_equal(nib.load(str(tmp_path / "back.nii")).get_fdata(), expect)


def test_nifti_extensions_come_back(tmp_path):
    """A NIfTI-Zarr's header keeps the file's extensions; convert writes them."""
    img = nib.load(str(DATA / "source.nii.gz"))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"kept by the store"))
    nib.save(img, str(tmp_path / "ext.nii"))
    source = nib.load(str(tmp_path / "ext.nii"))
    niizarr.nii2zarr(source, str(tmp_path / "ext.nii.zarr"))
    _cli("convert", tmp_path / "ext.nii.zarr", tmp_path / "back.nii")
    back = nib.load(str(tmp_path / "back.nii"))
    assert [e.get_content() for e in back.header.extensions] == [b"kept by the store"]
    np.testing.assert_array_equal(back.get_fdata(), source.get_fdata())
    np.testing.assert_array_equal(back.affine, source.affine)


def _malformed(tmp: Path, how: str) -> Path:
    """Copies of the committed 0.6 store with their OME metadata broken
    (and the header removed where the broken part is the transforms)."""
    store = tmp / f"{how}.nii.zarr"
    shutil.copytree(DATA / "rc9_ome06.nii.zarr", store)
    meta = json.loads((store / "zarr.json").read_text())
    image = meta["attributes"]["ome"]["multiscales"][0]
    if how == "not-a-list":
        meta["attributes"]["ome"]["multiscales"] = {"datasets": []}
    elif how == "no-axes":
        image["coordinateSystems"] = []
    elif how == "no-path":
        del image["datasets"][0]["path"]
    elif how == "short-scale":
        shutil.rmtree(store / "nifti")
        image["datasets"][0]["coordinateTransformations"][0]["scale"] = [1.0, 2.0]
    (store / "zarr.json").write_text(json.dumps(meta))
    return store


@pytest.mark.parametrize("how", ["not-a-list", "no-axes", "no-path", "short-scale"])
@pytest.mark.parametrize("command", ["convert", "denoise"])
def test_malformed_metadata_is_one_line(how, command, tmp_path, capsys):
    store = _malformed(tmp_path, how)
    extra = ["--bvals", str(BVAL)] if command == "denoise" else []
    capsys.readouterr()
    assert main([command, str(store), str(tmp_path / "out.nii.gz"), *extra, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert str(store) in err and "OME multiscales metadata is malformed" in err, err
    assert not (tmp_path / "out.nii.gz").exists()


def test_group_that_is_no_image_is_one_line(tmp_path, capsys):
    store = tmp_path / "group.zarr"
    zarr.create_group(str(store), zarr_format=2, attributes={"something": "else"})
    assert main(["convert", str(store), str(tmp_path / "out.nii"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nor an OME-Zarr or NIfTI-Zarr image" in err, err
