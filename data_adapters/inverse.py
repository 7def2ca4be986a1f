"""Put canonical-grid maps (labels, probabilities) back onto a case's original grid.

Harmonised cases live on a RAS grid at the target spacing, cropped to the head.
A prediction made there has to go back to the scan it came from: the grid of the
case's t1n as read (shape, spacing, origin, direction), which the manifest keeps
as ``original_geometry``.  The canonical grid is in t1n's world (other modalities
were registered *onto* t1n), so going back is a resampling through world
coordinates with the identity transform: nearest neighbour for labels, linear for
probability maps.  Voxels of the original grid outside the canonical grid get 0.

The written NIfTI carries the original affine (sform = qform), so it overlays the
source scan in any viewer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from data_adapters.geometry import Geometry, ras_affine
from data_adapters.register import world_bounds
from data_adapters.writers import write_nifti

_INTERPOLATORS = {"nearest": sitk.sitkNearestNeighbor, "linear": sitk.sitkLinear}


def to_original_grid(
    label_image: sitk.Image,
    original_geometry: Geometry | Mapping[str, Any],
    *,
    interpolator: str = "nearest",
) -> sitk.Image:
    """Resample a canonical map onto the original grid of its case.

    Parameters
    ----------
    label_image
        Label map (or probability map) on the canonical grid, with its geometry.
    original_geometry
        The case's ``original_geometry`` (a :class:`Geometry` or its JSON dict from
        ``manifest.json``).
    interpolator
        ``"nearest"`` for labels (keeps the pixel type, so values stay whole) or
        ``"linear"`` for probability maps (float32 output).

    Returns
    -------
    sitk.Image
        The map on the original grid: its shape, spacing, origin and direction.

    Raises
    ------
    ValueError
        For an unknown interpolator, a non-3D image, or an original grid that does
        not meet the image in the world (the wrong case, or a broken geometry).
    """
    if interpolator not in _INTERPOLATORS:
        raise ValueError(f"interpolator must be one of {sorted(_INTERPOLATORS)}")
    if label_image.GetDimension() != 3 or label_image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a 3D scalar image")
    reference = reference_image(original_geometry)
    if not _boxes_meet(label_image, reference):
        raise ValueError(
            "the map and the original grid share no world region: wrong case or geometry"
        )
    pixel = sitk.sitkFloat32 if interpolator == "linear" else label_image.GetPixelID()
    resampled: sitk.Image = sitk.Resample(
        label_image,
        reference,
        sitk.Transform(3, sitk.sitkIdentity),
        _INTERPOLATORS[interpolator],
        0.0,
        pixel,
    )
    return resampled


def write_on_original_grid(
    label_image: sitk.Image,
    original_geometry: Geometry | Mapping[str, Any],
    path: str | Path,
    *,
    interpolator: str = "nearest",
    dtype: npt.DTypeLike | None = None,
) -> Path:
    """Resample onto the original grid (see :func:`to_original_grid`) and write NIfTI.

    ``dtype`` defaults to uint8 for labels and float32 for probability maps; the
    file's affine is the original grid's.
    """
    image = to_original_grid(label_image, original_geometry, interpolator=interpolator)
    if dtype is None:
        dtype = np.float32 if interpolator == "linear" else np.uint8
    path = Path(path)
    write_nifti(image, path, dtype=dtype)
    return path


def reference_image(geometry: Geometry | Mapping[str, Any]) -> sitk.Image:
    """An empty image on the original grid (what resampling needs as its target).

    Built from shape, spacing and SimpleITK's LPS origin and direction; when the
    record also holds ``affine_ras`` the two descriptions must agree (to 1e-3 mm),
    so a hand-edited or half-converted record cannot flip the result silently.
    """
    record = geometry.to_json() if isinstance(geometry, Geometry) else dict(geometry)
    try:
        shape = [int(n) for n in record["shape"]]
        spacing = [float(v) for v in record["spacing"]]
        origin = [float(v) for v in record["origin"]]
        direction = [float(v) for v in record["direction"]]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"not an original_geometry record: {err!r}") from err
    if len(shape) != 3 or len(spacing) != 3 or len(origin) != 3 or len(direction) != 9:
        raise ValueError(f"original geometry is not 3D: shape {shape}")
    image = sitk.Image(shape, sitk.sitkUInt8)
    try:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
    except RuntimeError as err:  # ITK refuses zero spacing and non-orthonormal directions
        raise ValueError(f"invalid original geometry: {' '.join(str(err).split())}") from err
    if "affine_ras" in record:
        expected = np.asarray(record["affine_ras"], dtype=float)
        if expected.shape != (4, 4) or not np.allclose(ras_affine(image), expected, atol=1e-3):
            raise ValueError("original geometry is inconsistent: affine_ras disagrees with it")
    return image


def _boxes_meet(a: sitk.Image, b: sitk.Image) -> bool:
    (low_a, high_a), (low_b, high_b) = world_bounds(a), world_bounds(b)
    return bool(np.all(np.minimum(high_a, high_b) > np.maximum(low_a, low_b)))
