"""What a NIfTI-Zarr DWI store says about itself, as plain JSON and arrays.

Our stores follow the NIfTI-Zarr specification (an OME-Zarr 0.5 image on
Zarr v3), so nifti-zarr, ome-zarr (napari), xarray and plain zarr open them:

* array ``0``: the raw values, axes ``(t, z, y, x)`` in C order, which is
  the NIfTI file's own (x, y, z, t) Fortran order, byte for byte;
* array ``nifti``: the NIfTI header (and extensions) as bytes, the
  authority on everything the OME metadata cannot say (an oblique affine,
  qform/sform codes, scaling);
* arrays ``bvals`` (t) and ``bvecs`` (t, 3), named as coordinates of ``0``
  (CF ``coordinates``), so xarray shows the b-value of every volume;
* CF ``scale_factor``/``add_offset`` on ``0`` when the header scales the
  raw numbers, so xarray shows physical values (as nibabel's ``get_fdata``);
* the group's ``ome`` attributes: one multiscale image of one level.

It also reads what other tools write (OME-Zarr 0.4, 0.5 and 0.6, with or
without the ``nifti`` header): which array is the image, which of its axes
are x, y, z and the volumes, and an affine from the OME transforms for a
store that has no header.

This module only builds and reads that metadata; :mod:`.zarr_store` writes
and reads stores. Written here because no maintained library produces the
NIfTI-Zarr metadata from a header without also writing the data its own way.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from .meta import DwiMeta

ARRAY_NAME = "0"
HEADER_NAME = "nifti"
BVALS_NAME = "bvals"
BVECS_NAME = "bvecs"
AXES = ("t", "z", "y", "x")
OME_VERSION = "0.5"

_SPACE_UNITS = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3, "unknown": 1.0}
_OME_SPACE = {"meter": "meter", "mm": "millimeter", "micron": "micrometer"}
_OME_TIME = {"sec": "second", "msec": "millisecond", "usec": "microsecond"}


def _units(meta: DwiMeta):
    """OME unit names of space and time (None where the header says none)."""
    space, time = meta.nifti_header().get_xyzt_units()
    return _OME_SPACE.get(space), _OME_TIME.get(time)


def ome_attributes(meta: DwiMeta) -> dict:
    """The group's ``ome`` attributes: one image, one resolution level.

    Scale and translation come from the affine's diagonal and offset
    (exact for an axis-aligned affine; the ``nifti`` header keeps any
    rotation, and takes precedence, as the specification says).
    """
    zooms = meta.nifti_header().get_zooms()
    dt = float(zooms[3]) if len(zooms) > 3 and zooms[3] > 0 else 1.0
    space, time = _units(meta)
    spatial = [float(abs(meta.affine[i, i])) or 1.0 for i in range(3)]
    offset = [float(meta.affine[i, 3]) for i in range(3)]
    axes = [{"name": "t", "type": "time", **({"unit": time} if time else {})}]
    axes += [{"name": a, "type": "space", **({"unit": space} if space else {})}
             for a in ("z", "y", "x")]
    level = {"path": ARRAY_NAME, "coordinateTransformations": [
        {"type": "scale", "scale": [dt, *spatial[::-1]]},
        {"type": "translation", "translation": [0.0, *offset[::-1]]}]}
    return {"version": OME_VERSION, "multiscales": [{"axes": axes, "datasets": [level]}]}


def header_bytes(meta: DwiMeta) -> np.ndarray:
    """The ``nifti`` array: header bytes, then the extension flag and any
    extensions (the padding up to the data offset left out)."""
    hdr = meta.nifti_header()
    extra = meta.extra
    if not hdr.extensions:
        extra = extra[:4]
    return np.frombuffer(meta.header + extra, np.uint8)


def header_json(meta: DwiMeta) -> dict:
    """A readable summary of the header, beside the bytes (informative only)."""
    hdr = meta.nifti_header()
    space, time = hdr.get_xyzt_units()
    return {"NIIHeaderSize": len(meta.header), "Dim": list(meta.shape),
            "DataType": meta.raw_dtype.name,
            "VoxelSize": [float(z) for z in hdr.get_zooms()],
            "ScaleSlope": meta.slope, "ScaleOffset": meta.inter,
            "Unit": {"L": space, "T": time},
            "Affine": np.asarray(meta.affine)[:3].tolist()}


def cf_attributes(meta: DwiMeta) -> dict:
    """Attributes of array ``0``: CF scaling (when scaled) and coordinates."""
    attrs = {}
    if meta.scaled:
        attrs["scale_factor"] = meta.slope
        attrs["add_offset"] = meta.inter
    names = [n for n, v in ((BVALS_NAME, meta.bvals), (BVECS_NAME, meta.bvecs)) if v is not None]
    if names:
        attrs["coordinates"] = " ".join(names)
    return attrs


def gradient_arrays(meta: DwiMeta) -> dict:
    """``{name: (values, dimension_names)}`` of the gradient arrays to store."""
    out = {}
    if meta.bvals is not None:
        out[BVALS_NAME] = (np.asarray(meta.bvals, np.float64), ("t",))
    if meta.bvecs is not None:
        out[BVECS_NAME] = (np.ascontiguousarray(np.asarray(meta.bvecs, np.float64).T),
                           ("t", "direction"))
    return out


# -- reading any NIfTI-Zarr / OME-Zarr image ---------------------------------
#
# Where each OME-Zarr version keeps what a reader needs:
#
# * 0.4 (Zarr v2): ``multiscales`` among the group's attributes, ``axes`` in
#   each multiscale, the level's ``coordinateTransformations`` a scale then
#   maybe a translation, and optional ones of the multiscale applied after;
# * 0.5 (Zarr v3): the same, under the group's ``ome`` attributes;
# * 0.6 (RFC-5, nifti-zarr 1.0.0rc9's default): no ``axes``; the
#   multiscale's ``coordinateSystems`` name them, and each level has one
#   transform (scale, identity, or a ``sequence`` of scale and translation)
#   whose ``output`` names the system it maps to (the specification makes it
#   the last one; nifti-zarr lists it first, its ``nifti:*`` systems after).
#   The multiscale's own transforms lead to other systems: not composed.

# millimetres per OME space unit (a NIfTI affine is in millimetres)
_MM = {"angstrom": 1e-7, "nanometer": 1e-6, "micrometer": 1e-3, "millimeter": 1.0,
       "centimeter": 10.0, "decimeter": 100.0, "meter": 1000.0}
# what other tools call the axes, by OME axis type
_BY_TYPE = {"time": "t", "channel": "c"}


def _malformed(url, why) -> InputError:
    return InputError(f"{url}: its OME multiscales metadata is malformed ({why})")


def _multiscale(attrs: dict, url) -> dict:
    """The first multiscale image of a group's attributes (0.5/0.6 under
    ``ome``, 0.4 at the top level)."""
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
    if not multiscales:
        raise InputError(f"{url} is a Zarr group but not an OME-Zarr image (no multiscales)")
    if not isinstance(multiscales, list) or not isinstance(multiscales[0], dict):
        raise _malformed(url, "'multiscales' is not a list of objects")
    return multiscales[0]


def _level0(image: dict, url) -> dict:
    datasets = image.get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        raise _malformed(url, "no 'datasets'")
    if not isinstance(datasets[0].get("path"), str):
        raise _malformed(url, "its first dataset has no 'path'")
    return datasets[0]


def _io_name(ref):
    """The coordinate system a transform's ``input``/``output`` names (RFC-5
    allows a string or an object with ``name``)."""
    return ref.get("name") if isinstance(ref, dict) else ref


def _axes_of(image: dict, url) -> list:
    """The axis objects of the image (0.4/0.5 ``axes``, 0.6 the coordinate
    system that level 0 maps to)."""
    if "coordinateSystems" not in image:
        axes = image.get("axes")
    else:
        systems = image["coordinateSystems"]
        if not isinstance(systems, list) or not systems:
            raise _malformed(url, "'coordinateSystems' is empty")
        transforms = _level0(image, url).get("coordinateTransformations")
        first = transforms[0] if isinstance(transforms, list) and transforms else None
        wanted = _io_name(first.get("output")) if isinstance(first, dict) else None
        named = [s for s in systems if isinstance(s, dict) and s.get("name") == wanted]
        system = named[0] if named else systems[-1]
        axes = system.get("axes") if isinstance(system, dict) else None
    if not isinstance(axes, list) or not axes:
        raise _malformed(url, "no 'axes'")
    return axes


def _axis_name(axis, url) -> str:
    """x, y, z, t, c or the axis's own name (lower case)."""
    if isinstance(axis, str):
        return axis.lower()
    if not isinstance(axis, dict) or not isinstance(axis.get("name"), str):
        raise _malformed(url, f"axis {axis!r} has no name")
    name = axis["name"].lower()
    if name in ("x", "y", "z", "t", "c"):
        return name
    return _BY_TYPE.get(axis.get("type"), name)


def image_axes(attrs: dict, url) -> tuple[str, list]:
    """The path of level 0 and its axis names (x, y, z, t, c or the
    store's own), from a group's attributes, any OME-Zarr version."""
    image = _multiscale(attrs, url)
    path = _level0(image, url)["path"]
    return path, [_axis_name(a, url) for a in _axes_of(image, url)]


def to_nifti_axes(names, shape, url) -> tuple[tuple, tuple]:
    """Which stored axes are NIfTI's x, y, z and volumes, and which to drop.

    The volumes are the one non-spatial axis longer than 1 (the time axis,
    or a channel axis where volumes were stored as channels), else the time
    axis; every other non-spatial axis must have length 1.

    Returns
    -------
    order : tuple of 4 ints
        The stored axis of x, y, z and volumes.
    drop : tuple of ints
        Stored axes of length 1 left out.
    """
    names, shape = list(names), tuple(shape)
    refused = InputError(f"{url}: expected a 4D image with axes x, y, z and volumes; it "
                         f"has axes {names} of shape {shape}")
    spatial = [names.index(a) if names.count(a) == 1 else None for a in "xyz"]
    if len(names) != len(shape) or None in spatial:
        raise refused
    others = [i for i in range(len(names)) if i not in spatial]
    long = [i for i in others if shape[i] != 1]
    times = [i for i in others if names[i] == "t"]
    if len(long) > 1 or not others:
        raise refused
    volume = (long or times or others)[0]
    return (*spatial, volume), tuple(i for i in others if i != volume)


def _transform_list(transforms, url) -> list:
    """Scale/translation/identity transforms in order, sequences unrolled."""
    if transforms is None:
        return []
    if not isinstance(transforms, list):
        raise _malformed(url, "'coordinateTransformations' is not a list")
    flat = []
    for t in transforms:
        if not isinstance(t, dict):
            raise _malformed(url, f"transform {t!r} is not an object")
        if t.get("type") == "sequence":
            flat += _transform_list(t.get("transformations"), url)
        else:
            flat.append(t)
    return flat


def _vector(t: dict, key: str, n: int, url) -> np.ndarray:
    values = t.get(key)
    if values is None and "path" in t:
        raise InputError(f"{url}: its OME {key} is stored in an array; p2s-dask reads "
                         "only values written in the metadata")
    try:
        values = np.asarray(values, np.float64)
    except (TypeError, ValueError):
        raise _malformed(url, f"{key} {values!r} is not a list of numbers") from None
    if values.shape != (n,):
        raise _malformed(url, f"{key} {values.tolist()} does not have {n} values")
    return values


def _scale_shift(transforms: list, n: int, url) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` per stored axis: coordinate = scale * index + shift."""
    scale, shift = np.ones(n), np.zeros(n)
    for t in transforms:
        kind = t.get("type")
        if kind == "scale":
            factor = _vector(t, "scale", n, url)
            scale, shift = scale * factor, shift * factor
        elif kind == "translation":
            shift = shift + _vector(t, "translation", n, url)
        elif kind != "identity":
            raise InputError(f"{url}: its OME coordinate transformation {kind!r} is not "
                             "supported without a NIfTI header (scale, translation, "
                             "identity and their sequence are)")
    return scale, shift


def affine_from_ome(attrs: dict, url="the store") -> np.ndarray:
    """The affine of level 0 from its OME scale and translation, in
    millimetres (other units converted; none given: millimetres), for a
    store without a ``nifti`` header. An axis-aligned affine: OME 0.4/0.5
    can say no more, and a rotation in 0.6 leads to another system."""
    image = _multiscale(attrs, url)
    axes = _axes_of(image, url)
    names = [_axis_name(a, url) for a in axes]
    transforms = _transform_list(_level0(image, url).get("coordinateTransformations"), url)
    if "coordinateSystems" not in image:
        # 0.4/0.5: the multiscale's own transforms apply to every level, after
        transforms += _transform_list(image.get("coordinateTransformations"), url)
    scale, shift = _scale_shift(transforms, len(names), url)
    affine = np.eye(4)
    for row, a in enumerate("xyz"):
        i = names.index(a)
        unit = axes[i].get("unit") if isinstance(axes[i], dict) else None
        mm = _MM.get(unit, 1.0)
        affine[row, row], affine[row, 3] = scale[i] * mm, shift[i] * mm
    return affine
