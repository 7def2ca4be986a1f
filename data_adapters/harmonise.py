"""Harmonisation steps: small pure functions on SimpleITK images.

Each step returns its result and a :class:`Step` recording its name and
parameters, so the manifest can say exactly what was done to every case.
:func:`harmonise_case` composes them:

1. read every modality (and the segmentation) with its world geometry;
2. remap labels onto the canonical scheme (values only, before any resampling);
3. reorient to RAS (a permutation / flip of voxels: no voxel moves in the world);
4. foreground mask: Otsu on the mean of the modalities, largest component, holes filled;
5. target grid: RAS axes at the target spacing over the world bounding box of
   the mask and any labelled voxel, plus a margin;
6. resample onto it through world coordinates (linear images, nearest labels);
7. z-score each modality inside the mask, 0 outside.

Co-registration is not done: modalities are assumed aligned in world space
(as BraTS data are); ones on different grids are resampled through world
coordinates like everything else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk

from data_adapters.errors import DataError
from data_adapters.geometry import Geometry, Vec3, axcodes, same_grid
from data_adapters.labels import get_scheme, remap_labels
from data_adapters.layouts import MODALITIES, RawCase
from data_adapters.readers import read_source

#: Bump when a step changes what it writes: it is part of every fingerprint.
HARMONISE_VERSION = 1
DEFAULT_MARGIN_MM = 5.0
#: Each modality is divided by this percentile before averaging for the mask,
#: so one scanner's intensity units do not drown the others.
MASK_SCALE_PERCENTILE = 99.0
#: SimpleITK (LPS) direction of a RAS+ grid: i to the Right, j Anterior, k Superior.
RAS_DIRECTION: tuple[float, ...] = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)

T = TypeVar("T")

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}


@dataclass(frozen=True)
class Step:
    """One applied step: its name and the parameters it ran with."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {"name": self.name, "params": self.params}


@dataclass(frozen=True)
class Grid:
    """A voxel grid in SimpleITK terms (LPS origin and row-major direction)."""

    size: tuple[int, int, int]
    spacing: Vec3
    origin: Vec3
    direction: tuple[float, ...] = RAS_DIRECTION

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }


def harmonisation_parameters(
    *, target_spacing: Sequence[float], margin_mm: float = DEFAULT_MARGIN_MM
) -> dict[str, Any]:
    """Everything that decides what :func:`harmonise_case` writes, for the manifest."""
    return {
        "harmonise_version": HARMONISE_VERSION,
        "target_spacing_mm": [float(s) for s in target_spacing],
        "margin_mm": float(margin_mm),
        "orientation": "RAS",
        "mask": f"otsu(mean of modalities / p{MASK_SCALE_PERCENTILE:g}) + largest cc + fill holes",
        "image_interpolator": "linear",
        "label_interpolator": "nearest",
        "normalisation": "zscore inside mask, 0 outside",
        "label_scheme": "brats2023",
    }


def remap_segmentation(
    seg: sitk.Image, scheme: str, *, path: str | Path = "<image>"
) -> tuple[sitk.Image, Step]:
    """Map a segmentation's values onto canonical labels (uint8), same grid."""
    mapped = remap_labels(sitk.GetArrayViewFromImage(seg), scheme, path=path)
    out = sitk.GetImageFromArray(mapped)
    out.CopyInformation(seg)
    table = {str(k): v for k, v in get_scheme(scheme).to_canonical.items()}
    return out, Step("remap_labels", {"scheme": scheme, "map": table})


def reorient_to_ras(image: sitk.Image) -> tuple[sitk.Image, Step]:
    """Permute / flip voxel axes so i, j, k run closest to R, A, S.

    No interpolation: every voxel keeps its value and world position, only the
    index order and the direction matrix change.
    """
    before = axcodes(image)
    out = sitk.DICOMOrient(image, "RAS")
    return out, Step("reorient", {"from": before, "to": axcodes(out)})


def foreground_mask(
    images: Sequence[sitk.Image], *, path: str | Path = "<image>"
) -> tuple[sitk.Image, Step]:
    """Head (or, on skull-stripped data, brain) mask on the first image's grid.

    Otsu threshold of the mean of the modalities (each scaled by its
    :data:`MASK_SCALE_PERCENTILE`), largest connected component, holes filled.
    """
    reference = images[0]
    mean = np.zeros(sitk.GetArrayViewFromImage(reference).shape, dtype=np.float32)
    for image in images:
        if not same_grid(image, reference):
            image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)
        values = sitk.GetArrayViewFromImage(image).astype(np.float32)
        scale = float(np.percentile(values, MASK_SCALE_PERCENTILE))
        mean += values / scale if scale > 0 else values
    mean /= len(images)
    mean_image = sitk.GetImageFromArray(mean)
    mean_image.CopyInformation(reference)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.SetInsideValue(0)
    otsu.SetOutsideValue(1)
    mask = otsu.Execute(mean_image)
    components = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    mask = sitk.BinaryFillhole(sitk.Cast(components == 1, sitk.sitkUInt8), foregroundValue=1)
    voxels = int(sitk.GetArrayViewFromImage(mask).sum())
    if voxels == 0:
        raise DataError(path, "foreground mask is empty (blank images?)")
    return mask, Step(
        "foreground_mask", {"otsu_threshold": float(otsu.GetThreshold()), "voxels": voxels}
    )


def target_grid(
    mask: sitk.Image, *, spacing: Sequence[float], margin_mm: float = DEFAULT_MARGIN_MM
) -> tuple[Grid, Step]:
    """RAS-aligned grid at ``spacing`` covering the mask's world bounding box plus a margin."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(mask)
    box = stats.GetBoundingBox(1)  # (start i, j, k, size i, j, k) in voxels
    start, size = np.array(box[:3], float), np.array(box[3:], float)
    # Corners of the voxels' extent (half a voxel beyond the outer centres).
    corners = [
        mask.TransformContinuousIndexToPhysicalPoint(
            [float(v) for v in start - 0.5 + size * np.array(c)]
        )
        for c in np.ndindex(2, 2, 2)
    ]
    ras = np.array(corners) * np.array([-1.0, -1.0, 1.0])
    low, high = ras.min(axis=0) - margin_mm, ras.max(axis=0) + margin_mm
    step = np.array(spacing, dtype=float)
    n = np.ceil((high - low) / step - 1e-6).astype(int)
    # Centre the grid on the box; the first voxel centre is half a voxel in.
    first = (low + high) / 2 - (n - 1) / 2 * step
    origin = (float(-first[0]), float(-first[1]), float(first[2]))
    grid = Grid(
        size=(int(n[0]), int(n[1]), int(n[2])),
        spacing=(float(step[0]), float(step[1]), float(step[2])),
        origin=origin,
    )
    return grid, Step("target_grid", {"margin_mm": float(margin_mm), **grid.to_json()})


def resample_to_grid(
    image: sitk.Image, grid: Grid, *, interpolator: str
) -> tuple[sitk.Image, Step]:
    """Resample through world coordinates onto ``grid`` (0 outside the source).

    ``interpolator`` is ``"linear"`` (output float32) or ``"nearest"``
    (output keeps the input's pixel type, so labels stay whole numbers).
    """
    f = sitk.ResampleImageFilter()
    f.SetSize(list(grid.size))
    f.SetOutputSpacing(grid.spacing)
    f.SetOutputOrigin(grid.origin)
    f.SetOutputDirection(grid.direction)
    f.SetTransform(sitk.Transform(3, sitk.sitkIdentity))
    f.SetInterpolator(_INTERPOLATORS[interpolator])
    f.SetDefaultPixelValue(0.0)
    f.SetOutputPixelType(sitk.sitkFloat32 if interpolator == "linear" else image.GetPixelID())
    out = f.Execute(image)
    source = {"from_size": list(image.GetSize()), "from_spacing": list(image.GetSpacing())}
    return out, Step("resample", {"interpolator": interpolator, **source})


def zscore(
    image: sitk.Image, mask: sitk.Image, *, path: str | Path = "<image>"
) -> tuple[sitk.Image, Step]:
    """Z-score ``image`` inside ``mask`` (same grid), exactly 0 outside; float32."""
    values = sitk.GetArrayViewFromImage(image).astype(np.float64)
    inside = sitk.GetArrayViewFromImage(mask) > 0
    selected = values[inside]
    mean, std = float(selected.mean()), float(selected.std())
    if selected.size < 2 or not std > 1e-6 * max(1.0, abs(mean)):
        raise DataError(path, "intensity is constant inside the foreground mask; cannot z-score")
    out = np.zeros(values.shape, dtype=np.float32)
    out[inside] = (selected - mean) / std
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result, Step("zscore", {"mean": mean, "std": std, "voxels": int(selected.size)})


@dataclass(frozen=True)
class HarmonisedCase:
    """A case on its canonical grid, with what was done to it and where it came from."""

    raw: RawCase
    images: dict[str, sitk.Image]
    seg: sitk.Image | None
    mask: sitk.Image
    grid: Grid
    source_geometry: dict[str, Geometry]
    steps: list[Step]

    @property
    def original_geometry(self) -> Geometry:
        """Grid of the reference modality (t1n) as read, before any step."""
        return self.source_geometry[MODALITIES[0]]

    @property
    def case_id(self) -> str:
        """The case identifier."""
        return self.raw.case_id


def harmonise_case(
    raw_case: RawCase,
    *,
    target_spacing: Sequence[float],
    margin_mm: float = DEFAULT_MARGIN_MM,
) -> HarmonisedCase:
    """Read one raw case and put it on its canonical RAS grid.

    Parameters
    ----------
    raw_case
        Files of the case (see :mod:`data_adapters.layouts`).
    target_spacing
        Output voxel size in mm along R, A, S.
    margin_mm
        World margin around the foreground's bounding box.

    Raises
    ------
    DataError
        Naming the file at fault: unreadable image, unknown label value,
        segmentation off its images' grid, blank images.
    """
    if len(target_spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in target_spacing):
        raise DataError(
            raw_case.root, f"target spacing must be 3 positive numbers, got {target_spacing}"
        )
    reference = MODALITIES[0]
    raw = {name: read_source(raw_case.modalities[name]) for name in MODALITIES}
    geometry = {name: Geometry.of(image) for name, image in raw.items()}
    steps: list[Step] = []
    seg = None
    if raw_case.seg is not None:
        seg = _read_segmentation(raw_case, raw[reference], steps)
        geometry["seg"] = Geometry.of(seg)
    oriented = {name: _record(reorient_to_ras(img), steps, name) for name, img in raw.items()}
    if seg is not None:
        seg = _record(reorient_to_ras(seg), steps, "seg")
    case_dir = raw_case.modalities[reference].path.parent
    mask = _record(foreground_mask([oriented[n] for n in MODALITIES], path=case_dir), steps)
    # The grid covers labelled voxels too, so no label is cropped away even where
    # the foreground mask misses it.
    extent = mask if seg is None else sitk.Or(mask, sitk.Cast(seg > 0, sitk.sitkUInt8))
    grid = _record(target_grid(extent, spacing=target_spacing, margin_mm=margin_mm), steps)
    mask_on_grid = _record(resample_to_grid(mask, grid, interpolator="nearest"), steps, "mask")
    resampled = {
        name: _record(resample_to_grid(img, grid, interpolator="linear"), steps, name)
        for name, img in oriented.items()
    }
    if seg is not None:
        seg = _record(resample_to_grid(seg, grid, interpolator="nearest"), steps, "seg")
    images = {
        name: _record(
            zscore(img, mask_on_grid, path=raw_case.modalities[name].describe()), steps, name
        )
        for name, img in resampled.items()
    }
    return HarmonisedCase(raw_case, images, seg, mask_on_grid, grid, geometry, _merge(steps))


def _read_segmentation(raw_case: RawCase, reference: sitk.Image, steps: list[Step]) -> sitk.Image:
    assert raw_case.seg is not None
    seg = read_source(raw_case.seg)
    where = raw_case.seg.describe()
    if not same_grid(seg, reference):
        raise DataError(
            where,
            f"segmentation grid {Geometry.of(seg).shape} differs from the {MODALITIES[0]} grid "
            f"{Geometry.of(reference).shape} (size, spacing, origin or direction)",
        )
    return _record(remap_segmentation(seg, raw_case.label_scheme, path=where), steps, "seg")


def _record(result: tuple[T, Step], steps: list[Step], image: str | None = None) -> T:
    """Append a step (tagged with the image it applied to) and return its result."""
    value, step = result
    steps.append(Step(step.name, {"image": image, **step.params}) if image else step)
    return value


def _merge(steps: list[Step]) -> list[Step]:
    """Fold consecutive per-image runs of one step into a single record."""
    merged: list[Step] = []
    for step in steps:
        image = step.params.get("image")
        if image is None:
            merged.append(step)
            continue
        params = {k: v for k, v in step.params.items() if k != "image"}
        if merged and merged[-1].name == step.name and "images" in merged[-1].params:
            merged[-1].params["images"][image] = params
        else:
            merged.append(Step(step.name, {"images": {image: params}}))
    return merged
