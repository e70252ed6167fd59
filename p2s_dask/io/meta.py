"""What we keep about a DWI besides its voxels: the NIfTI header and gradients.

The header is kept as the exact bytes that were in the file (``header``), plus
the bytes between the header and the data (``extra``: the extension flag and
any extensions), so that writing the same values back gives the same file.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import warnings

import nibabel as nib
import numpy as np
from nibabel.spatialimages import HeaderDataError

from ..errors import InputError

__all__ = ["DwiMeta", "header_class"]

# Extensions travel inside the store's JSON attributes; a DICOM dump of a few
# hundred kB is normal, anything beyond this is not worth bloating them for.
MAX_EXTRA_BYTES = 16 << 20

_NO_EXTENSIONS = b"\x00\x00\x00\x00"


def header_class(header_bytes: bytes):
    """``Nifti1Header`` or ``Nifti2Header``, from the size of the header."""
    if len(header_bytes) == nib.Nifti1Header.template_dtype.itemsize:
        return nib.Nifti1Header
    if len(header_bytes) == nib.Nifti2Header.template_dtype.itemsize:
        return nib.Nifti2Header
    raise InputError(f"not a NIfTI header: {len(header_bytes)} bytes")


def _check_dtype(dtype: np.dtype) -> np.dtype:
    """The native-order dtype of the values, or InputError if we cannot hold it."""
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise InputError(
            f"data type {dtype} is not supported: use an integer or real float type"
        )
    return dtype.newbyteorder("=")


def _gradients(bvals, bvecs, n):
    if bvals is not None:
        bvals = np.asarray(bvals, dtype=np.float64).ravel()
        if bvals.size != n:
            raise InputError(f"bvals has {bvals.size} values but the data has {n} volumes")
    if bvecs is not None:
        bvecs = np.asarray(bvecs, dtype=np.float64)
        if bvecs.ndim == 2 and bvecs.shape[0] != 3 and bvecs.shape[1] == 3:
            bvecs = bvecs.T
        if bvecs.shape != (3, n):
            raise InputError(
                f"bvecs has shape {bvecs.shape}; expected (3, {n}) for {n} volumes"
            )
        bvecs = np.ascontiguousarray(bvecs)
    return bvals, bvecs


@dataclasses.dataclass(frozen=True, eq=False)
class DwiMeta:
    """Header, geometry and gradients of a 4D diffusion dataset.

    Attributes
    ----------
    header : bytes
        The NIfTI-1 (348 bytes) or NIfTI-2 (540 bytes) header as on disk, in
        its own byte order.
    extra : bytes
        The bytes between the header and the voxel data: the 4-byte extension
        flag and any extensions. ``len(header) + len(extra)`` is the offset of
        the data.
    affine : ndarray, shape (4, 4)
        Voxel to world, as nibabel chooses it (sform, else qform).
    shape : tuple of 4 ints
        (x, y, z, volumes).
    raw_dtype : numpy.dtype
        The type of the values in the file, in native byte order.
    slope, inter : float
        Scaling: values are ``raw * slope + inter``; 1 and 0 when the header
        has none.
    bvals : ndarray, shape (n,), or None
    bvecs : ndarray, shape (3, n), or None
    sidecar : dict or None
        The image's BIDS ``.json`` sidecar fields (EchoTime, ...; for our
        outputs also ``Sources`` and what made them): a store keeps them in
        its attributes, so they come back beside a NIfTI made from it.
    """

    header: bytes
    extra: bytes
    affine: np.ndarray
    shape: tuple
    raw_dtype: np.dtype
    slope: float = 1.0
    inter: float = 0.0
    bvals: np.ndarray | None = None
    bvecs: np.ndarray | None = None
    sidecar: dict | None = None

    # -- derived -----------------------------------------------------------

    @property
    def scaled(self) -> bool:
        """Whether the values differ from the raw numbers (slope/inter not 1/0)."""
        return (self.slope, self.inter) != (1.0, 0.0)

    def apply_scaling(self, raw):
        """Values from raw numbers (NumPy or dask): ``raw * slope + inter`` in
        float64 when scaled, with the operations in the order of nibabel's
        ``get_fdata``, so the values match it bit for bit; else ``raw``."""
        if not self.scaled:
            return raw
        values = raw.astype(np.float64)
        if self.slope != 1.0:
            values = values * self.slope
        if self.inter != 0.0:
            values = values + self.inter
        return values

    @property
    def value_dtype(self) -> np.dtype:
        """dtype of the values: float64 when scaled (as nibabel's ``get_fdata``)."""
        return np.dtype(np.float64) if self.scaled else self.raw_dtype

    @property
    def disk_dtype(self) -> np.dtype:
        """dtype of the voxel data in a NIfTI file, with the header's byte order."""
        return self.raw_dtype.newbyteorder(self.nifti_header().endianness)

    @property
    def data_offset(self) -> int:
        """Offset of the voxel data in a ``.nii`` file."""
        return len(self.header) + len(self.extra)

    def nifti_header(self):
        """A nibabel header (with extensions) rebuilt from the stored bytes.

        Returns
        -------
        nibabel.Nifti1Header or nibabel.Nifti2Header
        """
        klass = header_class(self.header)
        try:
            return klass.from_fileobj(io.BytesIO(self.header + self.extra), check=False)
        except Exception:
            # a malformed extension must not make the header unusable; the
            # raw bytes still go back to disk unchanged
            return klass(self.header, check=False)

    # -- construction ------------------------------------------------------

    @classmethod
    def from_header(cls, hdr, extra: bytes | None = None, bvals=None, bvecs=None):
        """Meta from a nibabel NIfTI header.

        Parameters
        ----------
        hdr : nibabel.Nifti1Header or nibabel.Nifti2Header
        extra : bytes, optional
            The bytes between header and data in the file; by default no
            extensions (and ``vox_offset`` set to match).
        bvals, bvecs : array-like, optional

        Returns
        -------
        DwiMeta
        """
        hdr = hdr.copy()
        if extra is None or len(extra) > MAX_EXTRA_BYTES:
            if extra is not None:
                warnings.warn(f"dropping {len(extra)} bytes of NIfTI extensions "
                              "(too large to keep)", UserWarning, stacklevel=2)
            extra = _NO_EXTENSIONS
            hdr["vox_offset"] = len(hdr.binaryblock) + len(extra)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        # trailing length-1 dimensions (dim[0] = 5 with dim[5] = 1) are harmless
        while len(shape) > 4 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) != 4:
            raise InputError(
                f"expected 4D data (x, y, z, volumes); the header says shape {shape}"
            )
        if min(shape) < 1:
            raise InputError(f"the header says shape {shape}, with an empty axis")
        raw_dtype = _check_dtype(hdr.get_data_dtype())
        try:
            slope, inter = hdr.get_slope_inter()
        except HeaderDataError as exc:
            raise InputError(f"bad scaling in the NIfTI header: {exc}") from None
        if slope is None:
            slope, inter = 1.0, 0.0
        bvals, bvecs = _gradients(bvals, bvecs, shape[3])
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
        return cls(bytes(hdr.binaryblock), bytes(extra), affine, shape, raw_dtype,
                   float(slope), float(inter), bvals, bvecs)

    @classmethod
    def for_array(cls, shape, dtype, affine=None, bvals=None, bvecs=None):
        """Meta for values that did not come from a file (a fresh NIfTI-1 header).

        Parameters
        ----------
        shape : tuple of 4 ints
        dtype : numpy dtype
        affine : array-like (4, 4), optional
            Identity by default; set as both sform and qform (code 1, scanner).
        bvals, bvecs : array-like, optional

        Returns
        -------
        DwiMeta
        """
        hdr = nib.Nifti1Header()
        try:
            hdr.set_data_dtype(np.dtype(dtype))
        except HeaderDataError:
            raise InputError(f"data type {np.dtype(dtype)} cannot be stored in NIfTI") from None
        hdr.set_data_shape(tuple(shape))
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        hdr.set_sform(affine, code=1)
        hdr.set_qform(affine, code=1)
        hdr.set_xyzt_units("mm", "sec")
        return cls.from_header(hdr, None, bvals, bvecs)

    def for_values(self, dtype, shape=None, slope=1.0, inter=0.0) -> DwiMeta:
        """Meta for new values (e.g. denoised) on the same grid.

        The header gets the new dtype and shape and the given scaling (none
        by default: slope 1, intercept 0); everything else, extensions
        included, is kept.

        Parameters
        ----------
        dtype : numpy dtype
        shape : tuple of 4 ints, optional
            Default: this meta's shape. Only the number of volumes may differ.
        slope, inter : float, optional
            ``scl_slope``/``scl_inter`` of the new values (values are
            ``raw * slope + inter``).

        Returns
        -------
        DwiMeta
        """
        shape = self.shape if shape is None else tuple(int(s) for s in shape)
        if len(shape) != 4 or shape[:3] != self.shape[:3]:
            raise InputError(f"values of shape {shape} do not fit a grid of {self.shape[:3]}")
        hdr = self.nifti_header()
        dtype = _check_dtype(np.dtype(dtype))
        try:
            hdr.set_data_dtype(dtype)
        except HeaderDataError:
            raise InputError(f"data type {dtype} cannot be stored in NIfTI") from None
        if shape != self.shape:
            hdr.set_data_shape(shape)
        hdr.set_slope_inter(float(slope), float(inter))
        bvals, bvecs = (self.bvals, self.bvecs) if shape[3] == self.shape[3] else (None, None)
        return dataclasses.replace(self, header=bytes(hdr.binaryblock), shape=shape,
                                   raw_dtype=dtype, slope=float(slope), inter=float(inter),
                                   bvals=bvals, bvecs=bvecs)

    def with_gradients(self, bvals=None, bvecs=None) -> DwiMeta:
        """A copy with these b-values/vectors (checked against the volume count)."""
        bvals, bvecs = _gradients(bvals, bvecs, self.shape[3])
        return dataclasses.replace(self, bvals=bvals, bvecs=bvecs)

    def with_sidecar(self, sidecar: dict | None) -> DwiMeta:
        """A copy with these sidecar fields (a JSON object, or None)."""
        return dataclasses.replace(self, sidecar=None if sidecar is None else dict(sidecar))

    # -- JSON (Zarr attributes) ------------------------------------------

    def to_json(self) -> dict:
        """A JSON-able dict (bytes as base64, arrays as lists)."""
        return {
            "nifti_header": base64.b64encode(self.header).decode("ascii"),
            "nifti_extra": base64.b64encode(self.extra).decode("ascii"),
            "affine": self.affine.tolist(),
            "shape": list(self.shape),
            "raw_dtype": self.raw_dtype.str,
            "scl_slope": self.slope,
            "scl_inter": self.inter,
            "bvals": None if self.bvals is None else self.bvals.tolist(),
            "bvecs": None if self.bvecs is None else self.bvecs.tolist(),
            **({"sidecar": self.sidecar} if self.sidecar is not None else {}),
        }

    @classmethod
    def from_json(cls, d: dict) -> DwiMeta:
        """Inverse of :meth:`to_json`."""
        return cls(
            header=base64.b64decode(d["nifti_header"]),
            extra=base64.b64decode(d["nifti_extra"]),
            affine=np.asarray(d["affine"], dtype=np.float64),
            shape=tuple(int(s) for s in d["shape"]),
            raw_dtype=np.dtype(d["raw_dtype"]),
            slope=float(d["scl_slope"]),
            inter=float(d["scl_inter"]),
            bvals=None if d.get("bvals") is None else np.asarray(d["bvals"], np.float64),
            bvecs=None if d.get("bvecs") is None else np.asarray(d["bvecs"], np.float64),
            sidecar=d["sidecar"] if isinstance(d.get("sidecar"), dict) else None,
        )
