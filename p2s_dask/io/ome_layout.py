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

def image_axes(attrs: dict, url) -> tuple[str, list]:
    """The path of level 0 and its axis names, from a group's attributes
    (OME 0.5 under ``ome``, 0.4 at the top level)."""
    ome = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
    if not multiscales:
        raise InputError(f"{url} is a Zarr group but not an OME-Zarr image (no multiscales)")
    image = multiscales[0]
    try:
        path = image["datasets"][0]["path"]
        names = [a["name"] if isinstance(a, dict) else str(a) for a in image["axes"]]
    except (KeyError, IndexError, TypeError):
        raise InputError(f"{url}: its OME multiscales metadata is malformed") from None
    return path, names


def to_nifti_axes(names, shape, url) -> tuple:
    """The permutation taking stored axes to (x, y, z, t), and the axes of
    length 1 to drop (a channel axis); InputError unless it is a 4D DWI."""
    nifti_axes = ("x", "y", "z", "t")
    drop = [i for i, n in enumerate(names) if n not in nifti_axes]
    if any(shape[i] != 1 for i in drop) or sorted(n for n in names if n in nifti_axes) != list("txyz"):
        raise InputError(f"{url}: expected a 4D image with axes x, y, z, t; it has axes "
                         f"{names} of shape {tuple(shape)}")
    kept = [n for i, n in enumerate(names) if i not in drop]
    return tuple(kept.index(a) for a in "xyzt"), tuple(drop)


def affine_from_ome(attrs: dict, names) -> np.ndarray:
    """An affine from OME scale/translation (millimetres assumed), for a
    store without a ``nifti`` header."""
    ome = attrs.get("ome", attrs)
    scale = {n: 1.0 for n in names}
    shift = {n: 0.0 for n in names}
    for t in ome["multiscales"][0]["datasets"][0].get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale.update(zip(names, t["scale"]))
        elif t.get("type") == "translation":
            shift.update(zip(names, t["translation"]))
    affine = np.eye(4)
    for i, a in enumerate("xyz"):
        affine[i, i], affine[i, 3] = float(scale.get(a, 1.0)), float(shift.get(a, 0.0))
    return affine
