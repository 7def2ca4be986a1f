"""NIfTI reading by the standard's rules, with integrity checks SimpleITK does not make.

NIfTI geometry follows the standard's rule, not SimpleITK's own preferences: the sform when
``sform_code > 0``, else the qform when ``qform_code > 0``, else voxel sizes alone ("method
1", orientation unknown).  SimpleITK agrees for most files but prefers the qform when the
sform's code is not "scanner" (e.g. an MNI sform beside a scanner qform), falls back to the
qform when the sform is sheared, refuses a sheared sform without a qform, and flips x and y
for method 1; where its geometry differs from the rule's, the rule's is set.  A sheared
(non-orthonormal) direction cannot be held by an ITK image: it is orthonormalised by polar
decomposition (origin and voxel sizes kept).  Each such decision is reported as a
:class:`GeometryWarning` (Python ``warnings``) naming the file, and recorded on the image as
metadata :data:`GEOMETRY_NOTE_KEY`; a sform and qform that are both set and disagree by more
than 0.1 mm or 0.1 degree are reported the same way.

SimpleITK silently returns partial voxels for a truncated ``.nii`` or ``.nii.gz`` file, so
:func:`read_nifti` first checks that the gzip stream is whole and that the file holds as many
data bytes as its header promises.
"""

from __future__ import annotations

import gzip
import io
import warnings
import zlib
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from data_adapters.errors import DataError, itk_message
from data_adapters.geometry import lps_geometry

_CHUNK = 1 << 20

#: Image metadata key holding what the reader decided about an ambiguous or sheared geometry.
GEOMETRY_NOTE_KEY = "fedseg_geometry_note"
#: sform/qform disagreement reported above these (mm over the image's corners, degrees).
XFORM_TOLERANCE_MM = 0.1
XFORM_TOLERANCE_DEG = 0.1
#: Largest deviation of D^T D from identity still taken as float rounding, not shear.
SHEAR_TOLERANCE = 1e-4


class GeometryWarning(UserWarning):
    """A file's geometry was ambiguous or had to be adjusted; the message says how."""


def read_nifti(path: Path) -> sitk.Image:
    """Read a ``.nii`` / ``.nii.gz`` file after an integrity check, geometry by the NIfTI rule."""
    check_nifti_complete(path)
    header = cast(nib.Nifti1Image, nib.load(path)).header  # header only: voxels are not read
    affine, notes = nifti_affine(header)
    try:
        image = sitk.ReadImage(str(path), imageIO="NiftiImageIO")
    except RuntimeError as err:
        # ITK refuses a sheared sform without a qform (and some NIfTI-2 files); nibabel reads them.
        image = _nifti_with_nibabel(path, err)
    _set_spatial_geometry(image, affine)
    if notes:
        image.SetMetaData(GEOMETRY_NOTE_KEY, "; ".join(notes))
        for note in notes:
            warnings.warn(f"{path}: {note}", GeometryWarning, stacklevel=2)
    return image


def nifti_affine(header: nib.Nifti1Header) -> tuple[npt.NDArray[np.float64], list[str]]:
    """The voxel-to-RAS affine the NIfTI rule gives, orthonormalised, with notes on choices.

    Returns
    -------
    affine, notes
        4x4 affine whose 3x3 part has orthogonal columns; notes say where the header was
        ambiguous (sform/qform disagreement, no transform) or adjusted (shear removed).
    """
    shape = header.get_data_shape()[:3]
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    notes: list[str] = []
    if sform_code > 0:
        affine = np.asarray(header.get_sform(), dtype=np.float64)
        if qform_code > 0:
            mm, degrees = xform_disagreement(affine, header.get_qform(), shape)
            if mm > XFORM_TOLERANCE_MM or degrees > XFORM_TOLERANCE_DEG:
                notes.append(
                    f"sform and qform disagree by up to {mm:.2f} mm / {degrees:.2f} degrees;"
                    f" using the sform (code {sform_code}), as the NIfTI rule says"
                )
    elif qform_code > 0:
        affine = np.asarray(header.get_qform(), dtype=np.float64)
    else:
        affine = np.diag([*(float(v) for v in header.get_zooms()[:3]), 1.0])
        notes.append("no sform or qform (both codes 0): orientation unknown, voxel sizes only")
    affine, shift = orthonormalised(affine, shape)
    if shift is not None:
        notes.append(
            "non-orthonormal (sheared) direction matrix orthonormalised by polar decomposition;"
            f" voxels move by up to {shift:.2f} mm"
        )
    return affine, notes


def xform_disagreement(
    a: npt.ArrayLike, b: npt.ArrayLike, shape: tuple[int, ...]
) -> tuple[float, float]:
    """How far two affines place the image's corner voxels apart (mm) and their rotation (deg)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    corners = _corners(shape)
    mm = float(np.linalg.norm((a - b)[:3] @ corners, axis=0).max())
    da = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    db = b[:3, :3] / np.linalg.norm(b[:3, :3], axis=0)
    cosine = (np.trace(da.T @ db) - 1.0) / 2.0
    return mm, float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def orthonormalised(
    affine: npt.NDArray[np.float64], shape: tuple[int, ...]
) -> tuple[npt.NDArray[np.float64], float | None]:
    """Replace a sheared 3x3 direction by its nearest rotation (polar decomposition).

    Returns the affine (voxel sizes = the column lengths, origin kept) and how far the image's
    corners moved in mm, or None when the direction was already orthonormal.
    """
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    if np.abs(direction.T @ direction - np.eye(3)).max() <= SHEAR_TOLERANCE:
        return affine, None
    u, _, vt = np.linalg.svd(direction)
    fixed = affine.copy()
    fixed[:3, :3] = (u @ vt) * spacing
    shift = float(np.linalg.norm((fixed - affine)[:3] @ _corners(shape), axis=0).max())
    return fixed, shift


def _corners(shape: tuple[int, ...]) -> npt.NDArray[np.float64]:
    """Homogeneous voxel coordinates (4 x 8) of the corners of a 3D grid."""
    extent = [max(int(n) - 1, 0) for n in (*shape, 1, 1, 1)[:3]]
    grid = np.array(np.meshgrid(*[[0, e] for e in extent], indexing="ij")).reshape(3, -1)
    return np.vstack([grid, np.ones(grid.shape[1])])


def _set_spatial_geometry(image: sitk.Image, affine: npt.NDArray[np.float64]) -> None:
    """Give ``image`` (3D or 4D) the spatial geometry of a RAS affine, if it differs."""
    origin, spacing, direction = lps_geometry(affine)
    n = image.GetDimension()
    current = np.asarray(image.GetDirection()).reshape(n, n)[:3, :3].ravel()
    if (
        np.allclose(image.GetOrigin()[:3], origin, atol=1e-4)
        and np.allclose(image.GetSpacing()[:3], spacing, atol=1e-6)
        and np.allclose(current, direction, atol=1e-6)
    ):
        return  # SimpleITK already applied the rule
    full = np.eye(n)
    full[:3, :3] = np.reshape(direction, (3, 3))
    image.SetOrigin((*origin, *image.GetOrigin()[3:]))
    image.SetSpacing((*spacing, *image.GetSpacing()[3:]))
    image.SetDirection(tuple(float(v) for v in full.ravel()))


def _nifti_with_nibabel(path: Path, cause: RuntimeError) -> sitk.Image:
    """Voxels through nibabel when ITK refuses the file; the geometry is set by the caller."""
    try:
        data = np.asanyarray(cast(nib.Nifti1Image, nib.load(path)).dataobj)
    except Exception as err:  # nibabel raises several types for malformed files
        raise DataError(path, f"cannot be read as NIfTI: {itk_message(cause)}") from err
    if data.ndim not in (3, 4):
        raise DataError(path, f"cannot be read as NIfTI: {itk_message(cause)}")
    # nibabel indexes (i, j, k[, t]); SimpleITK arrays are the reverse, in native byte order.
    native = data.astype(data.dtype.newbyteorder("="), copy=False).transpose()
    return sitk.GetImageFromArray(np.ascontiguousarray(native), isVector=False)


def check_nifti_complete(path: Path) -> None:
    """Raise :class:`DataError` unless ``path`` holds a whole NIfTI-1/2 image.

    Streams the file once (decompressing it when gzipped, which also checks
    the gzip CRC) and compares its length with what the header promises.
    """
    gzipped = path.name.lower().endswith(".gz")
    opener = gzip.open if gzipped else open
    try:
        with opener(path, "rb") as stream:
            head = stream.read(540)
            header = _nifti_header(path, head)
            total = len(head)
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(path, f"truncated or corrupt gzip data ({err})") from err
    shape = header.get_data_shape()
    expected = (
        int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
    )
    if total < expected:
        raise DataError(path, f"truncated: {total} bytes, the header promises {expected}")


def _nifti_header(path: Path, head: bytes) -> nib.Nifti1Header:
    """Parse a NIfTI-1 or NIfTI-2 header from the file's first bytes."""
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
    header_class = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header
    if not sizes & {348, 540} or len(head) < header_class.sizeof_hdr:
        raise DataError(path, "not a NIfTI file (no NIfTI header)")
    try:
        header: nib.Nifti1Header = header_class.from_fileobj(
            io.BytesIO(head[: header_class.sizeof_hdr])
        )
    except Exception as err:  # nibabel raises several types for malformed headers
        raise DataError(path, f"invalid NIfTI header ({err})") from err
    if header["magic"].item() not in (b"n+1", b"n+2"):
        raise DataError(path, "NIfTI header without image data in the same file (.hdr/.img pair?)")
    return header
