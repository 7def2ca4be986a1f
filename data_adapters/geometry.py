"""World geometry of images: SimpleITK (LPS) <-> nibabel (RAS) affines.

SimpleITK stores an image's geometry as origin, spacing and a direction matrix
in DICOM's LPS world (x to the patient's Left, y Posterior, z Superior) and
hands out voxel arrays in (k, j, i) order.  nibabel and NIfTI files describe the
same thing as one 4x4 affine in RAS (x Right, y Anterior, z Superior) over
(i, j, k) arrays.  The two worlds differ by flipping x and y, nothing else, so
the conversions here are exact up to floating point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

#: Maps LPS world coordinates to RAS ones and back (it is its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

Vec3 = tuple[float, float, float]


def ras_affine(image: sitk.Image) -> npt.NDArray[np.float64]:
    """Return the 4x4 affine mapping voxel (i, j, k) to RAS millimetres.

    Parameters
    ----------
    image
        A 3D SimpleITK image.
    """
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * spacing  # scales column c by spacing[c]
    affine_lps[:3, 3] = image.GetOrigin()
    return LPS_TO_RAS @ affine_lps


def lps_geometry(affine_ras: npt.ArrayLike) -> tuple[Vec3, Vec3, tuple[float, ...]]:
    """Split a voxel-to-RAS affine into SimpleITK's (origin, spacing, direction).

    Parameters
    ----------
    affine_ras
        4x4 affine; its 3x3 part must have orthogonal columns (ITK refuses shear).

    Returns
    -------
    origin, spacing, direction
        LPS origin, spacing per axis and the row-major 3x3 direction matrix.
    """
    affine_lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    matrix = affine_lps[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    direction = matrix / spacing
    o, s = affine_lps[:3, 3], spacing
    return (
        (float(o[0]), float(o[1]), float(o[2])),
        (float(s[0]), float(s[1]), float(s[2])),
        tuple(float(v) for v in direction.ravel()),
    )


def image_from_ijk(array: npt.ArrayLike, affine_ras: npt.ArrayLike) -> sitk.Image:
    """Build a SimpleITK image from an (i, j, k) array and a voxel-to-RAS affine."""
    data = np.asarray(array)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    origin, spacing, direction = lps_geometry(affine_ras)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def ijk_array(image: sitk.Image) -> npt.NDArray[Any]:
    """Return a copy of the voxels as an (i, j, k) array (nibabel's order)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def axcodes(image: sitk.Image) -> str:
    """Return the nibabel axis codes of ``image``, e.g. ``"RAS"`` or ``"LPS"``."""
    return "".join(str(c) for c in nib.aff2axcodes(ras_affine(image)))


def same_grid(a: sitk.Image, b: sitk.Image, *, tolerance_mm: float = 1e-3) -> bool:
    """Whether two images share one voxel grid (size, spacing, origin, direction)."""
    if a.GetSize() != b.GetSize():
        return False
    # Comparing the affines covers spacing, origin and direction at once; the
    # tolerance absorbs the float32 rounding of NIfTI headers.
    return bool(np.allclose(ras_affine(a), ras_affine(b), rtol=0.0, atol=tolerance_mm))


@dataclass(frozen=True)
class Geometry:
    """Where an image's voxels sit in the world, as recorded in the manifest.

    ``shape`` and ``spacing`` follow voxel index order (i, j, k) as nibabel
    reads the file; ``origin`` and ``direction`` (row-major 3x3, columns are
    the axis directions) are SimpleITK's LPS values; ``affine_ras`` is the
    voxel-to-RAS affine as nibabel reports it; ``axcodes`` its axis codes.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    affine_ras: tuple[tuple[float, ...], ...]
    axcodes: str

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        """Describe the grid of a SimpleITK image."""
        return cls(
            shape=tuple(int(n) for n in image.GetSize()),
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
            affine_ras=tuple(tuple(float(v) for v in row) for row in ras_affine(image)),
            axcodes=axcodes(image),
        )

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
            "affine_ras": [list(row) for row in self.affine_ras],
            "axcodes": self.axcodes,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_json`."""
        return cls(
            shape=tuple(int(v) for v in data["shape"]),
            spacing=tuple(float(v) for v in data["spacing"]),
            origin=tuple(float(v) for v in data["origin"]),
            direction=tuple(float(v) for v in data["direction"]),
            affine_ras=tuple(tuple(float(v) for v in row) for row in data["affine_ras"]),
            axcodes=str(data["axcodes"]),
        )
